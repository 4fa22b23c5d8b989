"""The decode step as CUDA graphs: captured once per (batch, block-table width) bucket at start-up, over
static input buffers, and replayed every step (nano-vllm's `capture_cudagraph`, gpt-fast's
`reduce-overhead`). A small model's decode step on a GPU is mostly kernel launches (~15 per layer, each
a few microseconds of CPU); a replay launches the whole step at once.

A graph reads and writes fixed addresses, so every input lives in a `StaticInputs` buffer sized for the
largest bucket: a step copies its batch into the first rows, and the padding rows past them point at the
pool's scratch page (they write there and read only that page), exactly as the compiled CPU step pads.
Attention is the torch-ops path (gather the rows' pages, SDPA under the additive mask; paged.py), whose
cost grows with the block-table width: so the width is bucketed too (powers of two up to the longest
row's), and a step runs the graph of the smallest buckets that hold it. Everything is captured by
`warm_up`; joins, leaves and hot swaps only change the buffers' contents, never a graph (`captures` counts).

The same code runs without capture (`capture=False`: the step is called eagerly on the static buffers),
which is how the CPU tests check bucket selection, padding and exactness on machines without a GPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from server.engine.compiled import batch_buckets, bucket_for
from server.engine.paged import DecodeBatch
from server.engine.pages import SCRATCH_PAGE, PagePool, pages_for

log = logging.getLogger(__name__)


def width_buckets(max_blocks: int) -> list[int]:
    """Block-table widths graphs are captured for: powers of two from 2, and max_blocks itself."""
    widths = [2]
    while widths[-1] < max_blocks:
        widths.append(min(widths[-1] * 2, max_blocks))
    return widths


@dataclass
class StaticInputs:
    """The graphs' inputs at the largest bucket: token ids [max_rows, 1] and a DecodeBatch whose tensors
    ([max_rows, max_blocks] block tables, [max_rows] lengths and slots) are the graphs' buffers. A step
    fills the first `rows` x `width` of them; `view` gives a bucket's slices (the same memory)."""

    input_ids: torch.Tensor
    batch: DecodeBatch

    @classmethod
    def allocate(cls, max_rows: int, max_blocks: int, page_size: int, device) -> StaticInputs:
        def zeros(*shape):
            return torch.zeros(shape, dtype=torch.long, device=device)

        batch = DecodeBatch(
            positions=zeros(max_rows, 1),
            block_tables=zeros(max_rows, max_blocks),
            prefix_lens=zeros(max_rows),
            own_lens=zeros(max_rows),
            slots=zeros(max_rows),
            page_size=page_size,
        )
        inputs = cls(zeros(max_rows, 1), batch)
        inputs.reset(max_rows)
        return inputs

    def reset(self, rows: int, start: int = 0) -> None:
        """Rows [start, rows) as padding: the scratch page only (one own token, its K/V written there)."""
        b = self.batch
        self.input_ids[start:rows] = 0
        b.positions[start:rows] = 0
        b.block_tables[start:rows] = SCRATCH_PAGE
        b.prefix_lens[start:rows] = 0
        b.own_lens[start:rows] = 1
        b.slots[start:rows] = SCRATCH_PAGE * b.page_size

    def load(self, input_ids: torch.Tensor, batch: DecodeBatch, rows: int, width: int) -> None:
        """Copy a step's n rows into the buffers (the engine pads them to the bucket already, so usually
        n == rows); rows [n, rows) and columns past the batch's own width become padding (the scratch page).
        Each buffer is written once per step: a few small copies outside the graph."""
        n, w = batch.block_tables.shape
        b = self.batch
        if n < rows:
            self.reset(rows, start=n)
        self.input_ids[:n].copy_(input_ids[:n])
        b.block_tables[:n, :width] = SCRATCH_PAGE
        b.block_tables[:n, :w].copy_(batch.block_tables[:n])
        b.positions[:n].copy_(batch.positions[:n])
        b.prefix_lens[:n].copy_(batch.prefix_lens[:n])
        b.own_lens[:n].copy_(batch.own_lens[:n])
        b.slots[:n].copy_(batch.slots[:n])

    def view(self, rows: int, width: int) -> tuple[torch.Tensor, DecodeBatch]:
        """(input_ids, batch) of one bucket: slices of the buffers, so a graph captured on them reads
        whatever `load` wrote."""
        b = self.batch
        return self.input_ids[:rows], DecodeBatch(
            positions=b.positions[:rows],
            block_tables=b.block_tables[:rows, :width],
            prefix_lens=b.prefix_lens[:rows],
            own_lens=b.own_lens[:rows],
            slots=b.slots[:rows],
            page_size=b.page_size,
        )


