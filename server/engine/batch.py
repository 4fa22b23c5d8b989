"""Per-batch metadata and the tensors a mixed-prefix batch needs: prefix cache, mask, positions.

Layout of one row (prefix_len = P_i, prompt_len = T_i, batch maxima Pmax, Tmax):

    cache columns : [ pad * (Pmax - P_i) | prefix (P_i) ][ pad * (Tmax - T_i) | prompt (T_i) ] [ generated ... ]
    attention mask:   0 ...                1 ...           0 ...                1 ...            1 ...
    position ids  :                                        0 ...                P_i .. P_i+T_i-1  P_i+T_i ...

Keys are used as stored (no rotary embedding is applied to prefix keys) and each row's real tokens
start at position P_i, which is what PEFT's PrefixTuning does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PretrainedConfig

from server.registry.format import ModelFingerprint, PrefixKV
from server.request import Request


@dataclass(frozen=True)
class BatchMetadata:
    """Built once per batch: each row's prefix length and prompt length, and the batch maxima."""

    prefix_lens: tuple[int, ...]
    prompt_lens: tuple[int, ...]

    @classmethod
    def from_requests(cls, requests: Sequence[Request]) -> BatchMetadata:
        return cls(
            prefix_lens=tuple(r.prefix_len for r in requests),
            prompt_lens=tuple(r.num_prompt_tokens for r in requests),
        )

    @property
    def batch_size(self) -> int:
        return len(self.prefix_lens)

    @property
    def max_prefix_len(self) -> int:
        return max(self.prefix_lens, default=0)

    @property
    def max_prompt_len(self) -> int:
        return max(self.prompt_lens, default=0)


def build_prefix_cache(
    prefixes: Sequence[PrefixKV | None],
    meta: BatchMetadata,
    fingerprint: ModelFingerprint,
    config: PretrainedConfig,
    dtype: torch.dtype,
    device: torch.device,
) -> DynamicCache:
    """A cache pre-filled with every row's prefix, left-padded to the batch's longest prefix."""
    if meta.max_prefix_len == 0:
        return DynamicCache(config=config)
    shape = (
        fingerprint.num_layers,
        meta.batch_size,
        fingerprint.kv_heads,
        meta.max_prefix_len,
        fingerprint.head_dim,
    )
    keys = torch.zeros(shape, dtype=dtype, device=device)  # [layers, batch, kv_heads, Pmax, head_dim]
    values = torch.zeros(shape, dtype=dtype, device=device)
    for row, prefix in enumerate(prefixes):
        if prefix is None:
            continue
        start = meta.max_prefix_len - prefix.num_virtual_tokens
        keys[:, row, :, start:] = prefix.keys  # [layers, kv_heads, P_i, head_dim]
        values[:, row, :, start:] = prefix.values
    return DynamicCache([(keys[layer], values[layer]) for layer in range(shape[0])], config=config)


def build_prefill_inputs(
    prompts: Sequence[Sequence[int]], meta: BatchMetadata, pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts with their mask and per-row positions.

    Returns input_ids [batch, Tmax], attention_mask [batch, Pmax + Tmax], position_ids [batch, Tmax].
    """
    batch, p_max, t_max = meta.batch_size, meta.max_prefix_len, meta.max_prompt_len
    input_ids = torch.full((batch, t_max), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, p_max + t_max), dtype=torch.long)
    position_ids = torch.zeros((batch, t_max), dtype=torch.long)
    for row, (ids, p_len, t_len) in enumerate(zip(prompts, meta.prefix_lens, meta.prompt_lens, strict=True)):
        input_ids[row, t_max - t_len :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, p_max - p_len : p_max] = 1
        attention_mask[row, p_max + t_max - t_len :] = 1
        position_ids[row, t_max - t_len :] = torch.arange(p_len, p_len + t_len)
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device)
