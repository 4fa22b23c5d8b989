"""Hypothesis against the prefix parser: valid native and PEFT files, truncated, bit-flipped, with garbage
appended, with a lying header length, with mutated header fields, and random bytes.

`load_prefix` must return a valid prefix of the right shape (finite float32 values) or raise
PrefixFormatError; never another exception, never hang (hypothesis deadline), never allocate for what a
header merely claims. Over HTTP the same files get 422 and leave the registry exactly as it was.
"""

from __future__ import annotations

import json
import struct
import tracemalloc

import pytest
import torch
from conftest import byte_tokenizer, make_tiny_model
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from server.api.app import Components, create_app
from server.config import Settings
from server.engine.engine import Engine
from server.errors import PrefixFormatError
from server.registry.format import (
    MAX_HEADER_BYTES,
    ModelFingerprint,
    PrefixKV,
    load_prefix,
    save_native,
    to_peft,
)
from server.registry.registry import PrefixRegistry

FP = ModelFingerprint("llama", num_layers=2, kv_heads=2, head_dim=4)
MAX_P = 8
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FUZZ = settings(max_examples=200, deadline=1000, database=None, suppress_health_check=[HealthCheck.too_slow])


def random_prefix(fp: ModelFingerprint, num_virtual_tokens: int, seed: int, dtype=torch.float32) -> PrefixKV:
    gen = torch.Generator().manual_seed(seed)
    shape = (fp.num_layers, fp.kv_heads, num_virtual_tokens, fp.head_dim)  # [L, kv, P, D]
    keys, values = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    return PrefixKV(keys, values, fp)


def encode(prefix: PrefixKV, kind: str) -> tuple[bytes, bytes | None]:
    """(file bytes, adapter_config.json bytes or None) of a prefix in the native or the PEFT format."""
    if kind == "native":
        return save_native(prefix), None
    blob, config = to_peft(prefix)
    return blob, json.dumps(config).encode()


@st.composite
def valid_files(draw) -> tuple[bytes, bytes | None, PrefixKV]:
    """(data, config or None, the prefix it holds) for a random prefix in a random format and dtype."""
    prefix = random_prefix(
        FP, draw(st.integers(1, MAX_P)), draw(st.integers(0, 2**16)), draw(st.sampled_from(DTYPES))
    )
    data, config = encode(prefix, draw(st.sampled_from(["native", "peft"])))
    return data, draw(st.sampled_from([config, None])), prefix


def split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file as (header JSON, tensor data)."""
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def join(header: object, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def load_or_refuse(data: bytes, config: bytes | None = None) -> PrefixKV | None:
    """The parser's contract: a valid prefix, or PrefixFormatError (None here); anything else fails the test."""
    try:
        prefix = load_prefix(data, FP, adapter_config=config, max_virtual_tokens=MAX_P)
    except PrefixFormatError as e:
        assert str(e), "an error must say what is wrong"
        return None
    num_virtual_tokens = prefix.num_virtual_tokens
    assert 1 <= num_virtual_tokens <= MAX_P
    for t in (prefix.keys, prefix.values):  # [L, kv, P, D]
        assert list(t.shape) == [FP.num_layers, FP.kv_heads, num_virtual_tokens, FP.head_dim]
        assert t.dtype == torch.float32 and t.is_contiguous() and bool(torch.isfinite(t).all())
    assert prefix.fingerprint == FP
    return prefix


@FUZZ
@given(valid_files())
def test_valid_files_load_as_saved(file):
    data, config, prefix = file
    loaded = load_or_refuse(data, config)
    assert loaded is not None
    assert torch.equal(loaded.keys, prefix.keys.float()) and torch.equal(loaded.values, prefix.values.float())


