"""Prefix files: the native `prefix-server/v1` layout and PEFT prefix-tuning adapters, both safetensors.

Native: tensors "keys" and "values" [num_layers, kv_heads, num_virtual_tokens, head_dim] plus metadata
"format" = FORMAT_NAME and the model fingerprint. PEFT: one tensor "prompt_embeddings"
[num_virtual_tokens, num_layers * 2 * kv_heads * head_dim]; layer l's key is slot 2l, its value 2l+1.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, fields
from typing import Any

import safetensors.torch
import torch

from server.errors import PrefixFormatError, shown

FORMAT_NAME = "prefix-server/v1"
MAX_HEADER_BYTES = 1 << 20
_DTYPES = ("F32", "F16", "BF16")
_NATIVE_NAMES = ["keys", "values"]
_PEFT_NAMES = ["prompt_embeddings"]
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


def _looks_like(data: bytes) -> str:
    """What a file whose first 8 bytes are no safetensors header length seems to be, and what to do."""
    head = data[:64].lstrip()
    if head[:1] in (b"{", b"["):
        return (
            "it starts like JSON text (a .json or .jsonl file?), but a prefix file is a .safetensors file "
            "(an 8-byte header length, a JSON header, then tensors). Training examples (JSONL) are for "
            "`prefix-server train`, which writes the .safetensors file to upload"
        )
    if head.startswith(b"PK"):
        return "it is a zip archive (torch.save?); expected a .safetensors file"
    size = struct.unpack("<Q", data[:8])[0]
    return (
        f"header length {size} bytes, expected at most {MAX_HEADER_BYTES} (the first 8 bytes of a "
        f".safetensors file; this one starts with {shown(data[:16])})"
    )


def _parse_header(data: bytes) -> tuple[dict[str, dict], dict[str, str]]:
    """Parse and sanity-check a safetensors header without touching tensor data: (entries, metadata)."""
    if len(data) < 8:
        raise PrefixFormatError(
            f"not a safetensors file: {len(data)} bytes, expected at least 8 (little-endian header length)"
        )
    (size,) = struct.unpack("<Q", data[:8])
    if size > MAX_HEADER_BYTES:
        raise PrefixFormatError(f"not a safetensors file: {_looks_like(data)}")
    if 8 + size > len(data):
        raise PrefixFormatError(
            f"not a safetensors file or truncated: header length {size} bytes, "
            f"only {len(data) - 8} bytes follow"
        )
    try:
        header = json.loads(data[8 : 8 + size])
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise PrefixFormatError("not a safetensors file: header is not valid JSON") from None
    if not isinstance(header, dict):
        raise PrefixFormatError(
            f"not a safetensors file: header is a JSON {type(header).__name__}, expected object"
        )
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PrefixFormatError("safetensors __metadata__ must map strings to strings")
    body = len(data) - 8 - size
    for name, entry in header.items():
        entry = entry if isinstance(entry, dict) else {}
        offsets = entry.get("data_offsets")
        if not (isinstance(entry.get("dtype"), str) and _ints(entry.get("shape")) and _ints(offsets, 2)):
            raise PrefixFormatError(
                f"malformed safetensors header entry for tensor {shown(name)}: {shown(header[name])}"
            )
        if offsets[1] > body:
            raise PrefixFormatError(
                f"truncated safetensors file: tensor {shown(name)} needs data up to byte {offsets[1]}, "
                f"the file has {body}"
            )
    return header, metadata


def _ints(x: object, n: int | None = None) -> bool:
    """True for a list of non-negative ints (of length n if given)."""
    ok = isinstance(x, list) and all(isinstance(i, int) and i >= 0 for i in x)
    return ok and (n is None or len(x) == n)


def read_metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ of a safetensors blob (header only), {} if it has none."""
    return _parse_header(bytes(data))[1]


def _load_tensors(data: bytes) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own error types
        raise PrefixFormatError(f"cannot read safetensors data: {shown(str(e), quoted=False)}") from e


def _check_tokens(n: int, limit: int) -> None:
    if n < 1:
        raise PrefixFormatError(f"prefix has {n} virtual tokens, expected 1 to {limit}")
    if n > limit:
        raise PrefixFormatError(f"prefix has {n} virtual tokens, limit is {limit}")


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


def _check_adapter_config(raw: bytes, fp: ModelFingerprint, num_virtual_tokens: int) -> None:
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
    header, metadata = _parse_header(data)
    names = sorted(header)
    fmt = metadata.get("format")
    if fmt != FORMAT_NAME and str(fmt).startswith("prefix-server/"):  # HF/PEFT files say format="pt"
        raise PrefixFormatError(f"unknown prefix format {shown(fmt)}, expected {FORMAT_NAME!r}")
    if names != (_NATIVE_NAMES if fmt == FORMAT_NAME else _PEFT_NAMES):
        raise PrefixFormatError(
            f"found tensors {shown(names)}, expected {_NATIVE_NAMES} with metadata format={FORMAT_NAME!r}, "
            f"or {_PEFT_NAMES} (PEFT prefix tuning)"
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
        _check_tokens(P, max_virtual_tokens)
        tensors = _load_tensors(data)
        keys, values = tensors["keys"], tensors["values"]  # [L, kv, P, D]
    else:
        shape = header["prompt_embeddings"]["shape"]
        width = L * 2 * kv * D
        if len(shape) != 2:
            raise PrefixFormatError(
                f"prompt_embeddings has shape {shape}, expected "
                f"[num_virtual_tokens, num_layers*2*kv_heads*head_dim] = [P, {width}]"
            )
        P, got_width = shape
        if adapter_config is not None:
            _check_adapter_config(adapter_config, expected, P)
        if got_width != width:
            raise PrefixFormatError(
                f"prompt_embeddings width {got_width}, expected num_layers*2*kv_heads*head_dim = "
                f"{L}*2*{kv}*{D} = {width}"
            )
        _check_tokens(P, max_virtual_tokens)
        x = _load_tensors(data)["prompt_embeddings"]  # [P, L*2*kv*D]
        x = x.view(P, L * 2, kv, D).permute(1, 2, 0, 3)  # [L*2, kv, P, D]
        keys, values = x[0::2], x[1::2]  # each [L, kv, P, D]

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
