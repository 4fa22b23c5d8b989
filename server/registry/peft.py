"""PEFT prefix-tuning adapters: reading one as keys/values, and converting a prefix into one.

PEFT: one tensor "prompt_embeddings" [num_virtual_tokens, num_layers * 2 * kv_heads * head_dim]; layer
l's key is slot 2l, its value 2l+1; adapter_config.json says the counts, checked against the model.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import safetensors.torch
import torch

from server.errors import PrefixFormatError, shown
from server.registry.safetensors_header import check_tokens, load_tensors

if TYPE_CHECKING:
    from server.registry.format import ModelFingerprint, PrefixKV

PEFT_NAMES = ["prompt_embeddings"]

# adapter_config.json's counts that must match the model and the file, and what a mismatch says
_CONFIG_COUNTS = {
    "num_layers": "adapter has {got} layers, model has {want}",
    "num_attention_heads": "adapter has {got} attention heads, model has {want} kv heads",
    "token_dim": "adapter token_dim is {got}, expected kv_heads*head_dim = {fp.kv_heads}*{fp.head_dim} = {want}",
    "num_virtual_tokens": "adapter says {got} virtual tokens, prompt_embeddings has {want}",
}


def _json_kind(value: object) -> str:
    """What a JSON value is, in words: 'a string', 'a number', ..."""
    kinds = {bool: "a boolean", str: "a string", float: "a number", list: "an array", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def check_adapter_config(raw: bytes, fp: ModelFingerprint, num_virtual_tokens: int) -> None:
    """Validate PEFT's adapter_config.json against the model and the prompt_embeddings row count."""
    try:
        cfg = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise PrefixFormatError("adapter_config.json is not valid JSON") from None
    if not isinstance(cfg, dict):
        raise PrefixFormatError(f"adapter_config.json is a JSON {type(cfg).__name__}, expected an object")
    if cfg.get("peft_type") != "PREFIX_TUNING":
        raise PrefixFormatError(
            f"adapter peft_type is {shown(cfg.get('peft_type'))}, expected 'PREFIX_TUNING'"
        )
    for key in ("num_transformer_submodules", *_CONFIG_COUNTS):
        got = cfg.get(key)
        if got is not None and type(got) is not int:  # "30" would read as 30 in a message; true is no count
            raise PrefixFormatError(f"{key} must be an integer, got {shown(got)} ({_json_kind(got)})")
    if cfg.get("num_transformer_submodules") not in (None, 1):
        raise PrefixFormatError(
            f"adapter has num_transformer_submodules={shown(cfg['num_transformer_submodules'])}, "
            "expected 1 (decoder-only model)"
        )
    wants = {
        "num_layers": fp.num_layers,
        "num_attention_heads": fp.kv_heads,
        "token_dim": fp.kv_heads * fp.head_dim,
        "num_virtual_tokens": num_virtual_tokens,
    }
    for key, message in _CONFIG_COUNTS.items():
        got = cfg.get(key)
        if got is not None and got != wants[key]:
            raise PrefixFormatError(message.format(got=shown(got), want=wants[key], fp=fp))


def peft_keys_values(
    data: bytes,
    header: dict[str, dict],
    expected: ModelFingerprint,
    adapter_config: bytes | None,
    max_virtual_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """keys, values [num_layers, kv_heads, num_virtual_tokens, head_dim] of a PEFT file whose header
    `parse_header` read, validated against `expected` (and its adapter_config.json, if given)."""
    L, kv, D = expected.num_layers, expected.kv_heads, expected.head_dim
    shape = header["prompt_embeddings"]["shape"]
    width = L * 2 * kv * D
    if len(shape) != 2:
        raise PrefixFormatError(
            f"prompt_embeddings has shape {shape}, expected "
            f"[num_virtual_tokens, num_layers*2*kv_heads*head_dim] = [P, {width}]"
        )
    P, got_width = shape
    if adapter_config is not None:
        check_adapter_config(adapter_config, expected, P)
    if got_width != width:
        raise PrefixFormatError(
            f"prompt_embeddings width {got_width}, expected num_layers*2*kv_heads*head_dim = "
            f"{L}*2*{kv}*{D} = {width}"
        )
    check_tokens(P, max_virtual_tokens)
    x = load_tensors(data)["prompt_embeddings"]  # [P, L*2*kv*D]
    x = x.view(P, L * 2, kv, D).permute(1, 2, 0, 3)  # [L*2, kv, P, D]
    return x[0::2], x[1::2]  # each [L, kv, P, D]


def to_peft(prefix: PrefixKV, base_model_name: str | None = None) -> tuple[bytes, dict]:
    """Convert to a PEFT prefix-tuning adapter: (adapter_model.safetensors bytes, adapter_config dict).

    prompt_embeddings: [num_virtual_tokens, num_layers * 2 * kv_heads * head_dim]
    """
    fp, P = prefix.fingerprint, prefix.num_virtual_tokens
    L, kv, D = fp.num_layers, fp.kv_heads, fp.head_dim
    pairs = torch.stack([prefix.keys, prefix.values], dim=1).detach().cpu()  # [L, 2, kv, P, D]
    x = pairs.reshape(L * 2, kv, P, D).permute(2, 0, 1, 3).reshape(P, L * 2 * kv * D)  # [P, L*2*kv*D]
    blob = safetensors.torch.save({"prompt_embeddings": x.contiguous()})
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": P,
        "num_layers": L,
        "token_dim": kv * D,
        "num_attention_heads": kv,
        "encoder_hidden_size": kv * D,
        "num_transformer_submodules": 1,
        "prefix_projection": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name,
        "revision": None,
        "auto_mapping": None,
        "modules_to_save": None,
    }
    return blob, config
