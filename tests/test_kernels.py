"""The CPU decode kernels (server/engine/kernels) against torch's own ops: linear against F.linear for
every row count the decode buckets use (and beyond a row tile), float32 and bfloat16; attention against
SDPA over each row's own columns (float32); write_kv in place for float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model
from test_engine import make_requests

from server.engine import kernels
from server.engine.engine import Engine

pytestmark = pytest.mark.skipif(not kernels.load(), reason="the kernels cannot be built here (no compiler)")
ops = torch.ops.prefix_server
avx512 = pytest.mark.skipif(not kernels.avx512(), reason="linear and decode_attention need AVX-512")


@avx512
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 16, 21])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_torch(rows, bias):
    torch.manual_seed(rows)
    weight, x = torch.randn(16 * 9, 40), torch.randn(rows, 40)  # 9 blocks: groups of 4 with a tail of 1
    b = torch.randn(16 * 9) if bias else None
    out = ops.linear(x, ops.pack_linear(weight), b)
    torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


@avx512
@pytest.mark.parametrize("rows", [1, 8, 11])
def test_linear_bfloat16_equals_torch(rows):
    """bfloat16 weights and input, float32 products, one rounding at the end: torch's (oneDNN's) rounding."""
    torch.manual_seed(rows)
    weight, x, b = torch.randn(16 * 5, 64), torch.randn(rows, 64), torch.randn(16 * 5)
    weight, x, b = weight.bfloat16(), x.bfloat16(), b.bfloat16()
    out = ops.linear(x, ops.pack_linear(weight), b)
    assert out.dtype == torch.bfloat16
    exact = F.linear(x.float(), weight.float(), b.float())  # the float32 result both round
    torch.testing.assert_close(out.float(), exact, rtol=8e-3, atol=1e-2)  # within one bfloat16 rounding
    torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1.6e-2, atol=2e-2)


def test_linear_refuses_a_mismatched_input():
    packed = ops.pack_linear(torch.randn(16, 8))
    with pytest.raises(RuntimeError, match="expected Float input"):
        ops.linear(torch.randn(2, 8).bfloat16(), packed, None)


@avx512
def test_linear_keeps_leading_dims():
    weight, x = torch.randn(32, 8), torch.randn(2, 3, 8)
    out = ops.linear(x, ops.pack_linear(weight), None)
    assert out.shape == (2, 3, 32)
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_pack_linear_refuses_partial_blocks():
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ops.pack_linear(torch.randn(20, 8))


@avx512
@pytest.mark.parametrize("head_dim", [16, 64, 24])  # 24: a vector and a scalar tail
def test_decode_attention_equals_sdpa(head_dim):
    torch.manual_seed(head_dim)
    layers, slots, kv_heads, groups, capacity = 2, 5, 3, 3, 40
    keys = torch.randn(layers, slots, kv_heads, capacity, head_dim) * 3
    values = torch.randn_like(keys)
    q = torch.randn(4, kv_heads * groups, head_dim)
    lengths = torch.tensor([1, 17, 40, 16])  # one column; a tail of 1; the whole slot; exactly one vector
    out = ops.decode_attention(q, keys, values, 1, lengths, head_dim**-0.5)
    for r, n in enumerate(lengths.tolist()):
        k = keys[1, r, :, :n].repeat_interleave(groups, 0)  # [heads, n, d]
        v = values[1, r, :, :n].repeat_interleave(groups, 0)
        ref = F.scaled_dot_product_attention(q[r][:, None], k, v, scale=head_dim**-0.5)[:, 0]
        torch.testing.assert_close(out[r], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_writes_each_row_at_its_column(dtype):
    keys = torch.zeros(2, 4, 3, 32, 8, dtype=dtype)
    values = torch.zeros_like(keys)
    k, v = torch.randn(3, 3, 8).to(dtype), torch.randn(3, 3, 8).to(dtype)
    columns = torch.tensor([0, 31, 5])
    ops.write_kv(keys, values, 1, columns, k, v)
    expected_k, expected_v = torch.zeros_like(keys), torch.zeros_like(values)
    for r, c in enumerate(columns.tolist()):
        expected_k[1, r, :, c], expected_v[1, r, :, c] = k[r], v[r]
    assert torch.equal(keys, expected_k) and torch.equal(values, expected_v)


def test_write_kv_refuses_a_column_outside_the_slot():
    keys = torch.zeros(1, 2, 1, 4, 8)
    with pytest.raises(RuntimeError, match="outside the slot"):
        ops.write_kv(keys, keys.clone(), 0, torch.tensor([4]), torch.ones(1, 1, 8), torch.ones(1, 1, 8))


def test_an_engine_without_kernels_stays_eager(monkeypatch, tokenizer, caplog):
    """No compiler here (kernels.load() is False): compile says why, try_compile logs it, requests run."""
    monkeypatch.setattr(kernels, "load", lambda: False)
    engine = Engine(make_tiny_model("llama-gqa"), tokenizer, max_slots=2)
    with pytest.raises(ValueError, match="kernels could not be built"):
        engine.compile()
    with caplog.at_level("INFO", logger="server.engine.engine"):
        assert engine.try_compile() is False
    assert "decode step stays eager" in caplog.text and engine.decoder is None
    assert len(engine.generate(make_requests([None], [4], [3]))[0].output_token_ids) == 3


@avx512
def test_the_kernels_refuse_shapes_they_would_write_past():
    keys = torch.zeros(2, 3, 2, 8, 16)
    row = torch.ones(1, 2, 16)
    with pytest.raises(RuntimeError, match="layer 2 of 2"):
        ops.write_kv(keys, keys.clone(), 2, torch.tensor([0]), row, row)
    with pytest.raises(RuntimeError, match="do not fit slots"):  # 4 rows for 3 slots
        ops.write_kv(
            keys, keys.clone(), 0, torch.tensor([0, 0, 0, 0]), torch.ones(4, 2, 16), torch.ones(4, 2, 16)
        )
    with pytest.raises(RuntimeError, match="expected k and v"):  # 4 heads for 2 kv heads
        ops.write_kv(keys, keys.clone(), 0, torch.tensor([0]), torch.ones(1, 4, 16), torch.ones(1, 4, 16))
    with pytest.raises(RuntimeError, match="sees 9 columns"):  # past the slot's capacity
        ops.decode_attention(torch.ones(1, 4, 16), keys, keys.clone(), 0, torch.tensor([9]), 1.0)
    with pytest.raises(RuntimeError, match="one column per row"):
        ops.decode_attention(torch.ones(2, 4, 16), keys, keys.clone(), 0, torch.tensor([1]), 1.0)
    with pytest.raises(RuntimeError, match="packed by pack_linear"):
        ops.linear(torch.ones(1, 8), torch.ones(16, 8), None)
    with pytest.raises(RuntimeError, match="expected a bias"):
        ops.linear(torch.ones(1, 8), ops.pack_linear(torch.ones(16, 8)), torch.ones(8))
