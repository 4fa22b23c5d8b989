"""The engine runs plans: prefill a batch of requests (each with its own prefix or none), then decode
one token per row per step until every row has finished. It never decides *what* to run."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from server.engine.batch import BatchMetadata, build_prefill_inputs, build_prefix_cache
from server.engine.sampling import make_generator, sample
from server.errors import InvalidRequest
from server.registry.format import ModelFingerprint, PrefixKV
from server.request import FinishReason, Request, RequestStatus

log = logging.getLogger(__name__)


@dataclass(eq=False)
class RunningBatch:
    """Decode state of a batch; rows are removed as soon as they finish."""

    requests: list[Request]
    cache: DynamicCache
    attention_mask: torch.Tensor  # [batch, cached_len + 1] (includes the column of the next input token)
    next_positions: torch.Tensor  # [batch] position of the next input token
    generators: list[torch.Generator | None]
    num_steps: int = 0
    finished: list[Request] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.requests)


class Engine:
    """One frozen base model; mixed-prefix batched generation with PEFT prefix semantics."""

    def __init__(self, model: PreTrainedModel, tokenizer, *, max_virtual_tokens: int = 256):
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

    # ---- validation (called at submit, before anything is queued) ----
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
        if self.max_context is not None and total > self.max_context:
            raise InvalidRequest(
                f"prefix ({request.prefix_len}) + prompt ({request.num_prompt_tokens}) + max_new_tokens "
                f"({request.sampling.max_new_tokens}) = {total} tokens, model context is {self.max_context}"
            )

    # ---- the two kinds of step ----
    @torch.inference_mode()
    def prefill(self, requests: Sequence[Request]) -> RunningBatch:
        """Run every row's prompt after its own prefix and sample each row's first token."""
        meta = BatchMetadata.from_requests(requests)
        prefixes = [r.prefix.to(self.device, self.dtype) if r.prefix is not None else None for r in requests]
        cache = build_prefix_cache(prefixes, meta, self.fingerprint, self.config, self.dtype, self.device)
        input_ids, attention_mask, position_ids = build_prefill_inputs(
            [r.prompt_token_ids for r in requests], meta, self.pad_token_id, self.device
        )
        logits = self._forward(input_ids, attention_mask, position_ids, cache)  # [batch, vocab]
        for r in requests:
            r.status = RequestStatus.RUNNING
        batch = RunningBatch(
            requests=list(requests),
            cache=cache,
            attention_mask=attention_mask,
            next_positions=position_ids[:, -1] + 1,  # [batch]
            generators=[make_generator(r.sampling, self.device) for r in requests],
        )
        self._postprocess(batch, logits)
        return batch

    @torch.inference_mode()
    def decode(self, batch: RunningBatch) -> None:
        """One token for every unfinished row: one forward over the whole batch."""
        input_ids = torch.tensor(
            [[r.output_token_ids[-1]] for r in batch.requests], dtype=torch.long, device=self.device
        )  # [batch, 1]
        ones = torch.ones((batch.size, 1), dtype=batch.attention_mask.dtype, device=self.device)
        batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=1)  # [batch, cached_len + 1]
        position_ids = batch.next_positions[:, None]  # [batch, 1]
        logits = self._forward(input_ids, batch.attention_mask, position_ids, batch.cache)
        batch.next_positions = batch.next_positions + 1
        self._postprocess(batch, logits)

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

    def generate(self, requests: Sequence[Request]) -> list[Request]:
        """Run a static batch to completion; returns the same requests, finished."""
        if not requests:
            return []
        batch = self.prefill(requests)
        while batch.size:
            self.decode(batch)
        return list(requests)

    # ---- internals ----
    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :]  # [batch, vocab]

    def _postprocess(self, batch: RunningBatch, logits: torch.Tensor) -> None:
        """Sample, append, check stop conditions, and drop finished rows from the batch."""
        tokens = sample(logits, [r.sampling for r in batch.requests], batch.generators)
        keep = []
        for row, (request, token) in enumerate(zip(batch.requests, tokens, strict=True)):
            self._append_token(request, token)
            if request.finished:
                batch.finished.append(request)
            else:
                keep.append(row)
        batch.num_steps += 1
        if len(keep) < batch.size:
            self._select_rows(batch, keep)

    def _append_token(self, request: Request, token: int) -> None:
        request.output_token_ids.append(token)
        params = request.sampling
        is_eos = token in self.eos_token_ids and not params.ignore_eos
        request.text = self.tokenizer.decode(request.output_token_ids, skip_special_tokens=True)
        if params.stop:
            cut = _find_stop(request.text, params.stop)
            if cut is not None:
                request.text = request.text[:cut]
                request.finish(FinishReason.STOP)
                return
        if is_eos:
            request.finish(FinishReason.STOP)
        elif len(request.output_token_ids) >= params.max_new_tokens:
            request.finish(FinishReason.LENGTH)

    def _select_rows(self, batch: RunningBatch, keep: list[int]) -> None:
        batch.requests = [batch.requests[i] for i in keep]
        batch.generators = [batch.generators[i] for i in keep]
        if not keep:
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        batch.cache.batch_select_indices(index)
        batch.attention_mask = batch.attention_mask[index]
        batch.next_positions = batch.next_positions[index]


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _eos_token_ids(model: PreTrainedModel, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (
        gen_eos,
        model.config.get_text_config().eos_token_id,
        getattr(tokenizer, "eos_token_id", None),
    ):
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
