"""A GGUF's Q8_0 linears kept as int8 blocks (server/engine/gguf_int8.py): names, the query/key row
permutation undone as transformers' loader undoes it, and the default model's tied lm_head (its Q8_0
token embedding) served from its own blocks, also when the model loads in bfloat16. A GGUF whose linears are
all Q8_0 loads from its blocks without the float cache, as the same model the float cache gives; any other
keeps the float cache."""

from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

import server.engine.model as model_module
from server.config import Settings
from server.engine.gguf_int8 import not_all_q8_0, open_gguf, q8_0_linears, reverse_permute
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
    assert not_all_q8_0(open_gguf(default_gguf_path())) == "blk.0.attn_q.weight is Q4_1, not Q8_0"
    blocks = q8_0_linears(default_gguf_path(), tied_lm_head=True)
    assert list(blocks) == ["lm_head"]  # the linears of this GGUF are Q4_1: it keeps the float cache
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


# ---- a whole model's GGUF: loaded from its blocks, or through the float cache ----
LAYERS, HEADS, KV_HEADS = 2, 4, 2
TOKENS = ["<|endoftext|>", "<pad>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "he", "ll"]


def write_model_gguf(path, arch: str = "llama", tied: bool = True, not_q8_0: tuple[str, ...] = ()) -> None:
    """A small random Llama-family model as llama.cpp's converter writes it: the metadata transformers reads
    its config from, a byte-level BPE vocabulary, the query/key rows permuted for `llama`; every 2-D tensor
    (the linears, the token embedding) Q8_0 except those named in `not_q8_0` (float32), the others float32.
    `tied`: no output.weight (the lm_head is the token embedding). qwen2 has query/key/value biases."""
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](
        vocab_size=len(TOKENS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(TOKENS))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (len(TOKENS) - 2))
    writer.add_token_merges(["h e", "l l"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(1)
    names = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2, LAYERS
    )
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        module, _, suffix = hf_name.rpartition(".")
        name = f"{names.get_name(module)}.{suffix}"
        w = (t * 4 if t.dim() == 2 else t + 0.1 * torch.randn_like(t)).numpy()  # [N, K] or [N]: not all 1s
        if arch == "llama" and ".attn_q." in name:
            w = permute(w, HEADS)
        elif arch == "llama" and ".attn_k." in name:
            w = permute(w, KV_HEADS)
        if w.ndim == 2 and name not in not_q8_0:
            writer.add_tensor(name, gguf.quants.quantize(w, Q8_0), raw_dtype=Q8_0)
        else:
            writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def float_cache_folders(cache_dir) -> list[str]:
    """The converted (float safetensors) models in a model cache."""
    return sorted(p.name for p in cache_dir.iterdir() if any(p.glob("*.safetensors")))


def logits_and_greedy(loaded, steps: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Two padded prompts' logits [2, T, V] and `steps` greedy tokens after each [2, steps]."""
    batch = loaded.tokenizer(["hello world", "the cat sat on a mat"], return_tensors="pt", padding=True)
    ids, mask = batch.input_ids, batch.attention_mask
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids, attention_mask=mask).logits
        for _ in range(steps):
            step = loaded.model(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, step], dim=1), torch.cat([mask, torch.ones_like(step)], dim=1)
    return logits, ids[:, -steps:]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["int8", "w8a8"])
