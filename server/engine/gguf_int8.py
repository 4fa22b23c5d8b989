"""A GGUF's Q8_0 blocks, kept as they are for `--quantize int8 | w8a8`.

A Q8_0 tensor is, per row, blocks of 32 int8 weights along K with one float16 scale each: the layout
engine/quantize.py rounds to. So its linears take the GGUF's integers and scales directly, instead of
re-rounding the dequantized float weights (which gives the same blocks only when those floats are float32:
in bfloat16 they are rounded first).

Two ways in, as engine/model.py `load_model` picks:
  - every linear Q8_0 (those of every decoder layer and the lm_head: `output.weight`, or `token_embd.weight`
    when tied) and an architecture below: `load_from_blocks` builds the model without float weights for
    its linears (their parameters stay on the meta device until they become Int8Linears), dequantizes
    only the other tensors (embedding, norms, biases), and never writes the float cache;
  - otherwise (the default model's linears are Q4_1): the model loads from the float cache that
    `convert_gguf` makes once, and those linears that are Q8_0 take their blocks (`q8_0_linears`).
Both give the same model (tests/test_gguf_int8.py compares their logits).

Names and layout follow transformers' GGUF loader (modeling_gguf_pytorch_utils): tensor names map through
gguf-py's name map as there, and llama.cpp's converter permutes the rows of the query and key weights of
`llama` models for its rotary layout, which the loader permutes back; the same row permutation is applied
here to the blocks (a row keeps its blocks) and to a query/key bias.
"""

from __future__ import annotations

import logging
from itertools import chain
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from accelerate import init_empty_weights
from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFReader, get_tensor_name_map
from gguf.quants import dequantize
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from server.engine.quantize import quantize_model
from server.errors import UnsupportedModel

log = logging.getLogger(__name__)
Rows = TypeVar("Rows", torch.Tensor, np.ndarray)

Q8_0 = GGMLQuantizationType.Q8_0
Q8_0_BLOCK = 32  # weights per block; a block is 2 bytes of float16 scale + 32 int8
Q8_0_LAYOUT = np.dtype([("d", "<f2"), ("qs", "i1", (Q8_0_BLOCK,))])  # one block: 34 bytes
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


def open_gguf(source: Path | GGUFReader) -> GGUFReader:
    """A reader of the file, or the one given: opening one parses all the metadata (~2 s for SmolLM2's
    49k-token vocabulary), so one reader is passed around rather than opened again. Its `tokenizer.*`
    fields are dropped: nothing here reads them (the tokenizer is transformers'), and their ~100k small
    arrays hold ~130 MB for as long as the reader lives."""
    if isinstance(source, GGUFReader):
        return source
    reader = GGUFReader(source)
    for key in [key for key in reader.fields if key.startswith("tokenizer.")]:
        del reader.fields[key]
    return reader


def architecture(reader: GGUFReader) -> str:
    field = reader.fields.get("general.architecture")
    return bytes(field.parts[field.data[0]]).decode() if field is not None else ""


def _file_name(reader: GGUFReader) -> str:
    return Path(reader.data.filename).name


def _number(reader: GGUFReader, key: str) -> int | None:
    field = reader.fields.get(key)
    return int(field.parts[field.data[0]][0]) if field is not None else None


def not_all_q8_0(reader: GGUFReader) -> str | None:
    """Why this GGUF cannot load from its blocks alone (`load_from_blocks`), or None when it can: its
    architecture is one of ARCHITECTURES and every linear weight is Q8_0: each of LAYER_LINEARS in every
    block, and the lm_head's (`output.weight`, or `token_embd.weight` when there is none: tied, as
    transformers' loader decides)."""
    arch = architecture(reader)
    if arch not in ARCHITECTURES:
        return f"architecture {arch!r} is none of {', '.join(ARCHITECTURES)}"
    layers = _number(reader, f"{arch}.block_count")
    if layers is None:
        return f"it has no {arch}.block_count"
    types = {t.name: t.tensor_type for t in reader.tensors}
    head = "output.weight" if "output.weight" in types else "token_embd.weight"
    for name in [f"blk.{i}.{linear}.weight" for i in range(layers) for linear in LAYER_LINEARS] + [head]:
        kind = types.get(name)
        if kind != Q8_0:
            return f"{name} is {'missing' if kind is None else kind.name}, not Q8_0"
    return None


