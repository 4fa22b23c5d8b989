"""The PNG of a result: latency percentiles and throughput against offered load, or over time for one rate."""

from __future__ import annotations

from pathlib import Path


def plot_result(result: dict, path: Path) -> bool:
    """Write the plot; False (and nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return False
    runs = result["runs"]
    if len(runs) > 1:
        fig = _sweep(plt, ticker, runs)
    else:
        fig = _over_time(plt, ticker, runs[0], result.get("config", {}).get("window_s", 15.0))
    fig.suptitle(f"{result.get('label', '')}  {result.get('url', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _ms_axis(ax, ticker, values: list[float]) -> None:
    """Log scale, with plain numbers, when latencies span more than a decade (overload); else linear."""
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 10:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.grid(True, which="both", alpha=0.3)


def _pct(run: dict, key: str, q: int) -> float:
    value = (run.get(key) or {}).get(f"p{q}")
    return float("nan") if value is None else value


def _sweep(plt, ticker, runs: list[dict]):
    runs = sorted(runs, key=lambda r: r["offered_rate"])
    rates = [r["offered_rate"] for r in runs]
    fig, (ax_lat, ax_tput) = plt.subplots(1, 2, figsize=(12, 4.8))
    for q, style in ((50, "o-"), (95, "s-"), (99, "^-")):
        ax_lat.plot(rates, [_pct(r, "latency_ms", q) for r in runs], style, label=f"latency p{q}")
    if any(r.get("ttft_ms") for r in runs):
        ax_lat.plot(rates, [_pct(r, "ttft_ms", 99) for r in runs], "x--", label="TTFT p99")
    ax_lat.set_xlabel("offered load (requests/s)")
    ax_lat.set_ylabel("ms")
    _ms_axis(ax_lat, ticker, [y for line in ax_lat.get_lines() for y in line.get_ydata() if y == y])
    ax_lat.legend()
    ax_lat.set_title("latency of completed requests")

    ax_tput.plot(rates, [r["throughput_rps"] for r in runs], "o-", label="completed req/s")
    ax_tput.plot(
        rates, [r["counts"]["rate_limited"] / max(r["elapsed_s"], 1e-9) for r in runs], "s--", label="429/s"
    )
    ax_tput.plot(rates, rates, ":", color="gray", label="offered")
    ax_tput.set_xlabel("offered load (requests/s)")
    ax_tput.set_ylabel("requests/s")
    ax_tput.grid(True, alpha=0.3)
    ax_tok = ax_tput.twinx()
    ax_tok.plot(
        rates, [r["output_tokens_per_s"] for r in runs], "d-", color="tab:green", label="output tokens/s"
    )
    ax_tok.set_ylabel("output tokens/s")
    lines = ax_tput.get_legend_handles_labels()
    lines_tok = ax_tok.get_legend_handles_labels()
    ax_tput.legend(lines[0] + lines_tok[0], lines[1] + lines_tok[1], loc="upper left")
    ax_tput.set_title("throughput")
    return fig


def _over_time(plt, ticker, run: dict, window_s: float):
    fig, ax = plt.subplots(figsize=(10, 4.8))
    requests = run.get("requests", [])
    ok = [r for r in requests if r["status"] == 200 and not r["error_code"]]
    limited = [r for r in requests if r["status"] == 429]
    failed = [r for r in requests if r["status"] != 429 and (r["status"] != 200 or r["error_code"])]
    ax.plot([r["start_s"] for r in ok], [r["latency_ms"] for r in ok], ".", ms=3, alpha=0.5, label="ok")
    if limited:
        ax.plot([r["start_s"] for r in limited], [r["latency_ms"] for r in limited], "x", ms=3, label="429")
    if failed:
        ax.plot([r["start_s"] for r in failed], [r["latency_ms"] for r in failed], "r+", label="error")
    windows = [w for w in run["windows"] if w["p99_ms"] is not None]
    if windows:
        last = max(r["start_s"] for r in requests)  # the last window is usually partial
        xs = [x for w in windows for x in (w["start_s"], min(w["start_s"] + window_s, last))]
        ys = [w["p99_ms"] for w in windows for _ in range(2)]
        ax.plot(xs, ys, "-", color="black", label=f"p99 per {window_s:g} s")
    ax.set_xlabel("send time (s)")
    ax.set_ylabel("latency (ms)")
    _ms_axis(ax, ticker, [r["latency_ms"] for r in requests])
    ax.legend(loc="best")
    ax.set_title(f"{run['offered_rate']:g} req/s offered: latency over time")
    return fig
