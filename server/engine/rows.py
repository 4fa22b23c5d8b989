"""The engine's running rows: each running request with its place in the page pool, its generator and (for
structured output) its grammar matcher.

A row's pages are its prefix's (shared with every row of that prefix version, materialised in the pool on
first use) and its own, reserved at admission for prompt + max_new_tokens, so a row never runs out of
pages mid-decode and no K/V ever moves. Rows of one prefix version are kept adjacent: the attention kernel
reads a group's shared prefix once. A row's prompt goes into the pool in chunks (oldest rows first), and
the row decodes once all of it is in. Bookkeeping only: no forward runs here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from server.engine.paged import RowKV
from server.engine.pages import PagePool, ResidentPrefixes, pages_for
from server.request import Request

if TYPE_CHECKING:
    from llguidance import LLMatcher


class Rows:
    """requests[i] runs with its K/V at kv[i] and samples with generators[i], within matchers[i]'s grammar
    (None: unconstrained)."""

    def __init__(self, pool: PagePool, prefixes: ResidentPrefixes) -> None:
        self.pool, self.prefixes = pool, prefixes
        self.requests: list[Request] = []  # rows of one prefix version adjacent (the kernel reads it once)
        self.kv: list[RowKV] = []  # kv[i]: where requests[i]'s K/V live
        self.generators: list[torch.Generator | None] = []
        self.matchers: list[LLMatcher | None] = []
        self.prefilling: list[Request] = []  # rows whose prompt is not all in the pool yet, oldest first

    def own_pages(self, request: Request) -> int:
        """A row's own pages, reserved at admission: room for its prompt and max_new_tokens."""
        return pages_for(request.num_prompt_tokens + request.sampling.max_new_tokens, self.pool.page_size)

    def reserve(self, request: Request) -> RowKV:
        """A row's pages: its prefix's (materialised if not resident) and its own for prompt + max_new_tokens."""
        prefix = None
        if request.prefix is not None:
            prefix = self.prefixes.acquire(request.prefix, request.prefix_key)
        own = self.own_pages(request)
        self.prefixes.make_room(own)
        return RowKV(prefix, self.pool.allocate(own))

    def insert(
        self,
        request: Request,
        row: RowKV,
        generator: torch.Generator | None,
        matcher: LLMatcher | None = None,
    ) -> None:
        """Add a running row next to the rows of its prefix version (the attention kernel reads a group's
        shared prefix once), else at the end; its prompt is yet to be prefilled."""
        at = len(self.requests)
        if row.prefix is not None:
            same = [i for i, r in enumerate(self.kv) if r.prefix is row.prefix]
            at = same[-1] + 1 if same else at
        self.requests.insert(at, request)
        self.kv.insert(at, row)
        self.generators.insert(at, generator)
        self.matchers.insert(at, matcher)
        self.prefilling.append(request)

    def remove(self, done: list[Request]) -> list[Request]:
        """Give back the pages of `done` (no K/V moves: the other rows keep their pages)."""
        for request in done:
            i = self.requests.index(request)
            if request in self.prefilling:
                self.prefilling.remove(request)
            self.requests.pop(i)
            row = self.kv.pop(i)
            self.generators.pop(i)
            self.matchers.pop(i)
            self._free(request, row)
        return done

    def decoding(self) -> list[int]:
        """Indices of the running rows that decode (their prompt is all in the pool)."""
        waiting = set(self.prefilling)
        return [i for i, r in enumerate(self.requests) if r not in waiting]

    def next_chunk(self, budget: float) -> list[tuple[Request, RowKV, list[int]]]:
        """The prompt tokens of the next prefill forward: the rows still prefilling, oldest first, each
        from where its prompt stands in the pool, `budget` tokens in all."""
        chunks: list[tuple[Request, RowKV, list[int]]] = []
        for request in self.prefilling:
            if budget <= 0:
                break
            row = self.kv[self.requests.index(request)]
            take = int(min(request.num_prompt_tokens - row.length, budget))
            chunks.append((request, row, request.prompt_token_ids[row.length : row.length + take]))
            budget -= take
        return chunks

    def generator_of(self, request: Request) -> torch.Generator | None:
        return self.generators[self.requests.index(request)]

    def matcher_of(self, request: Request) -> LLMatcher | None:
        return self.matchers[self.requests.index(request)]

    def _free(self, request: Request, row: RowKV) -> None:
        self.pool.free(row.pages)
        row.pages = []
        if row.prefix is not None:
            self.prefixes.release(row.prefix)
            row.prefix = None
        request.prefix = None  # the pool holds its K/V; drop the reference
