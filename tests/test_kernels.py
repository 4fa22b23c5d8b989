"""The CPU decode kernels (server/engine/kernels) against torch's own ops: linear against F.linear for
every row count the decode buckets use (and beyond a row tile), float32 and bfloat16; paged attention
against SDPA over each row's K/V laid out by hand (shared prefixes, prefix lengths that do and do not fill
their last page, float32 and bfloat16); write_kv in place for float32 and bfloat16."""

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
avx512 = pytest.mark.skipif(not kernels.avx512(), reason="linear and paged_attention need AVX-512")


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


def paged_reference(q, keys, values, layer, tables, prefix_lens, own_lens, page_size):
    """Each row's K/V laid out by hand (its prefix's first P tokens, its own L tokens from the next page on)
    and torch's SDPA over them, in float32."""
    out = []
    heads, kv_heads = q.shape[1], keys.shape[2]
    for r, (table, p, n) in enumerate(
        zip(tables.tolist(), prefix_lens.tolist(), own_lens.tolist(), strict=True)
    ):
        own_start = -(-p // page_size)
        columns = [(table[j // page_size], j % page_size) for j in range(p)]
        columns += [(table[own_start + j // page_size], j % page_size) for j in range(n)]
        k = torch.stack([keys[layer, page, :, off] for page, off in columns], 1).float()  # [kv_heads, n, d]
        v = torch.stack([values[layer, page, :, off] for page, off in columns], 1).float()
        k, v = (t.repeat_interleave(heads // kv_heads, 0) for t in (k, v))
        scale = q.shape[-1] ** -0.5
        out.append(F.scaled_dot_product_attention(q[r].float()[:, None], k, v, scale=scale)[:, 0])
    return torch.stack(out)


def paged_case(head_dim, dtype, page_size=16, seed=0):
    """A pool and 13 rows: 10 sharing one prefix of 17 tokens (more than a work unit's 8 rows), then rows
    with prefixes of 1, 15 and 16 tokens and one with none; own lengths from 1 to 40 tokens."""
    torch.manual_seed(seed)
    layers, pages, kv_heads, groups = 2, 40, 3, 3
    keys = (torch.randn(layers, pages, kv_heads, page_size, head_dim) * 3).to(dtype)
    values = torch.randn_like(keys)
    free = iter(range(1, pages))
    shared = [next(free), next(free)]  # 17 tokens: a full page and one token
    rows = [(shared, 17, n) for n in (1, 2, 16, 17, 3, 30, 5, 9, 1, 12)]
    rows += [([next(free)], p, n) for p, n in ((1, 40), (15, 16), (16, 1))] + [([], 0, 33)]
    tables, prefix_lens, own_lens = [], [], []
    for prefix_pages, p, n in rows:
        tables.append(prefix_pages + [next(free) for _ in range(-(-n // page_size))])
        prefix_lens.append(p)
        own_lens.append(n)
    width = max(len(t) for t in tables)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(len(rows), kv_heads * groups, head_dim).to(dtype)
    return q, keys, values, tables, torch.tensor(prefix_lens), torch.tensor(own_lens)


@avx512
@pytest.mark.parametrize("head_dim", [16, 64, 24])  # 24: a vector and a scalar tail
def test_paged_attention_equals_sdpa(head_dim):
    q, keys, values, tables, plen, olen = paged_case(head_dim, torch.float32, seed=head_dim)
    out = ops.paged_attention(q, keys, values, 1, tables, plen, olen, head_dim**-0.5)
    ref = paged_reference(q, keys, values, 1, tables, plen, olen, 16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@avx512
def test_paged_attention_bfloat16_within_one_rounding():
    """bfloat16 pool and queries, float32 arithmetic inside, one rounding at the end."""
    q, keys, values, tables, plen, olen = paged_case(64, torch.bfloat16)
    out = ops.paged_attention(q, keys, values, 0, tables, plen, olen, 64**-0.5)
    assert out.dtype == torch.bfloat16
    ref = paged_reference(q, keys, values, 0, tables, plen, olen, 16)
    torch.testing.assert_close(out.float(), ref, rtol=8e-3, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_writes_each_row_at_its_slot(dtype):
    keys = torch.zeros(2, 4, 3, 16, 8, dtype=dtype)  # 4 pages of 16 tokens: slots 0..63
    values = torch.zeros_like(keys)
    k, v = torch.randn(3, 3, 8).to(dtype), torch.randn(3, 3, 8).to(dtype)
    slots = torch.tensor([0, 63, 21])
    ops.write_kv(keys, values, 1, slots, k, v)
    expected_k, expected_v = torch.zeros_like(keys), torch.zeros_like(values)
    for r, s in enumerate(slots.tolist()):
        expected_k[1, s // 16, :, s % 16], expected_v[1, s // 16, :, s % 16] = k[r], v[r]
    assert torch.equal(keys, expected_k) and torch.equal(values, expected_v)


def test_write_kv_refuses_a_slot_outside_the_pool():
    keys = torch.zeros(1, 2, 1, 4, 8)
    with pytest.raises(RuntimeError, match="outside the pool"):
        ops.write_kv(keys, keys.clone(), 0, torch.tensor([8]), torch.ones(1, 1, 8), torch.ones(1, 1, 8))


def test_an_engine_without_kernels_stays_eager(monkeypatch, tokenizer, caplog):
    """No compiler here (kernels.load() is False): compile says why, try_compile logs it, requests run."""
    monkeypatch.setattr(kernels, "load", lambda: False)
    engine = Engine(make_tiny_model("llama-gqa"), tokenizer, max_rows=2)
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
    with pytest.raises(RuntimeError, match="one slot per row"):  # 4 slots for 1 row
        ops.write_kv(keys, keys.clone(), 0, torch.tensor([0, 0, 0, 0]), row, row)
    with pytest.raises(RuntimeError, match="expected k and v"):  # 4 heads for 2 kv heads
        ops.write_kv(keys, keys.clone(), 0, torch.tensor([0]), torch.ones(1, 4, 16), torch.ones(1, 4, 16))
    q, table, one = torch.ones(1, 4, 16), torch.tensor([[1]]), torch.tensor([1])
    with pytest.raises(RuntimeError, match="2 pages, its block table has 1"):  # 9 own tokens on 8-token pages
        ops.paged_attention(q, keys, keys.clone(), 0, table, torch.tensor([0]), torch.tensor([9]), 1.0)
    with pytest.raises(RuntimeError, match="page 3 outside the pool's 3"):
        ops.paged_attention(q, keys, keys.clone(), 0, torch.tensor([[3]]), torch.tensor([0]), one, 1.0)
    with pytest.raises(RuntimeError, match="expected block_tables"):  # 2 rows, 1 table
        ops.paged_attention(torch.ones(2, 4, 16), keys, keys.clone(), 0, table, one, one, 1.0)
    with pytest.raises(RuntimeError, match="heads a multiple of 2"):
        ops.paged_attention(torch.ones(1, 3, 16), keys, keys.clone(), 0, table, torch.tensor([0]), one, 1.0)
    with pytest.raises(RuntimeError, match="packed by pack_linear"):
        ops.linear(torch.ones(1, 8), torch.ones(16, 8), None)
    with pytest.raises(RuntimeError, match="expected a bias"):
        ops.linear(torch.ones(1, 8), ops.pack_linear(torch.ones(16, 8)), torch.ones(8))
