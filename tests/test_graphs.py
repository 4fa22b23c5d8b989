"""The CUDA-graph decode (engine/graphs.py): buckets, static buffers and padding are tested on the CPU through
the same code (capture off: the step runs eagerly on the static buffers); the capture itself needs a GPU
(`cuda` tests, skipped without one)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, run_joining
from test_engine import make_requests, random_prefix

from server.engine.engine import Engine
from server.engine.graphs import StaticInputs, max_blocks, width_buckets
from server.engine.paged import DecodeBatch, RowKV
from server.engine.pages import SCRATCH_PAGE, PrefixPages

FAMILY = "llama-gqa"


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(FAMILY)


def test_width_buckets_are_powers_of_two_up_to_the_longest_row():
    assert width_buckets(2) == [2]
    assert width_buckets(37) == [2, 4, 8, 16, 32, 37]
    assert max_blocks(256, 4096, 16) == 16 + 256
    assert max_blocks(1, 1, 16) == 2  # a compiled dimension is never 1


def test_static_inputs_pad_rows_and_columns_with_the_scratch_page():
    inputs = StaticInputs.allocate(max_rows=4, max_blocks=8, page_size=16, device="cpu")
    prefix = PrefixPages(key=("t", 1, "x"), pages=[5, 6], length=20)
    rows = [RowKV(prefix, [7, 8], length=3), RowKV(None, [9], length=15)]
    batch = DecodeBatch.build(rows, 2, 16, "cpu")
    ids = torch.tensor([[11], [12]])
    inputs.batch.block_tables.fill_(99)  # stale contents of a wider earlier step
    inputs.load(ids, batch, rows=4, width=4)
    ids_v, b = inputs.view(4, 4)
    assert ids_v[:, 0].tolist() == [11, 12, 0, 0]
    assert b.positions[:, 0].tolist() == [20 + 3, 15, 0, 0]
    pad = [SCRATCH_PAGE] * 4
    assert b.block_tables.tolist() == [[5, 6, 7, SCRATCH_PAGE], [9, *pad[:3]], pad, pad]
    assert b.prefix_lens.tolist() == [20, 0, 0, 0] and b.own_lens.tolist() == [4, 16, 1, 1]
    assert b.slots.tolist() == [7 * 16 + 3, 9 * 16 + 15, 0, 0]
    assert b.block_tables.data_ptr() == inputs.batch.block_tables.data_ptr()  # a view of the buffers


def test_graph_decode_equals_the_eager_step_under_joins_leaves_and_hot_swaps(model, tokenizer):
    """The static-buffer step (no capture on a CPU) gives the eager engine's tokens with rows of several
    prefixes joining and leaving, a hot swap between versions, and widths across buckets; nothing is
    re-built after warm_up."""
    graphs = Engine(model, tokenizer, max_rows=6, max_virtual_tokens=64, max_seq_len=200)
    graphs.compile(graphs=True)
    decoder = graphs.decoder
    assert decoder.buckets == [1, 2, 4, 6] and decoder.widths == [2, 4, 8, 16, 17]
    assert decoder.captures == 0 and not decoder.graphs  # nothing is captured on a CPU

    def requests():
        fp = graphs.fingerprint
        v1, v2, other = random_prefix(fp, 20, 1), random_prefix(fp, 33, 2), random_prefix(fp, 64, 3)
        reqs = make_requests(  # the 7th: 64 + 100 + 30 tokens, 13 blocks (the 16-wide bucket)
            [v1, v1, None, other, v2, v2, other, v1],
            [5, 30, 3, 17, 8, 2, 100, 4],
            [12, 40, 6, 20, 9, 15, 30, 7],
        )
        a1, a2, o = ("a", 1, "x"), ("a", 2, "y"), ("o", 1, "z")  # task a's versions 1 and 2: a hot swap
        for r, key in zip(reqs, [a1, a1, None, o, a2, a2, o, a1], strict=True):
            r.prefix_key = key
        return reqs

    seen: set = set()
    real_bucket = decoder.bucket

    def spy(batch):
        seen.add(real_bucket(batch))
        return real_bucket(batch)

    decoder.bucket = spy
    joined = requests()
    run_joining(graphs, joined, [0, 0, 1, 3, 5, 5, 8, 20])
    eager = requests()
    run_joining(Engine(model, tokenizer, max_rows=6), eager, [0, 0, 1, 3, 5, 5, 8, 20])
    assert [r.output_token_ids for r in joined] == [r.output_token_ids for r in eager]
    assert len({rows for rows, _ in seen}) >= 3 and len({w for _, w in seen}) >= 3
    assert decoder.captures == 0


def test_padding_rows_write_only_the_scratch_page(model, tokenizer):
    """A 3-row batch in the 4-row bucket: the padding row's K/V go to the scratch page; an idle resident
    prefix's pages and the rows' other pages stay as they were."""
    engine = Engine(model, tokenizer, max_rows=4, max_virtual_tokens=32, max_seq_len=64)
    engine.compile(graphs=True)
    idle = random_prefix(engine.fingerprint, 18, 9)
    [parked] = make_requests([idle], [3], [1])
    parked.prefix_key = ("idle", 1, "x")
    engine.generate([parked])  # leaves the prefix resident and idle
    entry = engine.prefixes.entries[("idle", 1, "x")]
    before = engine.pool.keys[:, entry.pages].clone()
    reqs = make_requests([None, random_prefix(engine.fingerprint, 5, 2), None], [4, 6, 2], [8, 8, 8])
    engine.admit(reqs)
    used = {p for row in engine.rows.kv for p in row.pages + (row.prefix.pages if row.prefix else [])}
    snapshot = engine.pool.keys.clone()
    engine.step()
    changed = {
        int(p) for p in torch.nonzero((engine.pool.keys != snapshot).flatten(2).any(-1).any(0)).flatten()
    }
    assert changed <= used | {SCRATCH_PAGE} and SCRATCH_PAGE in changed
    assert torch.equal(engine.pool.keys[:, entry.pages], before)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_capture_once_and_equal_the_eager_step(tokenizer):
    """On a GPU: every bucket captured at warm_up, none after joins, leaves and a hot swap; greedy tokens
    equal the eager engine's (float32, the same kernels)."""
    model = make_tiny_model(FAMILY).to("cuda")

    def requests(fp):
        v1, v2 = random_prefix(fp, 20, 1), random_prefix(fp, 9, 2)
        reqs = make_requests([v1, None, v2, v1, v2], [5, 9, 3, 30, 7], [20, 10, 14, 9, 11])
        for r, key in zip(
            reqs, [("t", 1, "a"), None, ("t", 2, "b"), ("t", 1, "a"), ("t", 2, "b")], strict=True
        ):
            r.prefix_key = key
            if r.prefix is not None:
                r.prefix = r.prefix.to(device="cuda")
        return reqs

    graphs = Engine(model, tokenizer, max_rows=4, max_virtual_tokens=32, max_seq_len=128)
    graphs.compile()
    captured = graphs.decoder.captures
    assert captured == len(graphs.decoder.buckets) * len(graphs.decoder.widths)
    joined = requests(graphs.fingerprint)
    run_joining(graphs, joined, [0, 0, 2, 4, 6])
    eager = requests(graphs.fingerprint)
    run_joining(Engine(model, tokenizer, max_rows=4), eager, [0, 0, 2, 4, 6])
    assert [r.output_token_ids for r in joined] == [r.output_token_ids for r in eager]
    assert graphs.decoder.captures == captured
