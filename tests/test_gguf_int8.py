"""A GGUF's Q8_0 linears kept as int8 blocks (server/engine/gguf_int8.py): names, the query/key row
permutation undone as transformers' loader undoes it, and the default model's tied lm_head (its Q8_0
token embedding) served from its own blocks, also when the model loads in bfloat16."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from server.config import Settings
from server.engine.gguf_int8 import q8_0_linears, reverse_permute
from server.engine.model import default_gguf_path, load_model
from server.engine.quantize import GROUP_SIZE, Int8Linear, quantize_int8

Q8_0 = gguf.GGMLQuantizationType.Q8_0


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute` of query/key rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_reverse(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' LlamaTensorProcessor._reverse_permute_weights."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def dequantized(blocks: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
    q, scales = blocks
    n, k = q.shape
    return (q.float().reshape(n, -1, GROUP_SIZE) * scales[:, :, None]).reshape(n, k).numpy()


def write_gguf(path, arch: str, tensors: dict[str, tuple[np.ndarray, bool]], heads=4, kv_heads=2) -> None:
    """A GGUF holding only `tensors` (name -> (float32 [N, K], as Q8_0?)), as llama.cpp's converter writes
    them: query/key rows permuted for `llama`."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    for name, (w, q8) in tensors.items():
        if arch == "llama" and ".attn_q." in name:
            w = permute(w, heads)
        elif arch == "llama" and ".attn_k." in name:
            w = permute(w, kv_heads)
        if q8:
            writer.add_tensor(name, gguf.quants.quantize(w, Q8_0), raw_dtype=Q8_0)
        else:
            writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q8_0_linears_are_what_transformers_loads_dequantized(tmp_path, arch):
    """Every Q8_0 linear, dequantized from the blocks returned, equals what transformers' GGUF loader makes
    of the same tensor (dequantized, rows un-permuted for llama's query and key); other types are left to
    the float path, and output.weight is the lm_head (the token embedding is not, when output exists)."""
    rng = np.random.default_rng(0)
    w = {
        name: rng.standard_normal(shape).astype(np.float32)
        for name, shape in {
            "blk.0.attn_q.weight": (64, 64),  # 4 heads of 16
            "blk.0.attn_k.weight": (32, 64),  # 2 K/V heads
            "blk.0.attn_v.weight": (32, 64),
            "blk.1.ffn_down.weight": (64, 96),
            "output.weight": (48, 64),
            "token_embd.weight": (48, 64),
        }.items()
    }
    path = tmp_path / "tiny.gguf"
    write_gguf(path, arch, {name: (t, name != "blk.0.attn_v.weight") for name, t in w.items()})
    blocks = q8_0_linears(path, tied_lm_head=True)
    assert sorted(blocks) == sorted(
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.k_proj",
            "model.layers.1.mlp.down_proj",
            "lm_head",
        ]
    )  # attn_v is float32 here: not Q8_0
    reader = gguf.GGUFReader(path)
    stored = {
        t.name: gguf.quants.dequantize(np.array(t.data), Q8_0)
        for t in reader.tensors
        if t.tensor_type == Q8_0
    }
    for gguf_name, module, heads in [
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj", 4),
        ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj", 2),
        ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj", None),
        ("output.weight", "lm_head", None),
    ]:
        want = stored[gguf_name]
        if arch == "llama" and heads:
            want = hf_reverse(want, heads)
        np.testing.assert_array_equal(dequantized(blocks[module]), want)
        q, scales = blocks[module]
        assert q.dtype == torch.int8 and scales.dtype == torch.float32
        assert q.shape == w[gguf_name].shape and scales.shape == (q.shape[0], q.shape[1] // GROUP_SIZE)
    # and the float weights they came from are within Q8_0's half step
    np.testing.assert_allclose(
        dequantized(blocks["model.layers.1.mlp.down_proj"]),
        w["blk.1.ffn_down.weight"],
        atol=np.abs(w["blk.1.ffn_down.weight"]).max() / 127,
    )


def test_reverse_permute_undoes_llama_cpps_permute():
    rows = torch.arange(64 * 3).reshape(64, 3)
    for heads in (1, 2, 4):
        permuted = torch.from_numpy(permute(rows.numpy(), heads))
        assert torch.equal(reverse_permute(permuted, heads), rows)


def test_other_architectures_keep_the_float_path(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, "gpt2", {"blk.0.attn_q.weight": (np.ones((32, 32), np.float32), True)})
    assert q8_0_linears(path, tied_lm_head=False) == {}


def test_int8_linear_takes_blocks_as_they_are():
    torch.manual_seed(3)
    lin = torch.nn.Linear(64, 16)
    q, scales = quantize_int8(torch.randn(16, 64))  # not the linear's own weight
    layer = Int8Linear(lin, None, (q, scales))
    assert torch.equal(layer.weight, q) and torch.equal(layer.scales, scales)
    with pytest.raises(
        ValueError, match=r"expected int8 \(16, 64\) and scales \(16, 2\), got torch.int8 \(16, 32\)"
    ):
        Int8Linear(lin, None, (q[:, :32], scales))


@pytest.mark.slow
def test_default_models_lm_head_keeps_its_q8_0_blocks_in_bfloat16():
    """SmolLM2's lm_head is tied to its Q8_0 token embedding: with --quantize int8 it is those blocks
    exactly, also when the model loads in bfloat16 (where re-rounding the bfloat16 embedding would not
    give them back); float32 re-rounding gives the same blocks."""
    blocks = q8_0_linears(default_gguf_path(), tied_lm_head=True)
    assert list(blocks) == ["lm_head"]  # the linears of this GGUF are Q4_1
    q, scales = blocks["lm_head"]
    loaded = load_model("default", dtype="float32", cache_dir=Settings().model_cache_dir)
    embedding = loaded.model.model.embed_tokens.weight
    assert torch.equal(
        torch.from_numpy(dequantized(blocks["lm_head"])), embedding
    )  # the converted cache is exact
    assert all(torch.equal(a, b) for a, b in zip(quantize_int8(embedding), (q, scales), strict=True))
    for dtype in ("float32", "bfloat16"):
        model = load_model(
            "default", dtype=dtype, quantize="int8", cache_dir=Settings().model_cache_dir
        ).model
        head = model.lm_head
        ops = torch.ops.prefix_server
        pack = {None: lambda t: t, "a16": ops.pack_a16, "q8": ops.pack_q8}[head.kernel]
        assert torch.equal(head.weight, pack(q)), dtype
        assert torch.equal(head.scales, scales if head.kernel is None else ops.pack_linear(scales)), dtype
