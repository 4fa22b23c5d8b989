"""Prefix file formats: native round trips, PEFT interop against PEFT itself, and every error path."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from server.errors import PrefixFormatError
from server.registry.format import (
    FORMAT_NAME,
    ModelFingerprint,
    PrefixKV,
    load_prefix,
    read_metadata,
    save_native,
    to_peft,
)

LLAMA_FP = ModelFingerprint("llama", num_layers=2, kv_heads=2, head_dim=16)


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )


def gpt2_config() -> GPT2Config:
    return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=256)


CONFIGS = {"llama": llama_config, "gpt2": gpt2_config}
MODELS = {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel}


def tiny_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[arch](CONFIGS[arch]()).eval()


def random_prefix(fp: ModelFingerprint = LLAMA_FP, p: int = 5, seed: int = 0) -> PrefixKV:
    g = torch.Generator().manual_seed(seed)
    shape = (fp.num_layers, fp.kv_heads, p, fp.head_dim)  # [L, kv, P, D]
    return PrefixKV(torch.randn(shape, generator=g), torch.randn(shape, generator=g), fp)


def peft_layers(peft_model: PeftModel) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's own per-layer prefix: [(key, value)], each [kv, P, D] (batch 1 squeezed)."""
    cache = peft_model.get_prompt(batch_size=1)  # transformers 5: a DynamicCache
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]


def assert_matches_peft(prefix: PrefixKV, peft_model: PeftModel) -> None:
    layers = peft_layers(peft_model)
    assert len(layers) == prefix.fingerprint.num_layers
    for i, (k, v) in enumerate(layers):
        assert torch.equal(prefix.keys[i], k), f"layer {i} keys differ"
        assert torch.equal(prefix.values[i], v), f"layer {i} values differ"


def raw_safetensors(header: dict, body: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + body


# --- fingerprints -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "expected"),
    [("llama", LLAMA_FP), ("gpt2", ModelFingerprint("gpt2", num_layers=2, kv_heads=4, head_dim=16))],
)
def test_fingerprint_from_config(arch: str, expected: ModelFingerprint) -> None:
    assert ModelFingerprint.from_config(CONFIGS[arch]()) == expected


def test_fingerprint_metadata_round_trip() -> None:
    md = LLAMA_FP.to_metadata()
    assert md == {"architecture": "llama", "num_layers": "2", "kv_heads": "2", "head_dim": "16"}
    assert ModelFingerprint.from_metadata(md) == LLAMA_FP


@pytest.mark.parametrize(
    ("md", "match"),
    [
        ({"architecture": "llama", "num_layers": "2"}, "lacks kv_heads, head_dim"),
        ({**LLAMA_FP.to_metadata(), "kv_heads": "two"}, "kv_heads='two', expected a positive integer"),
        ({**LLAMA_FP.to_metadata(), "head_dim": "0"}, "head_dim='0', expected a positive integer"),
    ],
)
def test_fingerprint_from_metadata_errors(md: dict, match: str) -> None:
    with pytest.raises(PrefixFormatError, match=match):
        ModelFingerprint.from_metadata(md)


# --- PEFT interop -------------------------------------------------------------------------------


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_load_peft_adapter_matches_peft(arch: str, projection: bool, tmp_path: Path) -> None:
    model = tiny_model(arch)
    fp = ModelFingerprint.from_config(model.config)
    cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=projection)
    peft_model = get_peft_model(model, cfg)
    torch.nn.init.normal_(peft_model.prompt_encoder["default"].embedding.weight)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)

    data = (tmp_path / "adapter_model.safetensors").read_bytes()
    adapter_config = (tmp_path / "adapter_config.json").read_bytes()
    prefix = load_prefix(data, fp, adapter_config=adapter_config)
    assert prefix.fingerprint == fp
    assert prefix.num_virtual_tokens == 5
    assert prefix.keys.is_contiguous() and prefix.values.is_contiguous()
    assert_matches_peft(prefix, peft_model)  # with projection: the MLP output, as PEFT computes it
    # The config is optional; without it the same tensors come out.
    assert torch.equal(load_prefix(data, fp).keys, prefix.keys)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_to_peft_loads_in_peft(arch: str, tmp_path: Path) -> None:
    fp = ModelFingerprint.from_config(CONFIGS[arch]())
    prefix = random_prefix(fp, p=7)
    blob, config = to_peft(prefix, base_model_name="tiny")
    (tmp_path / "adapter_model.safetensors").write_bytes(blob)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    peft_model = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    assert peft_model.active_peft_config.num_virtual_tokens == 7
    assert_matches_peft(prefix, peft_model)
    # And back through our own loader.
    again = load_prefix(blob, fp, adapter_config=json.dumps(config).encode())
    assert torch.equal(again.keys, prefix.keys) and torch.equal(again.values, prefix.values)


