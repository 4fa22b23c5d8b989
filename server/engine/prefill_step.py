"""The prefill on the decode step's packed linears: real prompt tokens only, no transformers forward.

transformers' forward runs a prefill's linears on torch's GEMM (MKL on x86), ~100 GFLOP/s on this
project's 2-core AVX-512 machines at any row count, while `prefix_server::linear` over the packed weights
runs ~200 (`python -m loadtest.bench_prefill`): the prefill's time is nearly all linears, so where the
compiled step packs its weights (float32 or bfloat16, or int8, on an AVX-512 CPU) the prefill runs here
on the same packed modules (no second copy of the weights).

Layout: the chunks' tokens flattened, no padding ([n, hidden] through every linear, norm and rotary);
only attention sees rows, left-padded to the longest chunk, through prefill.cascade_attention (each
shared prefix read from its pages once for its rows). Each token's K/V go straight into its row's pages
(`write_kv`), at the position PEFT gives it (context length + index in the chunk). A layer's parts around
attention are the decode step's own (`DecodeStep.qkv_of`, `after_attention`, `logits`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from server.engine.compiled import DecodeStep
from server.engine.paged import PrefillCache, RowKV
from server.engine.pages import PagePool
from server.engine.prefill import cascade_attention


def prefill_logits(
    step: DecodeStep, pool: PagePool, rows: Sequence[RowKV], chunks: Sequence[list[int]]
) -> torch.Tensor:
    """One prefill forward (as forward.prefill_logits): chunks[i] continues rows[i] from its `length`.
    Returns the logits after each chunk's last token [rows, vocab] (float32). Runs under the engine's
    inference mode."""
    assert step.packed, "the packed prefill needs the step's packed linears"
    inner, ops, device = step.model.model, torch.ops.prefix_server, pool.keys.device
    lens = [len(ids) for ids in chunks]
    b, t_max = len(rows), max(lens)
    cache = PrefillCache(pool, rows, lens, cascade=True)  # contexts, and each token's (row, column, slot)
    ids = torch.tensor([t for c in chunks for t in c], dtype=torch.long, device=device)  # [n]
    positions = torch.tensor(
        [r.prefix_len + r.length + j for r, n in zip(rows, lens, strict=True) for j in range(n)],
        device=device,
    )
    last = torch.tensor(lens, device=device).cumsum(0) - 1  # [b]: each chunk's last token in the flat order
    # Allowed keys per row: causal within the chunk, none of the left padding (cascade_attention lets a
    # padding query see itself).
    cols = torch.arange(t_max, device=device)
    real = cols[None, :] >= (t_max - torch.tensor(lens, device=device))[:, None]  # [b, T]
    mask = (cols[:, None] >= cols[None, :])[None] & real[:, None, :]  # [b, T, T]
    mask = mask[:, None]  # [b, 1, T, T]
    src = (cache.src_rows, slice(None), cache.src_cols)  # a real token's place in [b, heads, T, d]

    hidden = inner.embed_tokens(ids)  # [n, hidden]
    cos, sin = (t[0] for t in inner.rotary_emb(hidden, positions[None]))  # [n, head_dim]
    for i, layer in enumerate(inner.layers):
        q, k, v = step.qkv_of(i, layer.input_layernorm(hidden))  # [n, heads | kv_heads, d]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        ops.write_kv(pool.keys, pool.values, i, cache.dst_slots, k, v)
        q_rows = q.new_zeros(b, q.shape[1], t_max, q.shape[2])  # [b, heads, T, d], left-padded
        k_rows, v_rows = (x.new_zeros(b, x.shape[1], t_max, x.shape[2]) for x in (k, v))
        q_rows[src], k_rows[src], v_rows[src] = q, k, v
        out = cascade_attention(
            cache, i, q_rows, k_rows, v_rows, mask, layer.self_attn.scaling
        )  # [b, T, heads, d]
        hidden = step.after_attention(
            i, hidden, out[cache.src_rows, cache.src_cols].flatten(1)
        )  # [n, hidden]
    return step.logits(hidden[last])  # [b, vocab]
