"""A GGUF's Q8_0 blocks, kept as they are for `--quantize int8 | w8a8`.

A Q8_0 tensor is, per row, blocks of 32 int8 weights along K with one float16 scale each: the layout
engine/quantize.py rounds to. So its linears take the GGUF's integers and scales directly, instead of
re-rounding the dequantized float weights (which gives the same blocks only when those floats are float32:
in bfloat16 they are rounded first). Other quant types (the default model's linears are Q4_1) keep the
float path. The model itself is still loaded from the float cache that `convert_gguf` makes once; the
linears' float weights are dropped when they become int8.

Names and layout follow transformers' GGUF loader (modeling_gguf_pytorch_utils): llama.cpp's converter
permutes the rows of the query and key weights of `llama` models for its rotary layout, and the loader
permutes them back; the same row permutation is applied here to the blocks (a row keeps its blocks).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader

log = logging.getLogger(__name__)

Q8_0_BLOCK = 32  # weights per block; a block is 2 bytes of float16 scale + 32 int8
# GGUF tensor name within a block -> the module path within a decoder layer of transformers' Llama family
LAYER_LINEARS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
ARCHITECTURES = ("llama", "qwen2", "qwen3")  # GGUF architectures whose names map as above
PERMUTED = ("llama",)  # ... and those whose query/key rows llama.cpp's converter permutes


def reverse_permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's query/key row permutation (transformers' `_reverse_permute_weights`) on a tensor
    whose first dimension is the weight's rows: [N, ...] -> [N, ...]."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def q8_0_linears(path: Path, tied_lm_head: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name ('model.layers.3.mlp.down_proj', 'lm_head') -> (int8 [N, K], float32 scales [N, K / 32])
    for every linear weight the GGUF holds as Q8_0. The lm_head comes from `output.weight`, or from
    `token_embd.weight` when the model ties them (as SmolLM2 does). Empty for other architectures."""
    reader = GGUFReader(path)
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else ""
    if arch not in ARCHITECTURES:
        return {}

    def number(key: str) -> int | None:
        f = reader.fields.get(f"{arch}.{key}")
        return int(f.parts[f.data[0]][0]) if f is not None else None

    heads, kv_heads = number("attention.head_count"), number("attention.head_count_kv")
    found = {}
    for tensor in reader.tensors:
        if tensor.tensor_type != GGMLQuantizationType.Q8_0:
            continue
        parts = tensor.name.split(".")  # blk.3.ffn_down.weight | output.weight | token_embd.weight
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_LINEARS:
            name = f"model.layers.{parts[1]}.{LAYER_LINEARS[parts[2]]}"
        elif tensor.name == "output.weight" or (tensor.name == "token_embd.weight" and tied_lm_head):
            name = "lm_head"
        else:
            continue
        raw = torch.from_numpy(np.array(tensor.data, dtype=np.uint8))  # [N, K / 32 * 34], a copy
        blocks = raw.reshape(raw.shape[0], -1, 2 + Q8_0_BLOCK)  # [N, G, 34]
        scales = blocks[..., :2].contiguous().view(torch.float16).float().squeeze(-1)  # [N, G]
        q = blocks[..., 2:].contiguous().view(torch.int8).reshape(raw.shape[0], -1)  # [N, K]
        if arch in PERMUTED and heads and name.endswith(("q_proj", "k_proj")):
            n = heads if name.endswith("q_proj") else (kv_heads or heads)
            q, scales = reverse_permute(q, n), reverse_permute(scales, n)
        if tensor.name != "token_embd.weight" or "lm_head" not in found:  # output.weight wins
            found[name] = (q, scales)
    log.info("%s: %d linear weights are Q8_0, kept as int8 blocks", path.name, len(found))
    return found
