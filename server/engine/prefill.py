"""Prefill attention over the page pool, with each shared prefix read once per group of rows.

During a prefill the joiners' prompts attend to their own (causal, left-padded) tokens and to their
prefixes. Handing transformers' SDPA each row's prefix concatenated to its prompt costs a copy of the
prefix per row and layer, another per query head (`repeat_kv`), and a masked attention over all of it.
Here attention runs in two parts merged under one softmax (the cascade idea of FlashInfer and Hydragen):
the prompt part per row, and the prefix part per prefix version, its keys and values gathered from their
pages once and multiplied with the queries of every row that reads it. Query heads of one K/V head are
packed as query rows, so no K/V head is repeated.

The base model's attention implementation is `ATTENTION_NAME`: transformers' SDPA unchanged, except inside
`prefilling(cache)` on the engine thread, where the model's attention layers run `cascade_attention`.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION_NAME = "prefix_server_sdpa"
_active = threading.local()  # .cache: the PrefillCache of the prefill running on this thread


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    cache = getattr(_active, "cache", None)
    if cache is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    return cascade_attention(cache, module.layer_idx, query, key, value, attention_mask, scaling), None


AttentionInterface.register(ATTENTION_NAME, attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


def use_cascade(model: PreTrainedModel) -> None:
    """Make the model's attention layers call `attention` (SDPA outside a prefill of ours)."""
    if model.config._attn_implementation == "sdpa":
        model.config._attn_implementation = ATTENTION_NAME


@contextlib.contextmanager
def prefilling(cache):
    """Within this block, this thread's attention layers run `cascade_attention` over `cache`."""
    _active.cache = cache
    try:
        yield
    finally:
        _active.cache = None


def cascade_attention(cache, layer: int, query, key, value, mask, scaling) -> torch.Tensor:
    """query [b, heads, T, d]; key, value [b, kv_heads, T, d] (the prompts, left-padded); mask: transformers'
    [b, 1, T, Pmax + T] (bool: True = attend, or additive), or None (causal, no padding). Each row also
    attends to its prefix (`cache.prefix_kv`). Returns [b, T, heads, d].

    Two attentions, each with its log-sum-exp (torch's CPU flash kernel returns it), merged exactly:
    out = (out_own * e^lse_own + out_prefix * e^lse_prefix) / (e^lse_own + e^lse_prefix)."""
    b, heads, t, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else d**-0.5
    q = query.reshape(b, kv_heads, groups * t, d)  # the heads of a K/V head as query rows
    causal = torch.ones(t, t, dtype=torch.bool, device=query.device).tril()
    if mask is None:
        allowed = causal[None, None]
    else:  # [b | 1, 1, T, Pmax + T]: the prompt's columns are the last T
        mask = mask[..., -t:]
        allowed = mask if mask.dtype == torch.bool else mask == 0  # [b | 1, 1, T, T]
    # A padding position (left of a prompt) sees nothing of its row; it attends to itself so that it stays
    # finite (its output is never read). Real positions see themselves already.
    allowed = allowed | torch.eye(t, dtype=torch.bool, device=query.device)
    additive = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill_(
        ~allowed, float("-inf")
    )
    additive = additive.expand(b, 1, t, t)[:, :, None].expand(b, 1, groups, t, t).reshape(b, 1, groups * t, t)
    out, lse = _flash(q, key, value, additive, scale)  # [b, kv_heads, gT, d], [b, kv_heads, gT]
    for rows, k_p, v_p in cache.prefix_kv(layer):
        n = len(rows)
        if k_p.dim() == 4:  # [n, kv_heads, P, d]: each row its own prefix, all of one length
            out_p, lse_p = _flash(q[rows], k_p, v_p, None, scale)  # [n, kv_heads, gT, d | ]
        else:  # [kv_heads, P, d]: read once for all the rows
            qg = q[rows].transpose(0, 1).reshape(1, kv_heads, n * groups * t, d)
            out_p, lse_p = _flash(qg, k_p[None], v_p[None], None, scale)  # [1, kv_heads, n * gT, d | ]
            out_p = out_p[0].reshape(kv_heads, n, groups * t, d).transpose(0, 1)  # [n, kv_heads, gT, d]
            lse_p = lse_p[0].reshape(kv_heads, n, groups * t).transpose(0, 1)  # [n, kv_heads, gT]
        # The prefix part's weight e^lse_p / (e^lse_o + e^lse_p) = sigmoid(lse_p - lse_o).
        w_p = torch.sigmoid(lse_p - lse[rows])[..., None]  # [n, kv_heads, gT, 1] float32
        if n == b and out.dtype == torch.float32:  # rows 0..b-1 in order: in place, no gather and scatter
            out.add_((out_p - out).mul_(w_p))
        else:
            own = out[rows].float()
            out[rows] = own.add_((out_p.float() - own).mul_(w_p)).to(out.dtype)
    return out.reshape(b, heads, t, d).transpose(1, 2).contiguous()  # [b, T, heads, d]


def _flash(q, k, v, mask, scale):
    """torch's CPU flash attention, with the log-sum-exp of each query's scores (float32)."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask, scale=scale
        )
        return out, lse.float()
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # elsewhere: the same, in plain ops
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.softmax(scores, -1).to(v.dtype), v), lse
