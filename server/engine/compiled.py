"""A compiled decode step over the slot cache: the model's own layers, traced once by torch.compile.

Eager transformers spends much of a small model's decode step in per-operator overhead and unpacked
GEMMs. Here the step (embedding -> every decoder layer attending over the slots plus its new token ->
final norm -> lm_head) is one graph compiled by inductor (fused C++ kernels, weights frozen and
prepacked for the CPU's GEMM); it returns the new K/V, which the engine writes into the slots with one
indexed copy. Shapes are bucketed so rows joining and leaving never recompile: the batch is padded up
to a bucket (padded rows are free slots, which see only their own token), and the key/value length is a
dynamic dimension. `warm_up` compiles every bucket on scratch tensors before the engine switches to the
graphs, so no request waits on a compile, and afterwards an unforeseen shape would run eagerly rather
than compile mid-serving. Measured on the CPU only; on CUDA the same graphs run (no CUDA graphs yet).

It runs the model's decoder layers unchanged, so it applies to models whose outer loop is the plain
Llama one (embed, rotary, layers, norm, lm_head); `supports` says which, the others stay eager.
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import PreTrainedModel

log = logging.getLogger(__name__)

# Freezing: weights become constants, so linears run on prepacked weights (MKL for float32, oneDNN for
# bfloat16 on CPU). (cpp.enable_concat_linear, fusing q/k/v and gate/up, measured slower here.)
INDUCTOR_OPTIONS = {"freezing": True}

# model_type -> the outer loop is Llama's (no embedding scale, no sliding window layers, one rotary).
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def supports(model: PreTrainedModel) -> str | None:
    """None if the compiled step applies to `model`, else why not."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} (compiled decode covers {sorted(SUPPORTED_MODEL_TYPES)})"
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return "sliding-window layers"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    return None


def batch_buckets(max_slots: int) -> list[int]:
    """Powers of two up to max_slots, and max_slots itself: [1, 2, 4, 8, 16] for 16 slots."""
    buckets = [1]
    while buckets[-1] * 2 < max_slots:
        buckets.append(buckets[-1] * 2)
    return sorted({*buckets, max_slots})


def bucket_for(n: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= n)


class _StepCache:
    """The slots as the decoder layers' cache for one traced step, read only: `update` returns the rows'
    first `past` columns with the new token's K/V appended, and keeps the new K/V for the caller to write
    into the slots after the step (one write for all layers instead of a mutation per layer)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, past):
        self.keys, self.values = keys, values  # [layers, slots, kv_heads, capacity, head_dim]
        self.past = past  # columns of the slots before the new token (the step's dynamic length)
        self.new_keys: list[torch.Tensor] = []
        self.new_values: list[torch.Tensor] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key_states, value_states: [b, kv_heads, 1, head_dim] -> [b, kv_heads, past + 1, head_dim]."""
        b = key_states.shape[0]
        self.new_keys.append(key_states[:, :, 0])
        self.new_values.append(value_states[:, :, 0])
        keys = torch.cat([self.keys[layer_idx, :b, :, : self.past], key_states], dim=2)
        values = torch.cat([self.values[layer_idx, :b, :, : self.past], value_states], dim=2)
        return keys, values


class _DecodeStep(torch.nn.Module):
    """input_ids, positions: [b, 1]; mask: [b, 1, 1, past + 1] additive; keys, values: the slots
    [layers, slots, kv_heads, capacity, head_dim] -> logits [b, vocab] (float32), the new K and V
    [b, layers, kv_heads, head_dim]."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, positions, mask, keys, values):
        inner = self.model.model
        cache = _StepCache(keys, values, mask.shape[-1] - 1)
        hidden = inner.embed_tokens(input_ids)  # [b, 1, hidden]
        position_embeddings = inner.rotary_emb(hidden, positions)
        for layer in inner.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                position_embeddings=position_embeddings,
            )
        logits = self.model.lm_head(inner.norm(hidden[:, -1])).float()  # [b, vocab]
        return logits, torch.stack(cache.new_keys, dim=1), torch.stack(cache.new_values, dim=1)


class CompiledDecode:
    """The decode step compiled for each batch bucket, with dynamic key/value lengths.

    `warm_up` compiles every bucket (inductor with weight freezing: linear weights prepacked for the
    CPU's GEMM); afterwards a call never compiles: an unforeseen shape runs eagerly instead."""

    def __init__(self, model: PreTrainedModel, max_slots: int, on_new_shape: str = "eager"):
        if on_new_shape not in ("eager", "fail"):
            raise ValueError(f"on_new_shape must be 'eager' or 'fail', got {on_new_shape!r}")
        self.buckets = batch_buckets(max_slots)
        self.ready = False
        self._stance = "eager_on_recompile" if on_new_shape == "eager" else "fail_on_recompile"
        self._compiled = torch.compile(_DecodeStep(model), fullgraph=True)

    def __call__(self, input_ids, positions, mask, keys, values):
        torch._dynamo.mark_dynamic(mask, 3)
        torch._dynamo.mark_dynamic(keys, 3)
        torch._dynamo.mark_dynamic(values, 3)
        if not self.ready:
            return self._compiled(input_ids, positions, mask, keys, values)
        # Guards are checked only where the compiled graphs differ (the batch bucket); a shape none of
        # them takes would run eagerly rather than compile in the middle of serving.
        with torch.compiler.set_stance(self._stance, skip_guard_eval_unsafe=True):
            return self._compiled(input_ids, positions, mask, keys, values)

    @torch.inference_mode()
    def warm_up(self, slots_like: torch.Tensor) -> float:
        """Compile every bucket on scratch tensors shaped like the slots; returns the seconds taken."""
        start = time.perf_counter()
        keys, values = torch.zeros_like(slots_like), torch.zeros_like(slots_like)
        # No automatic dynamic shapes: one static graph per batch bucket, only the lengths are dynamic.
        with (
            torch._inductor.config.patch(INDUCTOR_OPTIONS),
            # Dynamo counts graphs per code object, i.e. across every CompiledDecode in this process
            # (tests make several); the warm-up bounds what it adds, and afterwards nothing recompiles.
            torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=256),
        ):
            for b in self.buckets:
                for past in (2, 4):  # two lengths: checks the length is dynamic (no second compile)
                    ids = torch.zeros(b, 1, dtype=torch.long, device=keys.device)
                    pos = torch.full((b, 1), past, dtype=torch.long, device=keys.device)
                    mask = torch.zeros(b, 1, 1, past + 1, dtype=keys.dtype, device=keys.device)
                    self(ids, pos, mask, keys, values)
                log.info("compiled decode step: batch %d ready (%.0f s)", b, time.perf_counter() - start)
        self.ready = True
        return time.perf_counter() - start
