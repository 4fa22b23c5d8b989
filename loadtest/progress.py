"""A progress bar over one run's requests: tqdm on a terminal, a plain line every 10% otherwise."""

from __future__ import annotations

import sys
import time

from loadtest.stats import RequestResult

try:
    from tqdm import tqdm
except ImportError:  # tqdm is an optional extra (`pip install .[loadtest]`)
    tqdm = None


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, stream=None) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.stream = stream or sys.stderr
        self.num_done = self.num_ok = self.num_429 = self.num_errors = 0
        self.started = time.perf_counter()
        self._next_print = 0
        use_bar = enabled and tqdm is not None and self.stream.isatty()
        self.bar = tqdm(total=total, desc=desc, unit="req", file=self.stream) if use_bar else None

    def update(self, result: RequestResult) -> None:
        self.num_done += 1
        category = result.category
        self.num_ok += category == "ok"
        self.num_429 += category == "rate_limited"
        self.num_errors += category not in ("ok", "rate_limited")
        if self.bar is not None:
            self.bar.set_postfix(ok=self.num_ok, r429=self.num_429, err=self.num_errors, refresh=False)
            self.bar.update(1)
        elif self.enabled and (self.num_done >= self._next_print or self.num_done == self.total):
            self._next_print = self.num_done + max(1, self.total // 10)
            print(f"{self.desc}: {self.line()}", file=self.stream, flush=True)

    def line(self) -> str:
        seconds = time.perf_counter() - self.started
        return (
            f"{self.num_done}/{self.total} done in {seconds:.1f} s "
            f"(ok {self.num_ok}, 429 {self.num_429}, errors {self.num_errors})"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