# --- native format ------------------------------------------------------------------------------


def test_native_round_trip_exact() -> None:
    prefix = random_prefix(p=9)
    blob = save_native(prefix, extra_metadata={"task": "sentiment"})
    md = read_metadata(blob)
    assert md["format"] == FORMAT_NAME
    assert md["task"] == "sentiment" and md["num_virtual_tokens"] == "9"
    assert ModelFingerprint.from_metadata(md) == LLAMA_FP
    loaded = load_prefix(blob, LLAMA_FP)
    assert torch.equal(loaded.keys, prefix.keys) and torch.equal(loaded.values, prefix.values)
    assert loaded.fingerprint == LLAMA_FP
    assert torch.equal(load_prefix(memoryview(blob), LLAMA_FP).keys, prefix.keys)


def test_native_dtypes_and_prefix_helpers() -> None:
    prefix = random_prefix(p=4)
    as_bf16 = prefix.to(dtype=torch.bfloat16)
    assert as_bf16.keys.dtype == torch.bfloat16 and as_bf16.nbytes == prefix.nbytes // 2
    assert prefix.nbytes == 2 * 2 * 2 * 4 * 16 * 4
    loaded = load_prefix(save_native(as_bf16), LLAMA_FP)  # stored BF16, returned F32
    assert loaded.keys.dtype == torch.float32
    assert torch.equal(loaded.keys, as_bf16.keys.float())
    half = load_prefix(save_native(prefix), LLAMA_FP, dtype=torch.float16)
    assert half.values.dtype == torch.float16 and half.values.is_contiguous()


def test_read_metadata_without_metadata_and_bad_extra() -> None:
    assert read_metadata(safetensors.torch.save({"x": torch.zeros(2)})) == {}
    with pytest.raises(ValueError, match="reserved"):
        save_native(random_prefix(), extra_metadata={"num_layers": "3"})
    with pytest.raises(ValueError, match="shape"):
        PrefixKV(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 4, 16), LLAMA_FP)


# --- error paths --------------------------------------------------------------------------------


def native(fp: ModelFingerprint = LLAMA_FP, p: int = 5, fill: float | None = None) -> bytes:
    prefix = random_prefix(fp, p)
    if fill is not None:
        prefix.values[1, 0, 2, 3] = fill
    return save_native(prefix)


def peft_blob(p: int = 5, width: int = 2 * 2 * 2 * 16, fill: float | None = None) -> bytes:
    x = torch.randn(p, width)  # [P, L*2*kv*D]
    if fill is not None:
        x[0, 0] = fill
    return safetensors.torch.save({"prompt_embeddings": x})


def peft_config(**overrides: object) -> bytes:
    cfg = {"peft_type": "PREFIX_TUNING", "num_layers": 2, "num_attention_heads": 2, "token_dim": 32}
    return json.dumps({"num_virtual_tokens": 5, **cfg, **overrides}).encode()


def tensors(md: dict | None = None, **ts: torch.Tensor) -> bytes:
    return safetensors.torch.save(ts, metadata=md)


NATIVE_MD = {"format": FORMAT_NAME, **LLAMA_FP.to_metadata()}
VALID = native()

