"""Prefix files: the native `prefix-server/v1` layout, and loading either it or a PEFT adapter (peft.py).

Native: tensors "keys" and "values" [num_layers, kv_heads, num_virtual_tokens, head_dim] plus metadata
"format" = FORMAT_NAME and the model fingerprint. Both are safetensors files (safetensors_header.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import safetensors.torch
import torch

from server.errors import PrefixFormatError, shown
from server.registry.peft import PEFT_NAMES, peft_keys_values, to_peft
from server.registry.safetensors_header import (
    MAX_HEADER_BYTES,
    check_tokens,
    load_tensors,
    parse_header,
    read_metadata,
)

# Names other modules import from here, where they lived before the PEFT and header code moved out.
__all__ = [
    "FORMAT_NAME",
    "MAX_HEADER_BYTES",
    "ModelFingerprint",
    "PrefixKV",
    "load_prefix",
    "read_metadata",
    "save_native",
    "to_peft",
]

FORMAT_NAME = "prefix-server/v1"
_DTYPES = ("F32", "F16", "BF16")
_NATIVE_NAMES = ["keys", "values"]
_FIELD_WORDS = {"num_layers": "{} layers", "kv_heads": "{} kv heads", "head_dim": "head dim {}"}
_RESERVED_METADATA = ("format", "architecture", "num_layers", "kv_heads", "head_dim", "num_virtual_tokens")


@dataclass(frozen=True)
class ModelFingerprint:
    """What a prefix must match in a base model: its architecture and KV-cache geometry."""

    architecture: str  # config.model_type, e.g. "llama"
    num_layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Any) -> ModelFingerprint:
        """Fingerprint of a HF config (its text part if it has one), sized the way PEFT sizes prefixes."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        heads = config.num_attention_heads
        return cls(
            architecture=config.model_type,
            num_layers=config.num_hidden_layers,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        )

    def to_metadata(self) -> dict[str, str]:
        """The fingerprint as safetensors metadata (str -> str)."""
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_metadata(cls, md: dict[str, str]) -> ModelFingerprint:
        """Read `to_metadata` output; PrefixFormatError if a field is missing or not a positive int."""
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in md]
        if missing:
            raise PrefixFormatError(
                f"prefix metadata lacks {', '.join(missing)}; expected all of {', '.join(names)}"
            )
        for name in names[1:]:
            # At most 18 digits: int() refuses strings of over 4300 digits with a ValueError of its own.
            value = md[name]
            if not (isinstance(value, str) and value.isdecimal() and len(value) <= 18 and int(value) > 0):
                raise PrefixFormatError(f"prefix metadata {name}={shown(value)}, expected a positive integer")
        return cls(str(md["architecture"]), *(int(md[n]) for n in names[1:]))

    def check(self, other: ModelFingerprint) -> None:
        """Raise PrefixFormatError naming the first field where `other` (prefix) differs from self (model)."""
        if other.architecture != self.architecture:
            raise PrefixFormatError(
                f"prefix was made for architecture {shown(other.architecture)}, model is {self.architecture!r}"
            )
        for name, what in _FIELD_WORDS.items():
            got, want = getattr(other, name), getattr(self, name)
            if got != want:
                raise PrefixFormatError(f"prefix has {what.format(got)}, model has {what.format(want)}")


@dataclass(frozen=True, eq=False)
class PrefixKV:
    """One task's prefix as per-layer attention keys/values (no rotary applied: they go into the cache as is).

    keys, values: [num_layers, kv_heads, num_virtual_tokens, head_dim]
    """

    keys: torch.Tensor  # [num_layers, kv_heads, num_virtual_tokens, head_dim]
    values: torch.Tensor  # [num_layers, kv_heads, num_virtual_tokens, head_dim]
    fingerprint: ModelFingerprint

    def __post_init__(self) -> None:
        fp = self.fingerprint
        want = [fp.num_layers, fp.kv_heads, self.keys.shape[2] if self.keys.dim() == 4 else -1, fp.head_dim]
        for name, t in (("keys", self.keys), ("values", self.values)):
            if list(t.shape) != want:
                raise ValueError(f"PrefixKV.{name} has shape {list(t.shape)}, expected {want}")

    @property
    def num_virtual_tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held by keys and values together."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PrefixKV:
        """The same prefix on another device and/or in another dtype."""
        return PrefixKV(
            self.keys.to(device=device, dtype=dtype),
            self.values.to(device=device, dtype=dtype),
            self.fingerprint,
        )


