"""The engine runs plans: admit requests into free slots (a prefill with their own prefixes), and decode
one token for every active row per step. It never decides *what* to run; the scheduler does."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from server.engine.batch import BatchMetadata, build_prefill_inputs, build_prefix_cache
from server.engine.compiled import CompiledDecode, bucket_for
from server.engine.compiled import supports as compiled_supports
from server.engine.logprobs import token_logprobs
from server.engine.sampling import make_generator, sample
from server.engine.slots import SlotKV
from server.errors import InvalidRequest
from server.registry.format import ModelFingerprint, PrefixKV
from server.request import FinishReason, Request, RequestStatus, TokenLogprob

log = logging.getLogger(__name__)


class Engine:
    """One frozen base model; a running batch of fixed slots, each row with its own prefix or none."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer,
        *,
        max_slots: int = 16,
        max_seq_len: int | None = None,
        max_virtual_tokens: int = 256,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.fingerprint = ModelFingerprint.from_config(model.config)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_virtual_tokens = max_virtual_tokens
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.pad_token_id = _pad_token_id(tokenizer, self.eos_token_ids)
        text_config = self.config.get_text_config()
        self.max_context = getattr(text_config, "max_position_embeddings", None)
        # With a 4D mask of our own, sliding windows are not applied: refuse rows longer than the window.
        if "sliding_attention" in (getattr(text_config, "layer_types", None) or []):
            window = getattr(text_config, "sliding_window", None)
            self.max_context = min(self.max_context or window, window)
        self.max_seq_len = max_seq_len or self.max_context or 4096
        self.slots = SlotKV(self.fingerprint, max_slots, self.max_seq_len, self.dtype, self.device)
        self.running: list[Request] = []  # running[i] lives in slot i
        self._generators: list[torch.Generator | None] = []
        self.decoder: CompiledDecode | None = None  # set by compile(); used once warmed up

    def compile(self, on_new_shape: str = "eager") -> float:
        """Compile the decode step for every batch bucket (minutes on a small CPU, on scratch tensors: it
        may run in another thread while this engine serves); later steps use it. Returns the seconds
        taken; ValueError if the model is not covered or the step's kernels cannot be built here.
        on_new_shape: "eager" or "fail" (tests)."""
        reason = compiled_supports(self.model)
        if reason is not None:
            raise ValueError(f"compiled decode does not cover this model: {reason}")
        decoder = CompiledDecode(self.model, self.max_slots, on_new_shape=on_new_shape)
        seconds = decoder.warm_up(self.slots.keys)
        self.decoder = decoder
        return seconds

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
    def max_slots(self) -> int:
        return self.slots.max_slots

    @property
    def num_free_slots(self) -> int:
        return self.max_slots - len(self.running)

    # Interim: the scheduler's page-based admission interface, before the page pool lands.
    @property
    def num_free_rows(self) -> int:
        return self.num_free_slots

    @property
    def num_available_pages(self) -> int:
        return 1 << 30

    def pages_needed(self, request: Request, counted: set) -> int:
        return 0

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
        total = request.prefix_len + request.num_prompt_tokens + request.sampling.max_new_tokens
        limit = min(self.max_seq_len, self.max_context or self.max_seq_len)
        if total > limit:
            raise InvalidRequest(
                f"prefix ({request.prefix_len}) + prompt ({request.num_prompt_tokens}) + max_new_tokens "
                f"({request.sampling.max_new_tokens}) = {total} tokens, model context is {limit}"
            )

    # ---- the two kinds of step ----
    @torch.inference_mode()
    def admit(self, requests: Sequence[Request]) -> list[Request]:
        """Prefill `requests` (each after its own prefix), sample their first tokens (with their logprobs
        where asked), and give the unfinished ones a slot. Returns the requests that finished already
        (e.g. max_new_tokens=1)."""
        if len(requests) > self.num_free_slots:
            raise ValueError(f"{len(requests)} requests for {self.num_free_slots} free slots")
        if not requests:
            return []
        meta = BatchMetadata.from_requests(requests)
        prefixes = [r.prefix.to(self.device, self.dtype) if r.prefix is not None else None for r in requests]
        cache = build_prefix_cache(prefixes, meta, self.fingerprint, self.config, self.dtype, self.device)
        input_ids, attention_mask, position_ids = build_prefill_inputs(
            [r.prompt_token_ids for r in requests], meta, self.pad_token_id, self.device
        )
        logits = self._forward(input_ids, attention_mask, position_ids, cache)  # [batch, vocab]
        generators = [make_generator(r.sampling, self.device) for r in requests]
        tokens = sample(logits, [r.sampling for r in requests], generators)
        logprobs = token_logprobs(logits, tokens, [r.sampling.logprobs for r in requests])
        finished = []
        needed = max(r.prefix_len + r.num_prompt_tokens + r.sampling.max_new_tokens for r in requests)
        self.slots.ensure_capacity(needed)
        for row, (request, token, gen) in enumerate(zip(requests, tokens, generators, strict=True)):
            request.status = RequestStatus.RUNNING
            self._append_token(request, token, logprobs[row])
            if request.finished:
                finished.append(request)
                continue
            slot = len(self.running)
            columns = attention_mask[row].nonzero().squeeze(1)  # [P_i + T_i] the row's real columns
            for layer, cache_layer in enumerate(cache.layers):
                self.slots.write_row(
                    slot, layer, cache_layer.keys[row][:, columns], cache_layer.values[row][:, columns]
                )
            self.running.append(request)
            self._generators.append(gen)
        self.slots.num_active = len(self.running)
        return finished

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """One token for every running row (and its logprobs where asked): one forward over the active
        slots. Returns rows that finished."""
        if not self.running:
            return []
        logits = self.decode_logits()  # [n, vocab]
        tokens = sample(logits, [r.sampling for r in self.running], self._generators)
        logprobs = token_logprobs(logits, tokens, [r.sampling.logprobs for r in self.running])
        for request, token, logprob in zip(self.running, tokens, logprobs, strict=True):
            self._append_token(request, token, logprob)
        return self._remove([r for r in self.running if r.finished])

    @torch.inference_mode()
    def decode_logits(self) -> torch.Tensor:
        """The forward of a decode step: the running rows' last tokens in, their K/V written to the slots,
        next-token logits [n, vocab] out. Compiled once warmed up (padded to a bucket), else eager."""
        n = len(self.running)
        decoder = self.decoder if self.decoder is not None and self.decoder.ready else None
        rows = bucket_for(n, decoder.buckets) if decoder is not None else n  # padded up to a compiled bucket
        tokens = [r.output_token_ids[-1] for r in self.running] + [self.pad_token_id] * (rows - n)
        input_ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # [rows, 1]
        if decoder is not None:
            position_ids, mask = self.slots.step_inputs(rows)  # [rows, 1], [rows, 1, 1, length]
            logits = decoder(input_ids, position_ids, mask, self.slots.keys, self.slots.values)[:n]
        else:
            position_ids, mask, cache = self.slots.decode_view()  # [n, 1], [n, 1, 1, view_len]
            logits = self._forward(input_ids, mask, position_ids, cache)  # [n, vocab]
        self.slots.lengths[:n] += 1
        return logits

    @torch.inference_mode()  # moving rows writes to slot tensors made under inference mode
    def abort(self, requests: Sequence[Request]) -> list[Request]:
        """Take running requests out of their slots now (client gone, timeout, shutdown)."""
        doomed = [r for r in requests if r in self.running]
        for r in doomed:
            r.finish(FinishReason.ABORT)
        return self._remove(doomed)

    def generate(self, requests: Sequence[Request]) -> list[Request]:
        """Run requests to completion, admitting them as slots free up; returns them, finished."""
        pending = list(requests)
        while pending or self.running:
            if pending and self.num_free_slots:
                take = min(self.num_free_slots, len(pending))
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
        cache = DynamicCache(config=self.config)
        input_ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)  # [1, P]
        self.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
        keys = torch.stack([layer.keys[0] for layer in cache.layers])  # [layers, kv_heads, P, head_dim]
        values = torch.stack([layer.values[0] for layer in cache.layers])
        return PrefixKV(keys=keys.contiguous(), values=values.contiguous(), fingerprint=self.fingerprint)

    # ---- internals ----
    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        # The last column as an index tensor, not logits_to_keep=1: the slice [:, -1:] of a longer prompt
        # is a strided view, and lm_head over it runs as one GEMV per row (a batched matmul reading the
        # vocabulary's weights once per row: 31 of 357 ms in an 8-row prefill); the gather is contiguous.
        last = torch.tensor([input_ids.shape[1] - 1], device=self.device)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=last,
        )
        return out.logits[:, -1, :]  # [batch, vocab]

    def _remove(self, done: list[Request]) -> list[Request]:
        """Free the slots of `done`, moving the last active rows into the holes."""
        for request in done:
            slot = self.running.index(request)
            last = len(self.running) - 1
            if slot != last:
                self.slots.move_row(last, slot)
                self.running[slot] = self.running[last]
                self._generators[slot] = self._generators[last]
            self.running.pop()
            self._generators.pop()
            self.slots.free_row(last)
            request.prefix = None  # the slot holds a copy; drop the reference
        self.slots.num_active = len(self.running)
        return done

    def _append_token(self, request: Request, token: int, logprob: TokenLogprob | None = None) -> None:
        request.output_token_ids.append(token)
        if logprob is not None:
            request.output_logprobs.append(logprob)
        params = request.sampling
        # Detokenizing is O(output) per token: do it every step only when stop strings or a stream
        # need the text as it grows, otherwise once when the request finishes.
        if params.stop or request.stream:
            request.text = self.tokenizer.decode(request.output_token_ids, skip_special_tokens=True)
            cut = _find_stop(request.text, params.stop)
            if cut is not None:
                request.text = request.text[:cut]
                request.finish(FinishReason.STOP)
                return
        if token in self.eos_token_ids and not params.ignore_eos:
            request.finish(FinishReason.STOP)
        elif len(request.output_token_ids) >= params.max_new_tokens:
            request.finish(FinishReason.LENGTH)
        if request.finished and not (params.stop or request.stream):
            request.text = self.tokenizer.decode(request.output_token_ids, skip_special_tokens=True)


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _eos_token_ids(model: PreTrainedModel, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    config_eos = model.config.get_text_config().eos_token_id
    for value in (gen_eos, config_eos, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _pad_token_id(tokenizer, eos_ids: frozenset[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = min(eos_ids) if eos_ids else 0
    return int(pad)