ERROR_CASES = {
    "layers": (native(ModelFingerprint("llama", 3, 2, 16)), {}, "prefix has 3 layers, model has 2"),
    "kv_heads": (native(ModelFingerprint("llama", 2, 4, 16)), {}, "prefix has 4 kv heads, model has 2"),
    "head_dim": (
        native(ModelFingerprint("llama", 2, 2, 8)),
        {},
        "prefix has head dim 8, model has head dim 16",
    ),
    "architecture": (
        native(ModelFingerprint("gpt2", 2, 2, 16)),
        {},
        "prefix was made for architecture 'gpt2', model is 'llama'",
    ),
    "dtype_int64": (
        tensors(NATIVE_MD, keys=torch.zeros(2, 2, 5, 16, dtype=torch.int64), values=torch.zeros(2, 2, 5, 16)),
        {},
        "tensor 'keys' has dtype I64, expected one of F32, F16, BF16",
    ),
    "nan": (native(fill=float("nan")), {}, "prefix contains NaN or Inf values"),
    "inf": (native(fill=float("-inf")), {}, "prefix contains NaN or Inf values"),
    "peft_inf": (peft_blob(fill=float("inf")), {}, "prefix contains NaN or Inf values"),
    "overflow_f16": (native(fill=1e6), {"dtype": torch.float16}, "prefix values overflow torch.float16"),
    "too_many_tokens": (native(p=10), {"max_virtual_tokens": 8}, "prefix has 10 virtual tokens, limit is 8"),
    "zero_tokens": (native(p=0), {}, "prefix has 0 virtual tokens, expected 1 to 256"),
    "peft_zero_tokens": (peft_blob(p=0), {}, "prefix has 0 virtual tokens, expected 1 to 256"),
    "truncated_data": (VALID[:-7], {}, r"truncated safetensors file: tensor '\w+' needs data up to byte \d+"),
    "truncated_header": (VALID[:40], {}, r"header length \d+ bytes, only 32 bytes follow"),
    "too_short": (b"abc", {}, "not a safetensors file: 3 bytes, expected at least 8"),
    "garbage": (
        b"this is not a safetensors file at all",
        {},
        r"header length \d+ bytes, expected at most 1048576",
    ),
    "huge_header": (
        struct.pack("<Q", 1 << 40) + b"{}",
        {},
        f"header length {1 << 40} bytes, expected at most",
    ),
    "header_not_json": (struct.pack("<Q", 4) + b"\xff{{{", {}, "header is not valid JSON"),
    "header_not_object": (raw_safetensors([1, 2]), {}, "header is a JSON list, expected object"),
    "malformed_entry": (
        raw_safetensors({"keys": {"dtype": "F32"}}),
        {},
        "malformed safetensors header entry",
    ),
    "wrong_names": (
        tensors(NATIVE_MD, k=torch.zeros(2, 2, 5, 16), v=torch.zeros(2, 2, 5, 16)),
        {},
        r"found tensors \['k', 'v'\], expected \['keys', 'values'\] .*or \['prompt_embeddings'\]",
    ),
    "native_names_without_format": (
        tensors(None, keys=torch.zeros(2, 2, 5, 16), values=torch.zeros(2, 2, 5, 16)),
        {},
        r"found tensors \['keys', 'values'\], expected .*format='prefix-server/v1'",
    ),
    "unknown_format": (
        tensors({"format": "prefix-server/v9"}, x=torch.zeros(1)),
        {},
        "unknown prefix format 'prefix-server/v9', expected 'prefix-server/v1'",
    ),
    "metadata_missing": (
        tensors({"format": FORMAT_NAME}, keys=torch.zeros(2, 2, 5, 16), values=torch.zeros(2, 2, 5, 16)),
        {},
        "prefix metadata lacks architecture, num_layers, kv_heads, head_dim",
    ),
    "metadata_token_count": (
        tensors(
            {**NATIVE_MD, "num_virtual_tokens": "4"},
            keys=torch.zeros(2, 2, 5, 16),
            values=torch.zeros(2, 2, 5, 16),
        ),
        {},
        "metadata says 4 virtual tokens, tensors have 5",
    ),
    "kv_shape_mismatch": (
        tensors(NATIVE_MD, keys=torch.zeros(2, 2, 5, 16), values=torch.zeros(2, 2, 4, 16)),
        {},
        r"keys shape \[2, 2, 5, 16\] differs from values shape \[2, 2, 4, 16\]",
    ),
    "native_rank": (
        tensors(NATIVE_MD, keys=torch.zeros(2, 2, 80), values=torch.zeros(2, 2, 80)),
        {},
        r"have shape \[2, 2, 80\], expected \[num_layers, kv_heads, num_virtual_tokens, head_dim\] "
        r"= \[2, 2, P, 16\]",
    ),
    "peft_width": (
        peft_blob(width=100),
        {},
        r"prompt_embeddings width 100, expected num_layers\*2\*kv_heads\*head_dim = 2\*2\*2\*16 = 128",
    ),
    "peft_rank": (
        tensors(None, prompt_embeddings=torch.zeros(5, 2, 64)),
        {},
        r"prompt_embeddings has shape \[5, 2, 64\], expected .* = \[P, 128\]",
    ),
    "peft_type_lora": (
        peft_blob(),
        {"adapter_config": peft_config(peft_type="LORA")},
        "adapter peft_type is 'LORA', expected 'PREFIX_TUNING'",
    ),
    "adapter_not_json": (
        peft_blob(),
        {"adapter_config": b"{not json"},
        "adapter_config.json is not valid JSON",
    ),
    "adapter_not_object": (peft_blob(), {"adapter_config": b"[]"}, "adapter_config.json is a JSON list"),
    "adapter_layers": (
        peft_blob(),
        {"adapter_config": peft_config(num_layers=3)},
        "adapter has 3 layers, model has 2",
    ),
    "adapter_heads": (
        peft_blob(),
        {"adapter_config": peft_config(num_attention_heads=4)},
        "adapter has 4 attention heads, model has 2 kv heads",
    ),
    "adapter_token_dim": (
        peft_blob(),
        {"adapter_config": peft_config(token_dim=64)},
        r"adapter token_dim is 64, expected kv_heads\*head_dim = 2\*16 = 32",
    ),
    "adapter_tokens": (
        peft_blob(),
        {"adapter_config": peft_config(num_virtual_tokens=6)},
        "adapter says 6 virtual tokens, prompt_embeddings has 5",
    ),
    "adapter_submodules": (
        peft_blob(),
        {"adapter_config": peft_config(num_transformer_submodules=2)},
        "num_transformer_submodules=2, expected 1",
    ),
    # Types are checked before values: "2" once read as a count and said "adapter has 2 layers, model
    # has 2"; 2.0 and true passed as 2 and 1.
    "adapter_layers_string": (
        peft_blob(),
        {"adapter_config": peft_config(num_layers="2")},
        r"^num_layers must be an integer, got '2' \(a string\)$",
    ),
    "adapter_heads_float": (
        peft_blob(),
        {"adapter_config": peft_config(num_attention_heads=2.0)},
        r"^num_attention_heads must be an integer, got 2.0 \(a number\)$",
    ),
    "adapter_tokens_bool": (
        peft_blob(p=1),
        {"adapter_config": peft_config(num_virtual_tokens=True)},
        r"^num_virtual_tokens must be an integer, got True \(a boolean\)$",
    ),
    "adapter_submodules_list": (
        peft_blob(),
        {"adapter_config": peft_config(num_transformer_submodules=[1])},
        r"^num_transformer_submodules must be an integer, got \[1\] \(an array\)$",
    ),
}