def load_prefix(
    data: bytes,
    expected: ModelFingerprint,
    *,
    adapter_config: bytes | None = None,
    max_virtual_tokens: int = 256,
    dtype: torch.dtype = torch.float32,
) -> PrefixKV:
    """Read a native or PEFT prefix file, validated against `expected` (the base model).

    Returns keys, values: [num_layers, kv_heads, num_virtual_tokens, head_dim], contiguous, in `dtype`.
    """
    data = bytes(data)
    header, metadata = parse_header(data)
    names = sorted(header)
    fmt = metadata.get("format")
    if fmt != FORMAT_NAME and str(fmt).startswith("prefix-server/"):  # HF/PEFT files say format="pt"
        raise PrefixFormatError(f"unknown prefix format {shown(fmt)}, expected {FORMAT_NAME!r}")
    if names != (_NATIVE_NAMES if fmt == FORMAT_NAME else PEFT_NAMES):
        raise PrefixFormatError(
            f"found tensors {shown(names)}, expected {_NATIVE_NAMES} with metadata format={FORMAT_NAME!r}, "
            f"or {PEFT_NAMES} (PEFT prefix tuning)"
        )
    for name in names:
        if header[name]["dtype"] not in _DTYPES:
            raise PrefixFormatError(
                f"tensor {shown(name)} has dtype {shown(header[name]['dtype'], quoted=False)}, expected one of "
                f"{', '.join(_DTYPES)}"
            )
    L, kv, D = expected.num_layers, expected.kv_heads, expected.head_dim

    if fmt == FORMAT_NAME:
        expected.check(ModelFingerprint.from_metadata(metadata))
        k_shape, v_shape = header["keys"]["shape"], header["values"]["shape"]
        if k_shape != v_shape:
            raise PrefixFormatError(f"keys shape {k_shape} differs from values shape {v_shape}")
        if len(k_shape) != 4 or [k_shape[0], k_shape[1], k_shape[3]] != [L, kv, D]:
            raise PrefixFormatError(
                f"keys/values have shape {k_shape}, expected [num_layers, kv_heads, num_virtual_tokens, "
                f"head_dim] = [{L}, {kv}, P, {D}]"
            )
        P = k_shape[2]
        if metadata.get("num_virtual_tokens", str(P)) != str(P):
            raise PrefixFormatError(
                f"metadata says {shown(metadata['num_virtual_tokens'], quoted=False)} virtual tokens, tensors have {P}"
            )
        check_tokens(P, max_virtual_tokens)
        tensors = load_tensors(data)
        keys, values = tensors["keys"], tensors["values"]  # [L, kv, P, D]
    else:
        keys, values = peft_keys_values(data, header, expected, adapter_config, max_virtual_tokens)

    if not (torch.isfinite(keys).all() and torch.isfinite(values).all()):
        raise PrefixFormatError("prefix contains NaN or Inf values")
    keys, values = keys.to(dtype).contiguous(), values.to(dtype).contiguous()
    if not (torch.isfinite(keys).all() and torch.isfinite(values).all()):
        raise PrefixFormatError(f"prefix values overflow {dtype}")
    fingerprint = ModelFingerprint(expected.architecture, L, kv, D)  # PEFT files carry no architecture
    return PrefixKV(keys, values, fingerprint)


def save_native(prefix: PrefixKV, extra_metadata: dict[str, str] | None = None) -> bytes:
    """Serialize a prefix as `prefix-server/v1` safetensors bytes.

    Tensors "keys", "values": [num_layers, kv_heads, num_virtual_tokens, head_dim]
    """
    extra = dict(extra_metadata or {})
    clash = sorted(set(extra) & set(_RESERVED_METADATA))
    if clash:
        raise ValueError(f"extra_metadata may not set reserved keys {clash}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise ValueError("extra_metadata must map str to str")
    metadata = {
        **extra,
        "format": FORMAT_NAME,
        **prefix.fingerprint.to_metadata(),
        "num_virtual_tokens": str(prefix.num_virtual_tokens),
    }
    tensors = {
        "keys": prefix.keys.detach().cpu().contiguous(),  # [L, kv, P, D]
        "values": prefix.values.detach().cpu().contiguous(),  # [L, kv, P, D]
    }
    return safetensors.torch.save(tensors, metadata=metadata)
