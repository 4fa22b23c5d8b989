"""Per-batch metadata and the prefill inputs of a mixed-prefix batch: left-padded prompts, mask, positions.

A prefill runs one chunk of each row's prompt (the whole prompt unless it is longer than the engine's
chunk budget). The chunk's context is what the row has before it: its prefix (P_i tokens, read from the
prefix's pages) and the prompt tokens of its earlier chunks (s_i, read from the row's own pages);
C_i = P_i + s_i. Layout of one row in the prefill's attention (chunk length T_i, batch maxima Cmax, Tmax):

    columns       : [ pad * (Cmax - C_i) | context (C_i) ][ pad * (Tmax - T_i) | chunk (T_i) ] [ generated ... ]
    attention mask:   0 ...                1 ...            0 ...                1 ...           1 ...
    position ids  :                                         0 ...                C_i .. C_i+T_i-1  C_i+T_i ...

Keys are used as stored (no rotary embedding is applied to prefix keys) and each row's real tokens
start at position P_i, which is what PEFT's PrefixTuning does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchMetadata:
    """Built once per prefill: each row's context length (prefix + earlier chunks) and chunk length, and
    the batch maxima."""

    prefix_lens: tuple[int, ...]  # context lengths C_i
    prompt_lens: tuple[int, ...]  # chunk lengths T_i

    @property
    def batch_size(self) -> int:
        return len(self.prefix_lens)

    @property
    def max_prefix_len(self) -> int:
        return max(self.prefix_lens, default=0)

    @property
    def max_prompt_len(self) -> int:
        return max(self.prompt_lens, default=0)


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