@pytest.mark.parametrize(("data", "kwargs", "match"), ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_load_errors(data: bytes, kwargs: dict, match: str) -> None:
    with pytest.raises(PrefixFormatError, match=match):
        load_prefix(data, LLAMA_FP, **kwargs)


def test_read_metadata_rejects_garbage() -> None:
    with pytest.raises(PrefixFormatError, match="not a safetensors file"):
        read_metadata(b"\x00" * 3)


@pytest.mark.parametrize(
    ("data", "kwargs"),
    [
        (peft_blob(), {"adapter_config": peft_config(peft_type="L" * 100_000)}),
        (peft_blob(), {"adapter_config": peft_config(num_layers="9" * 100_000)}),
        (peft_blob(), {"adapter_config": peft_config(num_layers=int("9" * 4000))}),  # an int, 4000 digits
        (tensors(None, **{"k" * 100_000: torch.zeros(1)}), {}),
        (
            tensors({**NATIVE_MD, "architecture": "a" * 100_000}, keys=torch.zeros(1), values=torch.zeros(1)),
            {},
        ),
        (tensors({"format": "prefix-server/" + "v" * 100_000}, keys=torch.zeros(1)), {}),
    ],
    ids=["peft_type", "num_layers", "num_layers_int", "tensor_name", "architecture", "format"],
)
def test_long_values_are_quoted_short(data: bytes, kwargs: dict) -> None:
    """A file's own strings in a message are cut (with their length): replies once reached ~1 MB."""
    with pytest.raises(PrefixFormatError) as e:
        load_prefix(data, LLAMA_FP, **kwargs)
    assert len(str(e.value)) < 500 and re.search(r"\.\.\. \(\d+ characters", str(e.value)), str(e.value)[:600]
