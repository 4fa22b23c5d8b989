"""The engine runs plans: admit requests (a prefill of their prompts after their prefixes, written straight
into the page pool), and decode one token for every running row per step. It never decides *what* to run;
the scheduler does, within the rows and pages this engine reports free. The running rows and their pages
are engine/rows.py's; the model's forwards over the pool are engine/forward.py's (or the compiled step's).

Prefill is chunked: one prefill forward takes at most `prefill_chunk_tokens` prompt tokens (oldest rows
first), so a long prompt is prefilled over several steps and the decoding rows get a token between its
chunks instead of waiting for all of it."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from server.engine import forward, grammar, prefill_step
from server.engine.compiled import CompiledDecode, DecodeStep, bucket_for
from server.engine.compiled import supports as compiled_supports
from server.engine.graphs import GraphDecode, max_blocks
from server.engine.logprobs import token_logprobs
from server.engine.model import context_limit, eos_token_ids, pad_token_id
from server.engine.paged import DecodeBatch
from server.engine.pages import (
    PAGE_SIZE,
    PagePool,
    ResidentPrefixes,
    bytes_per_page,
    default_pool_bytes,
    pages_for,
)
from server.engine.prefill import use_cascade
from server.engine.quantize import warm_up_kernels
from server.engine.rows import Rows
from server.engine.sampling import make_generator, sample
from server.errors import InvalidRequest, PrefixServerError
from server.registry.format import ModelFingerprint, PrefixKV
from server.request import FinishReason, Request, RequestStatus, TokenLogprob

log = logging.getLogger(__name__)

# Prompt tokens per prefill forward: a 16-row batch of 30-token prompts goes in one; on this project's
# 2-core CPU a 3,000-token prompt then holds the decoding rows up at most 2.3 s (whole: 11 s), measured by
# loadtest/bench_chunked.py (docs/internals.md).
PREFILL_CHUNK_TOKENS = 512


class Engine:
    """One frozen base model; running rows whose K/V live in a page pool, each row with its own prefix or
    none, the rows of one prefix version sharing its pages."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer,
        *,
        max_rows: int = 16,
        max_seq_len: int | None = None,
        max_virtual_tokens: int = 256,
        kv_cache_bytes: int | None = None,
        page_size: int = PAGE_SIZE,
        prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS,
    ):
        self.model = model
        use_cascade(model)  # its prefills read each shared prefix once (engine/prefill.py)
        self.tokenizer = tokenizer
        self.config = model.config
        self.fingerprint = ModelFingerprint.from_config(model.config)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_rows = max_rows
        self.prefill_chunk_tokens = prefill_chunk_tokens  # 0: no limit (every prompt whole at admission)
        self.max_virtual_tokens = max_virtual_tokens
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.pad_token_id = pad_token_id(tokenizer, self.eos_token_ids)
        self.max_context = context_limit(model)
        self.max_seq_len = max_seq_len or self.max_context or 4096
        page_bytes = bytes_per_page(self.fingerprint, page_size, self.dtype)
        if kv_cache_bytes is None:  # every row at a long sequence with a prefix of its own
            tokens = max_rows * (min(self.max_seq_len, 2048) + max_virtual_tokens + page_size)
            kv_cache_bytes = default_pool_bytes(self.fingerprint, self.dtype, self.device, tokens)
        self.pool = PagePool(
            self.fingerprint, kv_cache_bytes // page_bytes, page_size, self.dtype, self.device
        )
        self.prefixes = ResidentPrefixes(self.pool)
        self.rows = Rows(self.pool, self.prefixes)  # the running requests, their pages and generators
        self._chunk_ran = False  # admit ran a prefill chunk since the last decode step: step skips its own
        self.decoder: CompiledDecode | GraphDecode | None = None  # set by compile(); used once warmed up
        # Prefills on the compiled CPU step's packed linears once it is warm (engine/prefill_step.py);
        # False: transformers' forward (what the benchmark compares against).
        self.packed_prefill = True
        self._grammars: grammar.Grammars | None = None  # structured output's, made when first asked for

    def compile(self, on_new_shape: str = "eager", graphs: bool | None = None) -> float:
        """Build the fast decode step for every batch bucket; later steps use it. On a CPU: the step compiled
        by torch.compile (minutes on a small CPU; it writes only the pool's scratch page, so it may run in
        another thread while this engine serves). On CUDA (`graphs`, default: on CUDA): the step captured as
        CUDA graphs (engine/graphs.py); `graphs=True` on a CPU runs that code without capture (tests).
        Returns the seconds taken; ValueError if the model is not covered or the step's CPU kernels cannot
        be built here. on_new_shape: "eager" or "fail" (tests; the compiled CPU step only)."""
        reason = compiled_supports(self.model)
        if reason is not None:
            raise ValueError(f"compiled decode does not cover this model: {reason}")
        if graphs if graphs is not None else self.device.type == "cuda":
            decoder = GraphDecode(
                DecodeStep(self.model, packed=False, attention_kernel=False, write_kernel=False),
                self.max_rows,
                max_blocks(self.max_virtual_tokens, self.max_seq_len, self.page_size),
                self.pool,
                capture=self.device.type == "cuda",
            )
        else:
            decoder = CompiledDecode(self.model, self.max_rows, on_new_shape=on_new_shape)
        started = time.perf_counter()
        warm_up_kernels(self.model)  # the int8 Triton kernel's compiles, before any capture
        decoder.warm_up(self.pool)
        self.decoder = decoder
        return time.perf_counter() - started

    def try_compile(self) -> bool:
        """`compile`, logging instead of raising: the engine stays eager if it cannot compile."""
        try:
            seconds = self.compile()
        except ValueError as e:
            log.info("decode step stays eager: %s", e)
            return False
        except Exception:
            log.exception("compiling the decode step failed; it stays eager")
            return False
        log.info("decode step compiled for batch sizes %s in %.0f s", self.decoder.buckets, seconds)
        return True

    @property
    def grammars(self) -> grammar.Grammars:
        """The tokenizer's grammar compiler (engine/grammar.py), made on the first constrained request."""
        if self._grammars is None:
            vocab = self.model.get_input_embeddings().num_embeddings  # the logits' width
            self._grammars = grammar.Grammars(self.tokenizer, vocab, self.eos_token_ids)
        return self._grammars

    # ---- capacity, for the scheduler's plan ----
    @property
    def running(self) -> list[Request]:
        """The running rows' requests (rows of one prefix version adjacent)."""
        return self.rows.requests

    @property
    def prefilling(self) -> list[Request]:
        """Running rows whose prompt is not all in the pool yet, oldest first."""
        return self.rows.prefilling

    @property
    def page_size(self) -> int:
        return self.pool.page_size

    @property
    def max_request_tokens(self) -> int:
        """Prefix + prompt + max_new_tokens of one request at most: the model's context, --max-* limits."""
        return min(self.max_seq_len, self.max_context or self.max_seq_len)

    @property
    def num_free_rows(self) -> int:
        return self.max_rows - len(self.running)

    @property
    def num_available_pages(self) -> int:
        """Pages free now, plus those that only idle resident prefixes hold (evicted when needed)."""
        return self.pool.num_free + self.prefixes.idle_pages

    def pages_needed(self, request: Request, counted: set) -> int:
        """Pages admitting `request` takes out of `num_available_pages`: its own (prompt + max_new_tokens,
        reserved at admission) and its prefix's, unless running rows use them already or `counted` has
        its key (which this adds)."""
        own = self.rows.own_pages(request)
        if request.prefix is None:
            return own
        key = ResidentPrefixes.key_of(request.prefix, request.prefix_key)
        if key in counted:
            return own
        counted.add(key)
        return own + self.prefixes.pages_to_acquire(key, request.prefix_len)

    def num_admissible(self, pending: Sequence[Request]) -> int:
        """How many of `pending`, in order, fit the free rows and pages now (the scheduler plans its own
        way, round-robin; this is for running requests directly: `generate`, tests, benchmarks)."""
        counted: set = set()
        pages = self.num_available_pages
        for take, request in enumerate(pending[: self.num_free_rows]):
            pages -= self.pages_needed(request, counted)
            if pages < 0:
                return take
        return min(len(pending), self.num_free_rows)

    def is_resident(self, prefix_key) -> bool:
        """Whether a prefix version's K/V are in the pool now (used by rows, or idle)."""
        return self.prefixes.is_resident(prefix_key)

    def kv_stats(self) -> dict[str, int]:
        """The pool in pages: total (usable), used (rows' own and resident prefixes'), shared (prefix pages
        read by more than one running row), prefix_resident (resident prefixes' pages, idle ones too)."""
        return {
            "pages_total": self.pool.num_usable,
            "pages_used": self.pool.num_usable - self.pool.num_free,
            "pages_shared": self.prefixes.shared_pages,
            "prefix_pages_resident": self.prefixes.resident_pages,
        }

    # ---- validation (at submit and again when a row is admitted) ----
    def validate(self, request: Request) -> None:
        """Raise InvalidRequest if the request cannot run on this model."""
        if request.num_prompt_tokens == 0:
            raise InvalidRequest("prompt is empty: expected at least 1 token after tokenization")
        vocab = self.model.get_input_embeddings().num_embeddings
        bad = [t for t in request.prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        if request.prefix is not None:
            self.fingerprint.check(request.prefix.fingerprint)
        if request.sampling.constraint is not None:
            self.grammars.check(request.sampling.constraint)  # compiled once, kept for its rows
        lengths = (
            f"prefix ({request.prefix_len}) + prompt ({request.num_prompt_tokens}) + max_new_tokens "
            f"({request.sampling.max_new_tokens})"
        )
        total = request.prefix_len + request.num_prompt_tokens + request.sampling.max_new_tokens
        limit = self.max_request_tokens
        if total > limit:
            raise InvalidRequest(f"{lengths} = {total} tokens, model context is {limit}")
        pages = pages_for(request.prefix_len, self.page_size) + self.rows.own_pages(request)
        if pages > self.pool.num_usable:
            raise InvalidRequest(
                f"{lengths} need {pages} K/V pages of {self.page_size} tokens, the pool holds "
                f"{self.pool.num_usable} (see --kv-cache-bytes)"
            )

    # ---- the two kinds of step ----
    @torch.inference_mode()
    def admit(self, requests: Sequence[Request]) -> list[Request]:
        """Give `requests` rows and pages (prefix pages shared, own pages reserved for prompt +
        max_new_tokens), then run one prefill chunk: the oldest rows' prompt tokens up to the chunk budget,
        with their K/V written into the pool. A row whose prompt is all in gets its first token (and its
        logprobs where asked) and decodes from the next step; a longer prompt goes on in the next steps.
        Returns the requests that finished already (e.g. max_new_tokens=1)."""
        if not requests:
            return []
        if len(requests) > self.num_free_rows:
            raise ValueError(f"{len(requests)} requests for {self.num_free_rows} free rows")
        counted: set = set()
        needed = sum(self.pages_needed(r, counted) for r in requests)
        if needed > self.num_available_pages:
            raise ValueError(
                f"{len(requests)} requests need {needed} K/V pages, {self.num_available_pages} are free"
            )
        for request in requests:
            row = self.rows.reserve(request)
            request.status = RequestStatus.RUNNING
            constraint = request.sampling.constraint
            matcher = None if constraint is None else self.grammars.matcher(constraint)
            self.rows.insert(request, row, make_generator(request.sampling, self.device), matcher)
        self._chunk_ran = True
        return self._prefill_chunk()

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """One prefill chunk of the rows still prefilling (unless `admit` ran one since the last step), then
        one token for every decoding row (and its logprobs where asked): one forward over those rows.
        Returns rows that finished."""
        finished = [] if self._chunk_ran else self._prefill_chunk()
        self._chunk_ran = False
        decoding = self.rows.decoding()
        if not decoding:
            return finished
        logits = self.decode_logits(decoding)  # [n, vocab]
        requests = [self.running[i] for i in decoding]
        generators = [self.rows.generators[i] for i in decoding]
        self._pick_tokens(logits, requests, generators, [self.rows.matchers[i] for i in decoding])
        return finished + self.rows.remove([r for r in requests if r.finished])

    @torch.inference_mode()
    def decode_logits(self, decoding: list[int] | None = None) -> torch.Tensor:
        """The forward of a decode step: the decoding rows' last tokens in (`decoding`: indices of the running
        rows that are not prefilling, in order; found here if not given), their K/V written to the pool,
        next-token logits [n, vocab] out. Compiled once warmed up (padded to a bucket), else eager."""
        decoding = self.rows.decoding() if decoding is None else decoding
        rows_kv = [self.rows.kv[i] for i in decoding]
        n = len(decoding)
        decoder = self.decoder if self.decoder is not None and self.decoder.ready else None
        rows = bucket_for(n, decoder.buckets) if decoder is not None else n  # padded up to a compiled bucket
        tokens = [self.running[i].output_token_ids[-1] for i in decoding] + [self.pad_token_id] * (rows - n)
        input_ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # [rows, 1]
        batch = DecodeBatch.build(rows_kv, rows, self.page_size, self.device)
        if decoder is not None:
            logits = decoder(input_ids, batch, self.pool)[:n]
        else:
            logits = forward.decode_logits(self.model, self.pool, input_ids, batch, self.dtype)  # [n, vocab]
        for row in rows_kv:
            row.length += 1
        return logits

    @torch.inference_mode()
    def abort(self, requests: Sequence[Request]) -> list[Request]:
        """Take running requests out of the batch now (client gone, timeout, shutdown)."""
        doomed = [r for r in requests if r in self.running]
        for r in doomed:
            if not r.finished:  # finished already: by a stop string (server/output.py)
                r.finish(FinishReason.ABORT)
        return self.rows.remove(doomed)

    def generate(self, requests: Sequence[Request]) -> list[Request]:
        """Run requests to completion, admitting them (in order) as rows and pages free up; returns them."""
        pending = list(requests)
        while pending or self.running:
            take = self.num_admissible(pending)
            if take == 0 and not self.running and pending:
                self.validate(pending[0])  # it can never fit: say why
            self.admit(pending[:take])
            pending = pending[take:]
            self.step()
        return list(requests)

    @torch.inference_mode()
    def encode_prefix(self, token_ids: Sequence[int]) -> PrefixKV:
        """The K/V of a text under the base model, as a prefix: exactly equal to prepending the text."""
        if not token_ids:
            raise InvalidRequest("prefix text is empty: expected at least 1 token after tokenization")
        if len(token_ids) > self.max_virtual_tokens:
            raise InvalidRequest(
                f"prefix text has {len(token_ids)} tokens, the limit is {self.max_virtual_tokens} virtual tokens"
            )
        keys, values = forward.text_kv(self.model, token_ids, self.device)  # [layers, kv_heads, P, head_dim]
        return PrefixKV(keys=keys, values=values, fingerprint=self.fingerprint)

    # ---- internals ----
    def _prefill_chunk(self) -> list[Request]:
        """One prefill forward over the prompt tokens of the rows still prefilling, oldest first, at most
        `prefill_chunk_tokens` in all (0: no limit); each row's chunk attends to its prefix and its earlier
        chunks in the pool. Rows whose prompt is all in sample their first token. Returns rows that
        finished with it."""
        chunks = self.rows.next_chunk(self.prefill_chunk_tokens or float("inf"))
        if not chunks:
            return []
        rows, prompts = [row for _, row, _ in chunks], [ids for _, _, ids in chunks]
        step = self.decoder.packed_step if self.decoder is not None and self.packed_prefill else None
        if step is not None:
            logits = prefill_step.prefill_logits(step, self.pool, rows, prompts)
        else:
            logits = forward.prefill_logits(
                self.model, self.pool, rows, prompts, self.pad_token_id, self.device
            )
        for _, row, ids in chunks:
            row.length += len(ids)
        done = [i for i, (request, row, _) in enumerate(chunks) if row.length == request.num_prompt_tokens]
        if not done:
            return []
        requests = [chunks[i][0] for i in done]
        for request in requests:
            self.prefilling.remove(request)
        generators = [self.rows.generator_of(r) for r in requests]
        matchers = [self.rows.matcher_of(r) for r in requests]
        self._pick_tokens(logits[done], requests, generators, matchers)
        return self.rows.remove([r for r in requests if r.finished])

    def _pick_tokens(self, logits: torch.Tensor, requests: list[Request], generators, matchers) -> None:
        """Sample one token per row from logits [n, vocab] (a constrained row among the tokens its grammar
        allows), with its logprobs (of the raw logits) where asked, and append them."""
        tokens = sample(grammar.constrain(logits, matchers), [r.sampling for r in requests], generators)
        logprobs = token_logprobs(logits, tokens, [r.sampling.logprobs for r in requests])
        for request, token, logprob, matcher in zip(requests, tokens, logprobs, matchers, strict=True):
            self._append_token(request, token, logprob, matcher)

    def _append_token(
        self, request: Request, token: int, logprob: TokenLogprob | None = None, matcher=None
    ) -> None:
        """Tokens in, tokens out: a row stops on EOS (unless ignore_eos), when its grammar is complete, or at
        max_new_tokens. Text and stop strings are the output processor's (server/output.py), off this thread."""
        request.output_token_ids.append(token)
        if logprob is not None:
            request.output_logprobs.append(logprob)
        params = request.sampling
        outcome = None if matcher is None else grammar.advance(matcher, token)
        if (token in self.eos_token_ids and not params.ignore_eos) or outcome == "stop":
            request.finish(FinishReason.STOP)
        elif outcome is not None:  # a refused token: only if the logits were NaN (a broken prefix)
            request.error = PrefixServerError(f"structured output failed: {outcome}")
            request.finish(FinishReason.ERROR)
        elif len(request.output_token_ids) >= params.max_new_tokens:
            request.finish(FinishReason.LENGTH)
