"""The base model's eager forwards over the page pool, each returning next-token logits.

The engine decides which rows and tokens go in; these run the model on them:
- a prefill chunk: each row's next prompt tokens (left-padded), attending to its prefix and its earlier
  chunks in the pool (engine/prefill.py's cascade attention reads each shared prefix once), their K/V
  written into the row's own pages;
- a decode step: one token per row through its block table (engine/paged.py); once warmed up, the
  compiled step (compiled.py) or its CUDA graphs (graphs.py) run it instead;
- a text's K/V, for a prefix encoded from text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from server.engine.batch import BatchMetadata, build_prefill_inputs
from server.engine.paged import DecodeBatch, DecodeCache, PrefillCache, RowKV
from server.engine.pages import PagePool
from server.engine.prefill import ATTENTION_NAME, prefilling


def prefill_logits(
    model: PreTrainedModel,
    pool: PagePool,
    rows: Sequence[RowKV],
    chunks: Sequence[list[int]],
    pad_token_id: int,
    device: torch.device,
) -> torch.Tensor:
    """One prefill forward: chunks[i] (prompt token ids) continues rows[i] from its `length` (the row's
    length is not advanced here). Returns the logits after each chunk's last token [rows, vocab]."""
    meta = BatchMetadata(
        prefix_lens=tuple(row.prefix_len + row.length for row in rows),
        prompt_lens=tuple(len(ids) for ids in chunks),
    )
    input_ids, attention_mask, position_ids = build_prefill_inputs(chunks, meta, pad_token_id, device)
    cascade = model.config._attn_implementation == ATTENTION_NAME
    cache = PrefillCache(pool, rows, meta.prompt_lens, cascade)
    with prefilling(cache):
        return last_logits(model, input_ids, attention_mask, position_ids, cache)  # [rows, vocab]


def decode_logits(
    model: PreTrainedModel, pool: PagePool, input_ids: torch.Tensor, batch: DecodeBatch, dtype: torch.dtype
) -> torch.Tensor:
    """One eager decode step: input_ids [rows, 1], each row's token at `batch`'s positions, its K/V written to
    its slot. Returns [rows, vocab]."""
    mask = batch.mask(dtype)  # [rows, 1, 1, blocks * page_size]
    return last_logits(model, input_ids, mask, batch.positions, DecodeCache(pool, batch))


def last_logits(model: PreTrainedModel, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
    """The model's logits at the last column of input_ids [batch, T]: [batch, vocab]."""
    # The last column as an index tensor, not logits_to_keep=1: the slice [:, -1:] of a longer prompt
    # is a strided view, and lm_head over it runs as one GEMV per row (a batched matmul reading the
    # vocabulary's weights once per row: 31 of 357 ms in an 8-row prefill); the gather is contiguous.
    last = torch.tensor([input_ids.shape[1] - 1], device=input_ids.device)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=last,
    )
    return out.logits[:, -1, :]  # [batch, vocab]


def text_kv(
    model: PreTrainedModel, token_ids: Sequence[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of a text under the model (nothing before it): each [layers, kv_heads, P,
    head_dim], contiguous."""
    cache = DynamicCache(config=model.config)
    input_ids = torch.tensor([list(token_ids)], dtype=torch.long, device=device)  # [1, P]
    model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
    keys = torch.stack([layer.keys[0] for layer in cache.layers])  # [layers, kv_heads, P, head_dim]
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return keys.contiguous(), values.contiguous()