def reverse_permute(rows: Rows, heads: int) -> Rows:
    """Undo llama.cpp's query/key row permutation (transformers' `_reverse_permute_weights`) on a tensor or
    array whose first dimension is the weight's rows: [N, ...] -> [N, ...]."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def q8_0_linears(
    source: Path | GGUFReader, tied_lm_head: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name ('model.layers.3.mlp.down_proj', 'lm_head') -> (int8 [N, K], float32 scales [N, K / 32])
    for every linear weight the GGUF holds as Q8_0. The lm_head comes from `output.weight`, or from
    `token_embd.weight` when the model ties them (as SmolLM2 does). Empty for other architectures."""
    reader = open_gguf(source)
    arch = architecture(reader)
    if arch not in ARCHITECTURES:
        return {}
    heads = _number(reader, f"{arch}.attention.head_count")
    kv_heads = _number(reader, f"{arch}.attention.head_count_kv")
    found = {}
    for tensor in reader.tensors:
        if tensor.tensor_type != Q8_0:
            continue
        parts = tensor.name.split(".")  # blk.3.ffn_down.weight | output.weight | token_embd.weight
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_LINEARS:
            name = f"model.layers.{parts[1]}.{LAYER_LINEARS[parts[2]]}"
        elif tensor.name == "output.weight" or (tensor.name == "token_embd.weight" and tied_lm_head):
            name = "lm_head"
        else:
            continue
        # Split in numpy (0.1 s for SmolLM2's): torch's strided byte copies took 2.5 s with the other core busy
        blocks = np.asarray(tensor.data).view(Q8_0_LAYOUT)  # [N, G] blocks, a view of the file
        q = np.array(blocks["qs"], order="C").reshape(blocks.shape[0], -1)  # [N, K] int8, a copy
        scales = blocks["d"].astype(np.float32)  # [N, G]
        if arch in PERMUTED and heads and name.endswith(("q_proj", "k_proj")):
            n = heads if name.endswith("q_proj") else (kv_heads or heads)
            q, scales = reverse_permute(q, n), reverse_permute(scales, n)
        if tensor.name != "token_embd.weight" or "lm_head" not in found:  # output.weight wins
            found[name] = (torch.from_numpy(q), torch.from_numpy(scales))
    log.info("%s: %d linear weights are Q8_0, kept as int8 blocks", _file_name(reader), len(found))
    return found


def load_from_blocks(
    reader: GGUFReader, config: PretrainedConfig, dtype: torch.dtype, device: torch.device, mode: str
) -> PreTrainedModel:
    """The model of a GGUF whose linears are all Q8_0 (`not_all_q8_0` None), quantized by `mode` ('int8' or
    'w8a8') without a float weight for any linear: the skeleton's parameters start on the meta device, the
    other tensors (embedding, norms, biases) are dequantized from the GGUF into `dtype` on `device`, and
    each linear becomes an Int8Linear of its blocks. The same model as the float cache plus blocks gives."""
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary) computed as usual
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    linears = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    from_blocks = {f"{name}.weight" for name in linears}
    tensors = _float_tensors(reader, model, from_blocks, dtype, device)  # first: its peak is the lower
    try:
        missing = set(model.load_state_dict(tensors, strict=False, assign=True).missing_keys) - from_blocks
    except RuntimeError as e:  # a shape that is not the config's
        raise UnsupportedModel(f"{_file_name(reader)}: {e}") from e
    if missing:
        raise UnsupportedModel(f"{_file_name(reader)} has no tensor for {sorted(missing)}")
    del tensors
    tied = bool(getattr(config, "tie_word_embeddings", False))
    blocks = {name: (q.to(device), s.to(device)) for name, (q, s) in q8_0_linears(reader, tied).items()}
    model = quantize_model(model, mode, blocks=blocks)  # every linear (meta until now) from its blocks
    left = [name for name, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise UnsupportedModel(f"{_file_name(reader)}: no weights for {left}")
    return model.to(device)  # the buffers; the rest is there already


def _float_tensors(
    reader: GGUFReader, model: PreTrainedModel, skip: set[str], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """State-dict name -> the GGUF's tensor for it, dequantized to float32 and then cast to `dtype` (as
    transformers' loader and the float cache give it), for every one the GGUF has but the names in `skip`."""
    arch = architecture(reader)
    arch_key = next(key for key, value in MODEL_ARCH_NAMES.items() if value == arch)
    name_map = get_tensor_name_map(arch_key, model.config.num_hidden_layers)
    wanted = {}  # GGUF name -> state-dict name, as transformers' get_gguf_hf_weights_map maps them
    for hf_name in model.state_dict():
        module, _, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(module)
        if gguf_name is not None and hf_name not in skip:
            wanted[f"{gguf_name}.{suffix}"] = hf_name
    heads = {"attn_q": model.config.num_attention_heads, "attn_k": model.config.num_key_value_heads}
    tensors = {}
    for tensor in reader.tensors:
        if tensor.name not in wanted:
            continue
        weights = dequantize(tensor.data, tensor.tensor_type)  # float32, a new array or a view of the file
        weights = torch.from_numpy(weights if weights.flags.writeable else weights.copy())
        part = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else ""
        if arch in PERMUTED and part in heads:  # a query/key bias (their weights are blocks)
            weights = reverse_permute(weights, heads[part])
        tensors[wanted[tensor.name]] = weights.to(device, dtype)
    return tensors