class GraphDecode:
    """The decode step (`step`: compiled.DecodeStep on the torch-ops path) per (rows, width) bucket, as a
    CUDA graph (`capture=True`) or called eagerly on the same static buffers (`capture=False`).

    Same interface as compiled.CompiledDecode: `buckets`, `ready`, `packed_step`, `warm_up(pool)`,
    `__call__`."""

    packed_step = None  # its linears are torch's: prefills stay on the model's forward

    def __init__(self, step: torch.nn.Module, max_rows: int, max_blocks: int, pool: PagePool, capture: bool):
        self.step, self.capture = step, capture
        self.buckets = batch_buckets(max_rows)
        self.widths = width_buckets(max_blocks)  # max_blocks: the longest row's block table
        self.inputs = StaticInputs.allocate(max_rows, self.widths[-1], pool.page_size, pool.keys.device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}  # each graph's logits [rows, vocab]
        self.captures = 0  # graphs captured: all of them in warm_up, none after
        self.ready = False
        self._pool = None  # the graphs' shared memory pool

    def _run(self, rows: int, width: int, pool: PagePool) -> torch.Tensor:
        ids, b = self.inputs.view(rows, width)
        mask = b.mask(pool.keys.dtype)  # computed inside the graph from the buffers
        args = (ids, b.positions, mask, b.block_tables, b.prefix_lens, b.own_lens, b.slots)
        return self.step(*args, pool.keys, pool.values)

    @torch.inference_mode()
    def warm_up(self, pool: PagePool) -> float:
        """Capture every (rows, width) bucket, largest first (smaller graphs reuse its memory pool), on
        padding rows that touch only the scratch page. Returns the seconds taken."""
        start = time.perf_counter()
        for rows in reversed(self.buckets):
            for width in reversed(self.widths):
                self.inputs.reset(rows)
                if not self.capture:
                    self._run(rows, width, pool)
                    continue
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, lazy init)
                    self._run(rows, width, pool)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    self.outputs[rows, width] = self._run(rows, width, pool)
                self._pool = self._pool or graph.pool()
                self.graphs[rows, width] = graph
                self.captures += 1
            log.info("decode graphs: batch %d captured (%.1f s)", rows, time.perf_counter() - start)
        if self.capture:
            torch.cuda.synchronize()
        self.ready = True
        return time.perf_counter() - start

    def bucket(self, batch: DecodeBatch) -> tuple[int, int]:
        """The smallest (rows, width) bucket that holds the batch."""
        n, w = batch.block_tables.shape
        if n > self.buckets[-1] or w > self.widths[-1]:
            raise ValueError(
                f"a decode batch of {n} rows x {w} blocks, the graphs hold {self.buckets[-1]} x {self.widths[-1]}"
            )
        return bucket_for(n, self.buckets), bucket_for(w, self.widths)

    def __call__(self, input_ids: torch.Tensor, batch: DecodeBatch, pool: PagePool) -> torch.Tensor:
        """Logits [rows, vocab] of one step, rows = the batch's bucket (the engine pads to it)."""
        rows, width = self.bucket(batch)
        self.inputs.load(input_ids, batch, rows, width)
        if not self.capture:
            return self._run(rows, width, pool)
        self.graphs[rows, width].replay()
        return self.outputs[rows, width]


def max_blocks(max_virtual_tokens: int, max_seq_len: int, page_size: int) -> int:
    """The longest block table: a longest prefix's pages (its last one partly used), then a row's own."""
    return max(2, pages_for(max_virtual_tokens, page_size) + pages_for(max_seq_len, page_size))
