"""Rows over the page pool: where each row's K/V lives, the per-step batch metadata built from that, and
transformers caches that write into the pages and read through block tables (the torch-ops path).

A row's block table is its prefix's pages then its own pages. In block-table columns (page i of the table
holds columns [i * page_size, (i + 1) * page_size)):

    [ prefix: P tokens | unused tail of the last prefix page ][ own: prompt, then generated ... ]
      columns [0, P)                                           columns [Bp * page_size, ... ), Bp = ceil(P / page_size)

Positions stay PEFT's whatever the layout: the prefix has none (its keys are stored without rotary), and
the row's own token i is at position P + i.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from server.engine.pages import SCRATCH_PAGE, PagePool, PrefixPages, pages_for


@dataclass(eq=False)
class RowKV:
    """One running row's place in the pool: its prefix's pages (shared) and its own (reserved at admission)."""

    prefix: PrefixPages | None
    pages: list[int]  # own pages: room for prompt + max_new_tokens
    length: int = 0  # own tokens written so far

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix is None else self.prefix.length

    def block_table(self, own_tokens: int, page_size: int) -> list[int]:
        """Prefix pages, then the own pages that hold `own_tokens` tokens."""
        prefix = [] if self.prefix is None else self.prefix.pages
        return prefix + self.pages[: pages_for(own_tokens, page_size)]

    def slot(self, i: int, page_size: int) -> int:
        """The flat pool slot (page * page_size + offset) of own token i."""
        return self.pages[i // page_size] * page_size + i % page_size


@dataclass(frozen=True)
class DecodeBatch:
    """One decode step's metadata, built once and passed down (padding rows past the real ones write to the
    scratch page and see only that column).

    positions [rows, 1]; block_tables [rows, max_blocks]; prefix_lens, own_lens (after this step's token),
    slots (where each row's new K/V goes) [rows]."""

    positions: torch.Tensor
    block_tables: torch.Tensor
    prefix_lens: torch.Tensor
    own_lens: torch.Tensor
    slots: torch.Tensor
    page_size: int

    @classmethod
    def build(cls, rows: Sequence[RowKV], padded_to: int, page_size: int, device) -> DecodeBatch:
        tables = [r.block_table(r.length + 1, page_size) for r in rows]
        # At least 2 blocks: torch.compile specializes a dimension of size 1 (a width-1 step would recompile).
        width = max(2, *(len(t) for t in tables))
        pad = padded_to - len(rows)
        tables = [t + [SCRATCH_PAGE] * (width - len(t)) for t in tables] + [[SCRATCH_PAGE] * width] * pad
        prefix_lens = [r.prefix_len for r in rows] + [0] * pad
        lengths = [r.length for r in rows] + [0] * pad

        def tensor(values):
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(
            positions=tensor([p + n for p, n in zip(prefix_lens, lengths, strict=True)])[:, None],
            block_tables=tensor(tables),
            prefix_lens=tensor(prefix_lens),
            own_lens=tensor([n + 1 for n in lengths]),
            slots=tensor([r.slot(r.length, page_size) for r in rows] + [SCRATCH_PAGE * page_size] * pad),
            page_size=page_size,
        )

    def mask(self, dtype) -> torch.Tensor:
        """Additive [rows, 1, 1, max_blocks * page_size]: 0 on a row's prefix and own columns."""
        return additive_mask(
            self.block_tables.shape[1] * self.page_size,
            self.prefix_lens,
            self.own_lens,
            self.page_size,
            dtype,
        )


def additive_mask(columns: int, prefix_lens, own_lens, page_size: int, dtype) -> torch.Tensor:
    """[rows, 1, 1, columns]: 0 where column c is a prefix column (c < P) or an own one, the dtype's minimum
    elsewhere. prefix_lens, own_lens: [rows]."""
    c = torch.arange(columns, device=prefix_lens.device)[None, :]  # [1, columns]
    own_start = ((prefix_lens + page_size - 1) // page_size * page_size)[:, None]  # [rows, 1]
    allowed = (c < prefix_lens[:, None]) | ((c >= own_start) & (c < own_start + own_lens[:, None]))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=prefix_lens.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None, None, :]


def gather(pool_layer: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Each row's pages side by side: [pages, kv_heads, page_size, d], [rows, blocks] -> [rows, kv_heads,
    blocks * page_size, d]."""
    rows, blocks = block_tables.shape
    _, kv_heads, page_size, d = pool_layer.shape
    return pool_layer[block_tables].transpose(1, 2).reshape(rows, kv_heads, blocks * page_size, d)


def write(pool_layer: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """x [n, kv_heads, d] into flat slots [n] of one layer's pages [pages, kv_heads, page_size, d]."""
    page_size = pool_layer.shape[2]
    pool_layer[slots // page_size, :, slots % page_size] = x


class _Layer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, cache: _PagedCache, layer: int):
        super().__init__()
        self.cache, self.layer = cache, layer
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # the pool is allocated already
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.cache.update_layer(self.layer, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.cache.past_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.past_len + query_length, 0

    def get_max_length(self) -> int:
        return -1


class _PagedCache(Cache):
    past_len = 0

    def __init__(self, num_layers: int):
        super().__init__(layers=[_Layer(self, i) for i in range(num_layers)])

    def update_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        raise NotImplementedError


class DecodeCache(_PagedCache):
    """A transformers Cache for one eager decode step: the new K/V [n, kv_heads, 1, d] go to their slots,
    attention reads every row's pages through its block table ([n, kv_heads, blocks * page_size, d]) under
    `batch.mask`."""

    def __init__(self, pool: PagePool, batch: DecodeBatch):
        super().__init__(pool.fp.num_layers)
        self.pool, self.batch = pool, batch
        self.past_len = batch.block_tables.shape[1] * pool.page_size - 1

    def update_layer(self, layer, k, v):
        keys, values, b = self.pool.keys[layer], self.pool.values[layer], self.batch
        write(keys, b.slots, k[:, :, 0])
        write(values, b.slots, v[:, :, 0])
        return gather(keys, b.block_tables), gather(values, b.block_tables)


class PrefillCache(_PagedCache):
    """A transformers Cache for a prefill of left-padded prompt chunks [b, Tmax] after left-padded contexts
    (batch.py's layout): each row's real chunk K/V go straight into its own pages, after the `row.length`
    tokens its earlier chunks wrote. `cascade`: attention is prefill.cascade_attention, which reads each
    context from the pages once for all its rows (`prefix_kv`): a prefix version shared by rows on their
    first chunk, prefixes of one length read by one row each (as one batch), or one row's prefix and
    earlier chunks; else (a model on another attention
    implementation) attention gets each row's context and chunk K/V side by side, [b, kv_heads, Cmax +
    Tmax, d]."""

    def __init__(self, pool: PagePool, rows: Sequence[RowKV], chunk_lens: Sequence[int], cascade: bool):
        super().__init__(pool.fp.num_layers)
        self.pool, self.cascade = pool, cascade
        ps, device = pool.page_size, pool.keys.device
        self.past_len = max(r.prefix_len + r.length for r in rows)  # Cmax: the 2D mask's context columns

        def pages(ids: list[int]) -> torch.Tensor:
            return torch.tensor(ids, dtype=torch.long, device=device)

        # Contexts: (rows [n], prefix pages, prefix length, own pages, own length).
        shared: dict[int, list] = {}  # first chunks by prefix version: its rows read it once
        self.contexts: list[tuple] = []
        for i, r in enumerate(rows):
            if r.length:  # a later chunk: this row's prefix and its own earlier tokens
                own = r.pages[: pages_for(r.length, ps)]
                prefix = r.prefix.pages if r.prefix is not None else []
                self.contexts.append(([i], pages(prefix), r.prefix_len, pages(own), r.length))
            elif r.prefix is not None:
                shared.setdefault(id(r.prefix), [[], pages(r.prefix.pages), r.prefix_len, None, 0])[0].append(
                    i
                )
        # Prefixes read by one row each (e.g. every request another task) go in batches, one per prefix
        # length: a [m, kv_heads, P, d] gather and one attention per layer for all m instead of m of each.
        singles: dict[int, list] = {}
        for c in shared.values():
            if len(c[0]) == 1:
                singles.setdefault(c[2], []).append(c)
            else:
                self.contexts.append(tuple(c))
        for length, cs in singles.items():
            if len(cs) == 1:
                self.contexts.append(tuple(cs[0]))
            else:  # rows [m], prefix pages [m, pages]
                self.contexts.append(
                    ([c[0][0] for c in cs], torch.stack([c[1] for c in cs]), length, None, 0)
                )
        self.contexts = [(torch.tensor(c[0], device=device), *c[1:]) for c in self.contexts]
        # Where each real chunk token goes: source (row, column of the padded chunk), destination slot.
        t_max = max(chunk_lens)
        src_rows, src_cols, dst = [], [], []
        for i, (r, t_len) in enumerate(zip(rows, chunk_lens, strict=True)):
            src_rows += [i] * t_len
            src_cols += range(t_max - t_len, t_max)
            dst += [r.slot(r.length + t, ps) for t in range(t_len)]
        self.src_rows, self.src_cols, self.dst_slots = (
            torch.tensor(x, dtype=torch.long, device=device) for x in (src_rows, src_cols, dst)
        )

    def update_layer(self, layer, k, v):  # k, v: [b, kv_heads, Tmax, d]
        for pool_layer, x in ((self.pool.keys[layer], k), (self.pool.values[layer], v)):
            write(pool_layer, self.dst_slots, x[self.src_rows, :, self.src_cols])  # [n_tokens, kv_heads, d]
        if self.cascade or not self.past_len:
            return k, v
        b, kv_heads, _, d = k.shape
        context_k = k.new_zeros(b, kv_heads, self.past_len, d)  # [b, kv_heads, Cmax, d], right-aligned
        context_v = torch.zeros_like(context_k)
        for rows, k_c, v_c in self.prefix_kv(layer):  # k_c, v_c [kv_heads, C, d] or [n, kv_heads, C, d]
            context_k[rows, :, self.past_len - k_c.shape[-2] :] = k_c
            context_v[rows, :, self.past_len - v_c.shape[-2] :] = v_c
        return torch.cat([context_k, k], dim=2), torch.cat([context_v, v], dim=2)

    def prefix_kv(self, layer: int):
        """(rows [n], keys, values [kv_heads, C, d]) of each context in this prefill, from its pages; for a
        batch of prefixes of one length read by one row each, (rows [m], keys, values [m, kv_heads, P, d])."""
        for rows, prefix_pages, prefix_len, own_pages, own_len in self.contexts:
            if prefix_pages.dim() == 2:  # a batch: pages [m, pages per prefix]
                yield (
                    rows,
                    *(
                        t[layer][prefix_pages]
                        .transpose(1, 2)
                        .flatten(2, 3)[:, :, :prefix_len]  # [m, kv_heads, P, d]
                        for t in (self.pool.keys, self.pool.values)
                    ),
                )
                continue
            parts = [
                tuple(
                    t[layer][p].transpose(0, 1).flatten(1, 2)[:, :length]  # [kv_heads, length, d]
                    for t in (self.pool.keys, self.pool.values)
                )
                for p, length in ((prefix_pages, prefix_len), (own_pages, own_len))
                if length
            ]
            if len(parts) == 1:
                yield rows, *parts[0]
            else:
                yield rows, torch.cat([parts[0][0], parts[1][0]], 1), torch.cat([parts[0][1], parts[1][1]], 1)
