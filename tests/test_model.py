"""Base-model loading and the startup check that a model can take a prefix."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONFIGS, make_tiny_model
from transformers import AutoModelForCausalLM, MambaConfig, T5Config, T5ForConditionalGeneration

from server.config import Settings
from server.engine.engine import Engine
from server.engine.model import check_prefix_support, load_model, resolve_dtype
from server.errors import ConfigError, UnsupportedModel
from server.registry.format import ModelFingerprint


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_supported_families_pass_the_probe(family):
    fp = check_prefix_support(make_tiny_model(family))
    assert fp == ModelFingerprint.from_config(make_tiny_model(family).config)


def test_encoder_decoder_is_refused():
    model = T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
    )
    with pytest.raises(UnsupportedModel, match="encoder-decoder"):
        check_prefix_support(model)


def test_model_without_attention_cache_is_refused():
    config = MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=4)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModel, match="mamba"):
        check_prefix_support(model)


def test_load_model_from_a_local_folder(tmp_path, tokenizer):
    model = make_tiny_model("qwen2")
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), cache_dir=tmp_path / "cache")
    assert loaded.name == "m" and not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    ids = [5, 6, 7, 8]
    a, b = Engine(model, tokenizer), Engine(loaded.model, loaded.tokenizer)
    from server.request import Request, SamplingParams

    ra, rb = Request(ids, SamplingParams(max_new_tokens=5)), Request(ids, SamplingParams(max_new_tokens=5))
    a.generate([ra])
    b.generate([rb])
    assert ra.output_token_ids == rb.output_token_ids


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(UnsupportedModel, match="cannot load model"):
        load_model(str(tmp_path / "nope"), cache_dir=tmp_path)
    with pytest.raises(UnsupportedModel, match="no such GGUF file"):
        load_model(str(tmp_path / "nope.gguf"), cache_dir=tmp_path)


def test_dtype_defaults():
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    with pytest.raises(UnsupportedModel, match="dtype must be one of"):
        resolve_dtype("int8", torch.device("cpu"))


def test_settings_from_env_and_overrides(tmp_path):
    env = {
        "PREFIX_SERVER_PORT": "9001",
        "PREFIX_SERVER_MAX_BATCH_WAIT_MS": "2.5",
        "PREFIX_SERVER_PREFIX_DIR": str(tmp_path),
    }
    s = Settings.from_env({"port": 9002, "model": None}, environ=env)
    assert (s.port, s.max_batch_wait_ms, s.prefix_dir, s.model) == (9002, 2.5, tmp_path, "default")
    with pytest.raises(ConfigError, match="PREFIX_SERVER_PORT must be an integer, got 'eighty'"):
        Settings.from_env(environ={"PREFIX_SERVER_PORT": "eighty"})
    with pytest.raises(ConfigError, match="max_batch_size must be a positive integer"):
        Settings(max_batch_size=0)
