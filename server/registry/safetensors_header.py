"""Reading a safetensors file's header without its tensors: the first check every prefix file gets.

A safetensors file: an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape and
byte offsets, plus string `__metadata__`), then the tensor data.
"""

from __future__ import annotations

import json
import struct

import safetensors.torch
import torch

from server.errors import PrefixFormatError, shown

MAX_HEADER_BYTES = 1 << 20


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


def parse_header(data: bytes) -> tuple[dict[str, dict], dict[str, str]]:
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
    return parse_header(bytes(data))[1]


def load_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors blob; PrefixFormatError if the data cannot be read."""
    try:
        return safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own error types
        raise PrefixFormatError(f"cannot read safetensors data: {shown(str(e), quoted=False)}") from e


def check_tokens(n: int, limit: int) -> None:
    """PrefixFormatError unless 1 <= n <= limit (a prefix's virtual tokens)."""
    if n < 1:
        raise PrefixFormatError(f"prefix has {n} virtual tokens, expected 1 to {limit}")
    if n > limit:
        raise PrefixFormatError(f"prefix has {n} virtual tokens, limit is {limit}")