@pytest.mark.parametrize("arch, tied", [("llama", True), ("qwen2", False)])
def test_an_all_q8_0_gguf_loads_from_its_blocks_as_the_float_cache_would(
    tmp_path, monkeypatch, caplog, arch, tied, mode, dtype
):
    """With --quantize, a GGUF whose linears are all Q8_0 loads from its blocks, without the float cache
    (only its config and tokenizer are saved), and is the same model as the float cache plus the blocks
    gives: every tensor, the logits and the greedy tokens equal. llama: tied lm_head (its blocks are the
    token embedding's, which the embedding keeps dequantized), query/key rows permuted; qwen2: an
    output.weight of its own and query/key/value biases."""
    path = tmp_path / f"tiny-{arch}.Q8_0.gguf"
    write_model_gguf(path, arch, tied)
    with caplog.at_level(logging.INFO, logger="server.engine.model"):
        direct = load_model(str(path), dtype=dtype, cache_dir=tmp_path / "direct", quantize=mode)
    assert f"loading {path.name} from its Q8_0 blocks directly (no float cache)" in caplog.text
    assert float_cache_folders(tmp_path / "direct") == []
    assert [p.suffix for p in (tmp_path / "direct").iterdir() if p.is_dir()] == [".config"]
    monkeypatch.setattr(model_module, "not_all_q8_0", lambda reader: "today's path, for the comparison")
    cached = load_model(str(path), dtype=dtype, cache_dir=tmp_path / "cached", quantize=mode)
    assert len(float_cache_folders(tmp_path / "cached")) == 1

    model = direct.model
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.weight.dtype == torch.int8
    assert model.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    want = cached.model.state_dict()
    got = model.state_dict()
    assert sorted(got) == sorted(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    assert not any(t.is_meta for t in got.values())
    config, want_config = model.config.to_dict(), cached.model.config.to_dict()
    differ = {k for k in config.keys() | want_config.keys() if config.get(k) != want_config.get(k)}
    assert differ <= {"_name_or_path", "architectures"}  # what saving a model adds to its config.json
    assert model.generation_config == cached.model.generation_config
    assert direct.tokenizer("hello world").input_ids == cached.tokenizer("hello world").input_ids
    (logits, greedy), (want_logits, want_greedy) = logits_and_greedy(direct), logits_and_greedy(cached)
    assert torch.equal(logits, want_logits) and torch.equal(greedy, want_greedy)
    assert direct.source == str(path)


def test_a_gguf_with_a_linear_not_q8_0_keeps_the_float_cache(tmp_path, caplog):
    """One linear in float32: the model loads through the float cache (and says why), its Q8_0 linears
    still from their blocks."""
    path = tmp_path / "mixed.gguf"
    write_model_gguf(path, not_q8_0=("blk.1.ffn_up.weight",))
    with caplog.at_level(logging.INFO):
        loaded = load_model(str(path), dtype="float32", cache_dir=tmp_path / "cache", quantize="int8")
    assert (
        "through the float cache (not from its Q8_0 blocks alone): blk.1.ffn_up.weight is F32" in caplog.text
    )
    assert "directly" not in caplog.text
    assert "15 linears to int8 (a scale per 32 weights; 14 blocks taken as they were)" in caplog.text
    assert len(float_cache_folders(tmp_path / "cache")) == 1
    assert isinstance(loaded.model.model.layers[1].mlp.up_proj, Int8Linear)


def test_quantize_off_keeps_the_float_cache(tmp_path, caplog):
    path = tmp_path / "all.Q8_0.gguf"
    write_model_gguf(path)
    with caplog.at_level(logging.INFO):
        loaded = load_model(str(path), dtype="float32", cache_dir=tmp_path / "cache")
    assert "directly" not in caplog.text
    assert len(float_cache_folders(tmp_path / "cache")) == 1
    assert type(loaded.model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_which_ggufs_load_from_their_blocks_alone(tmp_path):
    """Every layer linear and the lm_head Q8_0 (output.weight, or the token embedding when tied), in an
    architecture whose names map; the reason otherwise."""
    cases = {
        "all.gguf": ({}, None),
        "untied.gguf": ({"tied": False}, None),
        "embedding.gguf": ({"not_q8_0": ("token_embd.weight",)}, "token_embd.weight is F32, not Q8_0"),
        "output.gguf": ({"tied": False, "not_q8_0": ("output.weight",)}, "output.weight is F32, not Q8_0"),
        "untied_embedding.gguf": ({"tied": False, "not_q8_0": ("token_embd.weight",)}, None),  # a lookup
        "v.gguf": ({"not_q8_0": ("blk.0.attn_v.weight",)}, "blk.0.attn_v.weight is F32, not Q8_0"),
    }
    for name, (kwargs, why) in cases.items():
        write_model_gguf(tmp_path / name, **kwargs)
        assert not_all_q8_0(open_gguf(tmp_path / name)) == why, name
    write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"blk.0.attn_q.weight": (np.ones((32, 32), np.float32), True)})
    assert (
        not_all_q8_0(open_gguf(tmp_path / "gpt2.gguf"))
        == "architecture 'gpt2' is none of llama, qwen2, qwen3"
    )
    write_gguf(
        tmp_path / "partial.gguf", "llama", {"blk.0.attn_q.weight": (np.ones((32, 32), np.float32), True)}
    )
    assert not_all_q8_0(open_gguf(tmp_path / "partial.gguf")) == "it has no llama.block_count"


def test_int8_linear_from_a_meta_linear_takes_its_blocks_device_and_needs_them():
    """A linear built without weights (meta) becomes an Int8Linear of its blocks, on their device, with
    its (real) bias; without blocks, or with a meta bias, it is refused."""
    with torch.device("meta"):
        lin = torch.nn.Linear(64, 16)
    lin.bias = torch.nn.Parameter(torch.randn(16))
    q, scales = quantize_int8(torch.randn(16, 64))
    layer = Int8Linear(lin, None, (q, scales))
    assert (
        layer.weight.device.type == "cpu"
        and torch.equal(layer.weight, q)
        and torch.equal(layer.bias, lin.bias)
    )
    x = torch.randn(3, 64)
    torch.testing.assert_close(
        layer(x), x @ (q.float().reshape(16, 2, 32) * scales[:, :, None]).reshape(16, 64).T + lin.bias
    )
    with pytest.raises(
        ValueError, match="on the meta device needs its int8 blocks and a real bias, got no blocks"
    ):
        Int8Linear(lin)
    with torch.device("meta"):
        meta_bias = torch.nn.Linear(64, 16)
    with pytest.raises(ValueError, match="got a meta bias"):
        Int8Linear(meta_bias, None, (q, scales))
    with pytest.raises(ValueError, match=r"expected int8 \(16, 64\) and scales \(16, 2\)"):
        Int8Linear(lin, None, (q[:, :32], scales))


def test_the_config_and_tokenizer_folder_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """The direct load's only cache: a failed write leaves no folder a later start would trust, and the next
    writer removes what a dead one left."""
    path = tmp_path / "all.Q8_0.gguf"
    write_model_gguf(path)
    cache = tmp_path / "cache"

    def dies(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill midway would stop it: after the config, before the tokenizer

    with monkeypatch.context() as m:
        m.setattr(model_module.AutoTokenizer, "from_pretrained", dies)
        with pytest.raises(KeyboardInterrupt):
            model_module.gguf_config_and_tokenizer(path, cache)
    assert [p.name for p in cache.iterdir() if p.is_dir()] == []
    stale = cache / f".converting-{model_module._cache_name(path)}.config-dead"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    folder = model_module.gguf_config_and_tokenizer(path, cache)
    assert not stale.exists() and (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [folder.name]
