"""What the load generator measured: per-request records, per-run summaries, and the tables printed.

Pure Python. A summary is a plain dict (it goes into the JSON result as it is); times are in ms unless
a key ends in `_s`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

CATEGORIES = ("ok", "rate_limited", "client_error", "server_error", "transport", "stream_error")


@dataclass
class RequestResult:
    """One request as the client saw it; times are seconds from the run's start, durations ms."""

    index: int
    task_id: str | None
    max_new_tokens: int
    scheduled_s: float  # when the Poisson schedule wanted it sent
    start_s: float  # when it was sent
    status: int | None  # None: no HTTP reply (connection error, timeout)
    error_code: str | None  # the server's error.code, or the exception's name
    latency_ms: float
    ttft_ms: float | None = None  # streaming only: send -> first token event
    completion_tokens: int = 0

    @property
    def category(self) -> str:
        if self.status is None:
            return "transport"
        if self.status == 429:
            return "rate_limited"
        if 400 <= self.status < 500:
            return "client_error"
        if self.status >= 500:
            return "server_error"
        return "stream_error" if self.error_code else "ok"


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks; None if empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _dist(values: list[float]) -> dict | None:
    if not values:
        return None
    out = {f"p{q}": round(percentile(values, q), 2) for q in (50, 95, 99)}
    return out | {"mean": round(statistics.fmean(values), 2), "max": round(max(values), 2)}