@pytest.mark.parametrize("kind", ["native", "peft"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_truncated_at_every_offset_is_refused(kind, dtype):
    data, config = encode(random_prefix(FP, 3, seed=1, dtype=dtype), kind)
    assert load_or_refuse(data, config) is not None
    for cut in range(len(data)):
        assert load_or_refuse(data[:cut], config) is None, f"{kind} file cut at byte {cut} of {len(data)}"


@FUZZ
@given(valid_files(), st.data())
def test_truncated_anywhere_is_refused(file, data):
    blob, config, _ = file
    cut = data.draw(st.integers(0, len(blob) - 1))
    assert load_or_refuse(blob[:cut], config) is None


@FUZZ
@given(valid_files(), st.data())
def test_bit_flips_parse_cleanly_or_are_refused(file, data):
    """A flip in the tensor data may still parse (then the values are finite, or NaN/Inf is refused)."""
    blob, config, _ = file
    flipped = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 3))):
        bit = data.draw(st.integers(0, 8 * len(blob) - 1))
        flipped[bit // 8] ^= 1 << (bit % 8)
    load_or_refuse(bytes(flipped), config)


@pytest.mark.parametrize("kind", ["native", "peft"])
def test_every_single_bit_flip_of_the_header(kind):
    """Exhaustive over the length field and the JSON header, where a flip changes meaning, not values."""
    blob, config = encode(random_prefix(FP, 2, seed=2), kind)
    (size,) = struct.unpack("<Q", blob[:8])
    for bit in range(8 * (8 + size)):
        flipped = bytearray(blob)
        flipped[bit // 8] ^= 1 << (bit % 8)
        load_or_refuse(bytes(flipped), config)


@FUZZ
@given(valid_files(), st.binary(min_size=1, max_size=256))
def test_garbage_appended_is_refused(file, garbage):
    blob, config, _ = file
    assert load_or_refuse(blob + garbage, config) is None


@FUZZ
@given(valid_files(), st.data())
def test_overwritten_runs_parse_cleanly_or_are_refused(file, data):
    blob, config, _ = file
    start = data.draw(st.integers(0, len(blob) - 1))
    run = data.draw(st.binary(min_size=1, max_size=64))
    load_or_refuse(blob[:start] + run + blob[start + len(run) :], config)


@FUZZ
@given(st.binary(max_size=2048), st.sampled_from([None, b"{}", b"[]", b"null"]))
def test_random_bytes_are_refused(blob, config):
    load_or_refuse(blob, config)


HEADER_LENGTHS = [0, 1, 2, 7, MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1, 2**31, 2**32, 2**63, 2**64 - 1]


@FUZZ
@given(valid_files(), st.one_of(st.sampled_from(HEADER_LENGTHS), st.integers(0, 2**64 - 1)))
def test_a_lying_header_length_is_refused_before_reading(file, claimed):
    """The length field is checked against the file before anything is read or allocated for it."""
    blob, config, _ = file
    (size,) = struct.unpack("<Q", blob[:8])
    assume(claimed != size)
    lying = struct.pack("<Q", claimed) + blob[8:]
    tracemalloc.start()
    try:
        assert load_or_refuse(lying, config) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * len(blob) + (1 << 16), f"{peak} bytes allocated for a {len(blob)}-byte file"


# Header field values meant to break a parser: wrong types, out of range, huge, nested.
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "", "٣"]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=12,
)


@st.composite
def header_mutations(draw) -> tuple[bytes, bytes | None]:
    """A valid file with one field of its header (a tensor entry, a shape or offset element, a metadata
    value, or a new key) replaced by an arbitrary JSON value."""
    blob, config, _ = draw(valid_files())
    header, body = split(blob)
    name = draw(st.sampled_from(sorted(header)))
    entry = header[name]
    key = draw(st.sampled_from([*sorted(entry), "extra"]))
    value = draw(JSON_VALUES)
    if key in ("shape", "data_offsets") and entry[key] and draw(st.booleans()):
        entry[key][draw(st.integers(0, len(entry[key]) - 1))] = value  # one element only
    else:
        entry[key] = value
    return join(header, body), config


@settings(FUZZ, max_examples=500)
@given(header_mutations())
def test_mutated_header_fields_parse_cleanly_or_are_refused(mutated):
    load_or_refuse(*mutated)


@FUZZ
@given(
    st.integers(1, MAX_P),
    st.sampled_from(["format", "architecture", "num_layers", "kv_heads", "head_dim", "num_virtual_tokens"]),
    st.one_of(
        st.text(max_size=30),
        st.from_regex(r"\A-?[0-9]{1,30}\Z"),
        st.integers(1, 6000).map(lambda n: "2" * n),  # int() refuses over 4300 digits
    ),
)
def test_mutated_metadata_values_parse_cleanly_or_are_refused(num_virtual_tokens, key, value):
    """Metadata must map strings to strings; here every string a native file may carry."""
    header, body = split(save_native(random_prefix(FP, num_virtual_tokens, seed=num_virtual_tokens)))
    header["__metadata__"][key] = value
    load_or_refuse(join(header, body))


