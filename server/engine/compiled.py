"""A compiled decode step over the page pool: the model's own modules and weights, traced once by
torch.compile.

Eager transformers spends much of a small model's decode step in per-operator overhead and small GEMMs.
Here the step (embedding -> every decoder layer -> final norm -> lm_head) is one graph compiled by
inductor (fused C++ kernels, weights frozen, launched from a C++ wrapper), written for the page pool:
each row's new K/V goes into its slot in place and attention reads the pages where they are. On an
AVX-512 CPU the linears and attention (float32, bfloat16) run on our kernels (`server.engine.kernels`).
Shapes are bucketed so rows joining and leaving never recompile: the batch is padded up to a bucket
(padding rows write to the scratch page and see only that column), and the block tables' width is a
dynamic dimension. `warm_up` compiles every bucket on the scratch page before the engine switches to the graphs,
so no request waits on a compile, and afterwards an unforeseen shape would run eagerly rather than
compile mid-serving. Measured on the CPU only. On CUDA the same step (torch-ops path) runs as CUDA
graphs instead (engine/graphs.py).

The forward is the plain Llama one (embed, rotary, layers, norm, lm_head); `supports` says which models
have it, the others stay eager.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from server.engine import compile_cache, kernels
from server.engine.paged import DecodeBatch, RowKV, gather, write
from server.engine.pages import SCRATCH_PAGE, PagePool
from server.engine.quantize import dequantize

log = logging.getLogger(__name__)

# Freezing: weights become constants (torch's linears then run on oneDNN-prepacked weights in bfloat16).
# cpp_wrapper: the graph's ~330 kernel launches per step from C++ instead of Python: the 8-row float32
# step 51 -> 42 ms here; the first compile on a machine takes ~2.5x longer (inductor's cache keeps it).
INDUCTOR_OPTIONS = {"freezing": True, "cpp_wrapper": True}

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


def batch_buckets(max_rows: int) -> list[int]:
    """Powers of two up to max_rows, and max_rows itself: [1, 2, 4, 8, 16] for 16 rows."""
    buckets = [1]
    while buckets[-1] * 2 < max_rows:
        buckets.append(buckets[-1] * 2)
    return sorted({*buckets, max_rows})


def bucket_for(n: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= n)


class _Packed(torch.nn.Module):
    """Linears reading the same input (q/k/v, gate/up, or one alone) as one: the weight packed for
    `prefix_server::linear` (float32 or bfloat16), AVX-512, where the output features are a multiple of 16;
    else torch's linear over the concatenated weight. Int8Linears (engine/quantize.py): those on a VNNI
    kernel, packed already, on `linear_a16` / `linear_q8`; the others' int8 weights and group scales on
    `linear_int8` (weight-only), or torch's linear over the weight widened to the input's dtype."""

    def __init__(self, *linears: torch.nn.Module):
        super().__init__()
        kinds = {getattr(lin, "kernel", None) for lin in linears}
        if len(kinds) > 1:
            raise ValueError(f"cannot fuse int8 linears on different kernels: {sorted(map(str, kinds))}")
        self.kernel = kinds.pop()  # 'a16', 'q8' or None
        # Output features first in every layout: [N, K], or the VNNI kernels' [N / 16, K / 4 | 2, 16, 4 | 2]
        weight = torch.cat([lin.weight.detach() for lin in linears])
        self.int8 = self.kernel is not None or weight.dtype == torch.int8
        self.packed = self.kernel is not None or weight.shape[0] % 16 == 0
        pack = torch.ops.prefix_server.pack_linear if self.packed and self.kernel is None else (lambda t: t)
        self.register_buffer("weight", pack(weight))
        # int8: float32 scales [N, G], packed like the weight: [N / 16, G, 16] (the VNNI kernels' are already)
        self.register_buffer(
            "scales", pack(torch.cat([lin.scales for lin in linears])) if self.int8 else None
        )
        biases = [lin.bias.detach() for lin in linears if lin.bias is not None]
        bias = None  # [N]
        if biases:  # e.g. Qwen2's q/k/v
            zero = biases[0].new_zeros
            bias = torch.cat(
                [zero(lin.out_features) if lin.bias is None else lin.bias.detach() for lin in linears]
            )
        self.register_buffer("bias", bias)

    def forward(self, x):  # [..., K] -> [..., N]
        if self.kernel == "a16":
            return torch.ops.prefix_server.linear_a16(x, self.weight, self.scales, self.bias)
        if self.kernel == "q8":
            return torch.ops.prefix_server.linear_q8(x, self.weight, self.scales, self.bias)
        if self.int8:
            if self.packed:
                return torch.ops.prefix_server.linear_int8(x, self.weight, self.scales, self.bias)
            return F.linear(x, dequantize(self.weight, self.scales, x.dtype), self.bias)
        if self.packed:
            return torch.ops.prefix_server.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def kernel_choice(model: PreTrainedModel) -> tuple[bool, bool]:
    """(packed linears, attention kernel) for this model: both for float32 and bfloat16 weights on an
    AVX-512 CPU."""
    cpu = kernels.avx512() and model.device.type == "cpu" and model.dtype in (torch.float32, torch.bfloat16)
    return cpu, cpu


class DecodeStep(torch.nn.Module):
    """One decode step over the page pool, written out for the Llama family with the model's own modules and
    weights: each row's new K/V goes into its slot in the pool, in place (`write_kv` with `write_kernel`, else
    an index_put: what a CUDA graph captures), and attention reads
    each row's prefix pages and own pages through its block table: no copy of the past, no repeat of K/V
    heads.

    `packed` (float32 or bfloat16 on an AVX-512 CPU): every linear runs on `prefix_server::linear` over
    weights packed once (q/k/v and gate/up fused), else on the modules. `attention_kernel` (the same CPUs):
    attention on `prefix_server::paged_attention` (the rows of one prefix version read its pages once),
    else torch's SDPA over the gathered pages under `mask` (paged.py's layout), grouped query heads packed
    as query rows (as transformers' eager decode does).

    input_ids, positions: [b, 1]; mask: [b, 1, 1, blocks * page_size] additive, or None with the kernel;
    block_tables [b, blocks]; prefix_lens, own_lens, slots [b] (paged.DecodeBatch); keys, values: the pool
    [layers, pages, kv_heads, page_size, head_dim], written in place -> logits [b, vocab] (float32)."""

    def __init__(
        self, model: PreTrainedModel, packed: bool, attention_kernel: bool, write_kernel: bool = True
    ):
        super().__init__()
        self.model = model
        self.packed, self.attention_kernel, self.write_kernel = packed, attention_kernel, write_kernel
        if packed:
            layers = model.model.layers
            self.qkv = torch.nn.ModuleList(
                _Packed(a.q_proj, a.k_proj, a.v_proj) for a in (layer.self_attn for layer in layers)
            )
            self.o = torch.nn.ModuleList(_Packed(layer.self_attn.o_proj) for layer in layers)
            self.gate_up = torch.nn.ModuleList(
                _Packed(layer.mlp.gate_proj, layer.mlp.up_proj) for layer in layers
            )
            self.down = torch.nn.ModuleList(_Packed(layer.mlp.down_proj) for layer in layers)
            self.lm_head = _Packed(model.lm_head)

    def forward(self, input_ids, positions, mask, block_tables, prefix_lens, own_lens, slots, keys, values):
        inner, ops = self.model.model, torch.ops.prefix_server
        b = input_ids.shape[0]
        hidden = inner.embed_tokens(input_ids)[:, 0]  # [b, hidden]
        cos, sin = (t[:, 0] for t in inner.rotary_emb(hidden, positions))  # [b, head_dim]
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            d, kv_heads = attn.head_dim, attn.config.num_key_value_heads
            q, k, v = self.qkv_of(i, layer.input_layernorm(hidden))  # [b, heads | kv_heads, d]
            q, k = apply_rotary_pos_emb(q, k, cos, sin)  # cos, sin [b, 1, d]
            if (
                self.write_kernel
            ):  # in place through a pointer: an index_put traced by inductor copies the pool
                ops.write_kv(keys, values, i, slots, k, v)
            else:  # index_put, in place, capturable in a CUDA graph (engine/graphs.py)
                write(keys[i], slots, k)
                write(values[i], slots, v)
            if self.attention_kernel:
                out = ops.paged_attention(
                    q, keys, values, i, block_tables, prefix_lens, own_lens, attn.scaling
                )  # [b, heads, d]
            else:
                q = q.view(b, kv_heads, -1, d)  # [b, kv_heads, groups, d]: a group's heads as query rows
                out = F.scaled_dot_product_attention(
                    q,
                    gather(keys[i], block_tables),
                    gather(values[i], block_tables),
                    attn_mask=mask,
                    scale=attn.scaling,
                )  # [b, kv_heads, groups, d]
            hidden = self.after_attention(i, hidden, out.reshape(b, -1))
        return self.logits(hidden)  # [b, vocab]

    # The layer's parts around attention, shared with the prefill (engine/prefill_step.py).
    def qkv_of(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer i's q [n, heads, d], k, v [n, kv_heads, d] (before rotary) of its normed input x [n, hidden]."""
        attn = self.model.model.layers[i].self_attn
        d, heads, kv_heads = attn.head_dim, attn.config.num_attention_heads, attn.config.num_key_value_heads
        if self.packed:
            q, k, v = self.qkv[i](x).view(x.shape[0], -1, d).split([heads, kv_heads, kv_heads], 1)
        else:
            q, k, v = (proj(x).view(x.shape[0], -1, d) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        if hasattr(attn, "q_norm"):  # Qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q, k, v

    def after_attention(self, i: int, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The residual stream [n, hidden] after layer i's attention output out [n, heads * d] and its MLP."""
        layer = self.model.model.layers[i]
        if self.packed:
            hidden = hidden + self.o[i](out)
            gate, up = self.gate_up[i](layer.post_attention_layernorm(hidden)).chunk(2, dim=-1)
            return hidden + self.down[i](layer.mlp.act_fn(gate) * up)
        hidden = hidden + layer.self_attn.o_proj(out)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] after the last layer -> float32 logits [n, vocab]."""
        hidden = self.model.model.norm(hidden)
        return (self.lm_head(hidden) if self.packed else self.model.lm_head(hidden)).float()


class CompiledDecode:
    """The decode step compiled for each batch bucket, with dynamic key/value lengths.

    `warm_up` compiles every bucket (inductor with weight freezing); afterwards a call never compiles: an
    unforeseen shape runs eagerly instead. `packed`: whether the linears run on the packed kernels (which
    hold a packed copy of the weights: the model's size again in memory); `attention_kernel`: whether
    attention runs on ours."""

    def __init__(self, model: PreTrainedModel, max_rows: int, on_new_shape: str = "eager"):
        if on_new_shape not in ("eager", "fail"):
            raise ValueError(f"on_new_shape must be 'eager' or 'fail', got {on_new_shape!r}")
        if not kernels.load():
            raise ValueError("its CPU kernels could not be built here (a C++ compiler and ninja are needed)")
        self.buckets = batch_buckets(max_rows)
        self.ready = False
        self.packed, self.attention_kernel = kernel_choice(model)
        self._stance = "eager_on_recompile" if on_new_shape == "eager" else "fail_on_recompile"
        # The step's packed linears serve the prefills too (engine/prefill_step.py).
        self.step = DecodeStep(model, self.packed, self.attention_kernel)
        self._compiled = torch.compile(self.step, fullgraph=True)

    @property
    def packed_step(self) -> DecodeStep | None:
        """The step whose packed linears prefills run on (engine/prefill_step.py), once warm; None where its
        linears are not packed."""
        return self.step if self.ready and self.packed else None

    def __call__(self, input_ids: torch.Tensor, batch: DecodeBatch, pool: PagePool) -> torch.Tensor:
        """Logits [b, vocab] of one step; b must be one of the buckets."""
        mask = None if self.attention_kernel else batch.mask(pool.keys.dtype)
        args = (input_ids, batch.positions, mask, batch.block_tables, batch.prefix_lens, batch.own_lens)
        args = (*args, batch.slots, pool.keys, pool.values)
        torch._dynamo.mark_dynamic(batch.block_tables, 1)
        if mask is not None:
            torch._dynamo.mark_dynamic(mask, 3)
        if not self.ready:
            return self._compiled(*args)
        # Guards are checked only where the compiled graphs differ (the batch bucket); a shape none of
        # them takes would run eagerly rather than compile in the middle of serving.
        with torch.compiler.set_stance(self._stance, skip_guard_eval_unsafe=True):
            return self._compiled(*args)

    @torch.inference_mode()
    def warm_up(self, pool: PagePool) -> float:
        """Compile every bucket on rows that use only the pool's scratch page; returns the seconds taken."""
        start = time.perf_counter()
        scratch = RowKV(prefix=None, pages=[SCRATCH_PAGE] * 4)
        # No automatic dynamic shapes: one static graph per batch bucket, only the block count is dynamic.
        with (
            compile_cache.writing(compile_cache.inductor_cache_dir()),
            torch._inductor.config.patch(INDUCTOR_OPTIONS),
            # Dynamo counts graphs per code object, i.e. across every CompiledDecode in this process
            # (tests make several); the warm-up bounds what it adds, and afterwards nothing recompiles.
            torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=256),
        ):
            for b in self.buckets:
                for length in (2 * pool.page_size, 3 * pool.page_size):  # 2, 3 blocks: the count is dynamic
                    scratch.length = length - 1
                    batch = DecodeBatch.build([scratch] * b, b, pool.page_size, pool.keys.device)
                    ids = torch.zeros(b, 1, dtype=torch.long, device=pool.keys.device)
                    self(ids, batch, pool)
                log.info("compiled decode step: batch %d ready (%.0f s)", b, time.perf_counter() - start)
        self.ready = True
        return time.perf_counter() - start