def _num_windows(results: list[RequestResult], window_s: float) -> int:
    return int(max(r.start_s for r in results) // window_s) + 1 if results else 0


def summarize(
    results: list[RequestResult],
    *,
    offered_rate: float,
    num_planned: int,
    arrival_span_s: float,
    window_s: float = 15.0,
) -> dict:
    """One run's figures: throughput over the whole run (arrivals + drain), percentiles, counts, windows."""
    ok = [r for r in results if r.category == "ok"]
    counts = {c: sum(r.category == c for r in results) for c in CATEGORIES}
    error_codes: dict[str, int] = {}
    for r in results:
        if r.category != "ok":
            key = f"{r.status or 'no-reply'} {r.error_code or '-'}"
            error_codes[key] = error_codes.get(key, 0) + 1
    elapsed_s = max((r.start_s + r.latency_ms / 1000 for r in results), default=0.0)
    tokens = sum(r.completion_tokens for r in ok)
    buckets: list[list[RequestResult]] = [[] for _ in range(_num_windows(results, window_s))]
    for r in results:
        buckets[int(r.start_s // window_s)].append(r)
    windows = []
    for k, in_window in enumerate(buckets):
        p99 = percentile([r.latency_ms for r in in_window if r.category == "ok"], 99)
        windows.append(
            {
                "start_s": round(k * window_s, 3),
                "num_sent": len(in_window),
                "num_ok": sum(r.category == "ok" for r in in_window),
                "num_429": sum(r.category == "rate_limited" for r in in_window),
                "num_errors": sum(r.category not in ("ok", "rate_limited") for r in in_window),
                "p99_ms": None if p99 is None else round(p99, 2),
            }
        )
    window_p99s = [w["p99_ms"] for w in windows if w["p99_ms"] is not None]
    accepted = len(results) - counts["rate_limited"]
    return {
        "offered_rate": offered_rate,
        "num_planned": num_planned,
        "num_sent": len(results),
        "arrival_span_s": round(arrival_span_s, 3),
        "elapsed_s": round(elapsed_s, 3),
        "achieved_offered_rate": round(len(results) / arrival_span_s, 3) if arrival_span_s > 0 else None,
        "throughput_rps": round(len(ok) / elapsed_s, 3) if elapsed_s > 0 else 0.0,
        "output_tokens_per_s": round(tokens / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "completion_tokens": tokens,
        "counts": counts,
        "error_codes": dict(sorted(error_codes.items())),
        "accepted": accepted,
        "accepted_completed": counts["ok"],
        "latency_ms": _dist([r.latency_ms for r in ok]),
        "ttft_ms": _dist([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        "time_to_429_ms": _dist([r.latency_ms for r in results if r.category == "rate_limited"]),
        "send_lag_ms": _dist([(r.start_s - r.scheduled_s) * 1000 for r in results]),
        "window_s": window_s,
        "windows": windows,
        "window_p99_max_over_median": (
            round(max(window_p99s) / statistics.median(window_p99s), 3) if window_p99s else None
        ),
    }


def _get(summary: dict, path: str) -> float | None:
    value = summary
    for key in path.split("."):
        if value is None:
            return None
        value = value.get(key)
    return value


def _fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _markdown(header: list[str], rows: list[list[str]], left: int = 0) -> str:
    """Columns right-aligned (numbers), except the first `left` ones."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        padded = [
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def format_table(summaries: list[dict]) -> str:
    """A markdown table, one row per run: counts, throughput, latency / TTFT / time-to-429 percentiles (ms)."""
    header = ["rate/s", "sent", "ok", "429", "4xx", "5xx", "net", "req/s", "tok/s"]
    header += ["p50", "p95", "p99", "ttft50", "ttft99", "429 p50", "429 p99"]
    rows = []
    for s in summaries:
        c = s["counts"]
        rows.append(
            [_fmt(s["offered_rate"], 2), str(s["num_sent"]), str(c["ok"]), str(c["rate_limited"])]
            + [str(c["client_error"]), str(c["server_error"] + c["stream_error"]), str(c["transport"])]
            + [_fmt(s["throughput_rps"], 2), _fmt(s["output_tokens_per_s"], 1)]
            + [_fmt(_get(s, f"latency_ms.p{q}")) for q in (50, 95, 99)]
            + [_fmt(_get(s, "ttft_ms.p50")), _fmt(_get(s, "ttft_ms.p99"))]
            + [_fmt(_get(s, "time_to_429_ms.p50"), 1), _fmt(_get(s, "time_to_429_ms.p99"), 1)]
        )
    return _markdown(header, rows)


def format_windows(summary: dict) -> str:
    """p99 latency per window of send time, e.g. `0-15s 812 | 15-30s 830 | ...` (ms)."""
    w = summary["window_s"]
    cells = [f"{x['start_s']:g}-{x['start_s'] + w:g}s {_fmt(x['p99_ms'])}" for x in summary["windows"]]
    spread = summary["window_p99_max_over_median"]
    return (
        f"rate {summary['offered_rate']:g}/s, p99 ms per {w:g} s window: "
        + " | ".join(cells)
        + ("" if spread is None else f"  (max/median {spread:.2f})")
    )


COMPARED = (
    ("throughput req/s", "throughput_rps", 2),
    ("output tokens/s", "output_tokens_per_s", 1),
    ("latency p50 ms", "latency_ms.p50", 0),
    ("latency p95 ms", "latency_ms.p95", 0),
    ("latency p99 ms", "latency_ms.p99", 0),
    ("TTFT p50 ms", "ttft_ms.p50", 0),
    ("TTFT p99 ms", "ttft_ms.p99", 0),
    ("429s", "counts.rate_limited", 0),
    ("other errors", None, 0),
)


def _errors(s: dict) -> int:
    return sum(v for k, v in s["counts"].items() if k not in ("ok", "rate_limited"))


def compare_table(a: dict, b: dict, names: tuple[str, str] | None = None) -> str:
    """Two results side by side per offered rate they share, with B/A ratios (e.g. continuous / static)."""
    name_a, name_b = names or (a.get("label", "A"), b.get("label", "B"))
    if name_a == name_b:
        name_a, name_b = f"A: {name_a}", f"B: {name_b}"
    runs_a = {round(r["offered_rate"], 6): r for r in a["runs"]}
    runs_b = {round(r["offered_rate"], 6): r for r in b["runs"]}
    pairs = [(runs_a[k], runs_b[k]) for k in sorted(runs_a.keys() & runs_b.keys())]
    if not pairs and len(runs_a) == len(runs_b) == 1:
        pairs = [(a["runs"][0], b["runs"][0])]  # one run each: compare them even at different rates
    if not pairs:
        raise ValueError(
            f"no offered rate in common: {name_a} has {sorted(runs_a)}, {name_b} has {sorted(runs_b)}"
        )
    blocks = []
    for ra, rb in pairs:
        rows = []
        for title, path, digits in COMPARED:
            va = _errors(ra) if path is None else _get(ra, path)
            vb = _errors(rb) if path is None else _get(rb, path)
            ratio = f"{vb / va:.2f}" if va and vb is not None else "-"
            rows.append([title, _fmt(va, digits), _fmt(vb, digits), ratio])
        rates = f"{ra['offered_rate']:g}" + (
            "" if rb["offered_rate"] == ra["offered_rate"] else f" vs {rb['offered_rate']:g}"
        )
        blocks.append(
            f"offered rate {rates} req/s\n" + _markdown(["metric", name_a, name_b, "B/A"], rows, left=1)
        )
    return "\n\n".join(blocks)