@FUZZ
@given(valid_files(), JSON_VALUES)
def test_arbitrary_adapter_configs_are_refused_or_ignored(file, config):
    blob, _, _ = file
    load_or_refuse(blob, json.dumps(config).encode())


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_json_is_refused(depth):
    """json.loads raises RecursionError, not ValueError, on deep nesting (once a 500 over HTTP)."""
    nested = b"[" * depth + b"]" * depth
    assert load_or_refuse(struct.pack("<Q", len(nested)) + nested) is None
    blob, _ = encode(random_prefix(FP, 2, seed=3), "peft")
    assert load_or_refuse(blob, nested) is None


def test_a_huge_metadata_number_is_refused():
    """int() refuses strings of over 4300 digits with its own ValueError (once a 500 over HTTP)."""
    header, body = split(save_native(random_prefix(FP, 2, seed=4)))
    header["__metadata__"]["num_layers"] = "2" * 5000
    assert load_or_refuse(join(header, body)) is None


# ---- the same files over HTTP: 422, and the registry exactly as it was ----


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    """(TestClient, prefix folder, the model's fingerprint) on a tiny model, with two stored versions."""
    engine = Engine(make_tiny_model("llama-gqa"), byte_tokenizer(), max_rows=2)
    root = tmp_path_factory.mktemp("http") / "prefixes"
    app_settings = Settings(prefix_dir=root, max_virtual_tokens=MAX_P, max_batch_wait_ms=1.0)
    registry = PrefixRegistry.open(
        root,
        engine.fingerprint,
        cache_bytes=10**7,
        dtype=engine.dtype,
        device=engine.device,
        max_virtual_tokens=MAX_P,
    )
    app = create_app(app_settings, Components(engine=engine, registry=registry, model_name="tiny"))
    with TestClient(app) as client:
        for seed in (1, 2):
            data = save_native(random_prefix(engine.fingerprint, 3, seed))
            assert (
                client.post("/prefixes", data={"task_id": "kept"}, files={"file": ("p", data)}).status_code
                == 201
            )
        yield client, root, engine.fingerprint


def snapshot(client, root) -> tuple[list, dict[str, bytes]]:
    """What a failed upload must not change: the listing, and every byte of the store on disk."""
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    return client.get("/prefixes").json()["prefixes"], files


def _damage(blob: bytes, config: bytes | None, how: str, where: int) -> tuple[bytes, bytes | None]:
    """A file (and config) damaged in a way that no parser may accept."""
    if how == "truncate":
        return blob[: where % len(blob)], config
    if how == "append":
        return blob + b"\x00garbage", config
    if how == "header_length":
        return struct.pack("<Q", 2**63 + where) + blob[8:], config
    if config is not None:  # "hostile": a config nested deeper than json.loads can recurse
        return blob, b"[" * 50_000 + b"]" * 50_000
    header, body = split(blob)  # "hostile": a number int() refuses to parse
    header["__metadata__"]["num_layers"] = "7" * 5000
    return join(header, body), config


@settings(FUZZ, max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["native", "peft"]),
    how=st.sampled_from(["truncate", "append", "header_length", "hostile"]),
    where=st.integers(0, 2**16),
    task_id=st.sampled_from(["kept", "fresh"]),
)
def test_damaged_uploads_get_422_and_change_nothing(http, kind, how, where, task_id):
    client, root, fp = http
    blob, config = _damage(*encode(random_prefix(fp, 3, seed=where), kind), how, where)
    files = {"file": ("adapter_model.safetensors", blob)}
    if config is not None:
        files["config"] = ("adapter_config.json", config)
    before = snapshot(client, root)
    resp = client.post("/prefixes", data={"task_id": task_id}, files=files)
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "invalid_prefix", resp.text
    assert snapshot(client, root) == before


@settings(FUZZ, max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(["native", "peft"]), data=st.data())
def test_bit_flipped_uploads_are_stored_whole_or_change_nothing(http, seed, kind, data):
    client, root, fp = http
    blob = bytearray(encode(random_prefix(fp, 2, seed), kind)[0])
    bit = data.draw(st.integers(0, 8 * len(blob) - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    try:
        expected = load_prefix(bytes(blob), fp, max_virtual_tokens=MAX_P)
    except PrefixFormatError:
        expected = None
    before = snapshot(client, root)
    resp = client.post("/prefixes", data={"task_id": "flip"}, files={"file": ("p", bytes(blob))})
    if expected is None:
        assert resp.status_code == 422 and resp.json()["error"]["code"] == "invalid_prefix", resp.text
        assert snapshot(client, root) == before
    else:  # a flip inside the tensor data that still parses is a valid prefix
        assert resp.status_code == 201, resp.text
        assert resp.json()["num_virtual_tokens"] == expected.num_virtual_tokens
