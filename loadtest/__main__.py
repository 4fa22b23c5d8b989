"""Load generator for prefix-server: open-loop Poisson arrivals over N tasks with Zipf popularity.

    python -m loadtest --url http://127.0.0.1:8000 --rates 1,2,4,8 --duration 60 --stream
    python -m loadtest --url http://127.0.0.1:8000 --rates 4 --label continuous --out loadtest/results/cont
    python -m loadtest --compare loadtest/results/static.json loadtest/results/cont.json
    python -m loadtest --url http://127.0.0.1:8000 --peer http://127.0.0.1:8080 --json versus.json

It creates tasks lt-0..lt-{N-1} through POST /prefixes/from-text (unless --no-create), then for each
rate sends requests at exponential inter-arrival times by the wall clock, never waiting for replies.
Prints a table (throughput, latency / TTFT / time-to-429 percentiles, counts by kind) and p99 per time
window, and writes OUT.json (summaries + every request) and OUT.png. See loadtest/README.md.

Length distributions (--prompt-len in words, about one token each; --output-len in new tokens):
  const:N                     always N
  uniform:LO:HI               integers LO..HI inclusive
  lognormal:MEAN:SIGMA[:MIN:MAX]  mean MEAN, log-space sigma SIGMA, rounded, clipped to MIN..MAX (MIN 1)
  choice:A,B,...              one of the values, equally likely

With --peer URL it runs a comparison instead of the sweep (loadtest/versus.py): the same --requests
prompts to this server (request i -> task PREFIX-i, 16-token prefixes) and to an OpenAI-compatible peer
(--peer-model, default its first model), both through POST /v1/completions, greedy, ignore_eos; one
at a time and all at once, alternating, --repeats times; prints median tokens/s and ours/peer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

import httpx

from loadtest import machine
from loadtest.loadgen import LoadConfig, LoadgenError, make_client, run_load
from loadtest.plot import plot_result
from loadtest.stats import compare_table, format_table, format_windows
from loadtest.versus import VersusConfig, format_versus, run_versus
from loadtest.workload import parse_dist


def _dist_arg(spec: str):
    try:
        return parse_dist(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _rates_arg(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated requests/s like 1,2,4, got {text!r}"
        ) from e
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError(f"expected rates > 0 requests/s, got {text!r}")
    return rates


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--url", help="the server, e.g. http://127.0.0.1:8000 (required unless --compare)")
    ap.add_argument("--rates", type=_rates_arg, default=(1.0,), help="requests/s; several = a sweep (1,2,4)")
    length = ap.add_mutually_exclusive_group()
    length.add_argument("--duration", type=float, help="seconds of arrivals per rate (default 60)")
    length.add_argument("--num-requests", type=int, help="requests per rate, instead of --duration")
    ap.add_argument("--tasks", type=int, default=8, help="number of tasks lt-0..lt-{N-1}; 0 = base model")
    ap.add_argument(
        "--zipf", type=float, default=1.1, help="popularity exponent s: task k ~ 1/k^s (0 = even)"
    )
    ap.add_argument(
        "--prompt-len", type=_dist_arg, default="uniform:16:64", help="words (default %(default)s)"
    )
    ap.add_argument(
        "--output-len", type=_dist_arg, default="uniform:4:128", help="new tokens (default %(default)s)"
    )
    ap.add_argument("--stream", action="store_true", help="stream (SSE) and measure time to first token")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--seed", type=int, default=0, help="same seed = same requests at the same times")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    ap.add_argument("--warmup", type=int, default=0, help="requests sent (all at once) before measuring")
    ap.add_argument(
        "--concurrency-limit", type=int, help="cap on requests in flight (default: none, open loop)"
    )
    ap.add_argument("--window", type=float, default=15.0, help="seconds per p99 window (default 15)")
    ap.add_argument("--label", default="run", help="name of this run, e.g. continuous / static")
    ap.add_argument("--task-prefix", default="lt", help="task ids are PREFIX-0, PREFIX-1, ...")
    ap.add_argument("--no-create", action="store_true", help="use existing tasks, create no prefixes")
    ap.add_argument(
        "--keep-tasks",
        action="store_true",
        help="keep the tasks this run created (default: deleted at the end)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        help="writes OUT.json and OUT.png (default: LABEL.json / .png in a new temp folder)",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    ap.add_argument(
        "--compare", nargs=2, type=Path, metavar=("A.json", "B.json"), help="print A vs B, B/A ratios"
    )
    vs = ap.add_argument_group("comparison with a peer (--peer: instead of the sweep)")
    vs.add_argument("--peer", metavar="URL", help="an OpenAI-compatible server to compare with")
    vs.add_argument("--peer-model", help="the peer's `model` (default: the first id of its /v1/models)")
    vs.add_argument(
        "--model-tasks", type=int, help="tasks on our server, request i -> task i %% N; 0 = base model (8)"
    )
    vs.add_argument("--requests", type=int, help="requests per run, the N of N concurrent (8)")
    vs.add_argument("--prompt-tokens", type=int, help="tokens per prompt (30)")
    vs.add_argument("--new-tokens", type=int, help="max_tokens, with ignore_eos (32)")
    vs.add_argument("--prefix-tokens", type=int, help="tokens of each task's prefix text (16)")
    vs.add_argument("--repeats", type=int, help="runs of each kind, after one warm-up (3)")
    vs.add_argument(
        "--tokenizer", help="tokenizer.json (or folder) for the texts; 'words' = word list (default model's)"
    )
    vs.add_argument("--ready-timeout", type=float, help="seconds to wait while a server answers 503 (60)")
    vs.add_argument("--json", type=Path, metavar="OUT", help="write the comparison's figures here")
    return ap


VERSUS_ONLY = (
    "peer_model",
    "model_tasks",
    "requests",
    "prompt_tokens",
    "new_tokens",
    "prefix_tokens",
    "repeats",
    "tokenizer",
    "ready_timeout",
    "json",
)


def output_paths(out: Path) -> tuple[Path, Path]:
    base = out.with_suffix("") if out.suffix in (".json", ".png") else out
    return base.parent / f"{base.name}.json", base.parent / f"{base.name}.png"


def compare(paths: list[Path]) -> int:
    try:
        a, b = (json.loads(p.read_text()) for p in paths)
        print(compare_table(a, b, names=_names(a, b, paths)))
    except (OSError, ValueError, KeyError) as e:
        print(f"cannot compare {paths[0]} and {paths[1]}: {e}", file=sys.stderr)
        return 2
    return 0


def _names(a: dict, b: dict, paths: list[Path]) -> tuple[str, str]:
    name_a, name_b = a.get("label", paths[0].stem), b.get("label", paths[1].stem)
    return (paths[0].stem, paths[1].stem) if name_a == name_b else (name_a, name_b)


def report(result: dict) -> str:
    runs = result["runs"]
    lines = [f"{result['label']}: {result['url']}", format_table(runs), ""]
    lines += [format_windows(r) for r in runs]
    for r in runs:
        if r["counts"]["rate_limited"] or not r["server_up_after"]:
            lines.append(
                f"rate {r['offered_rate']:g}/s: accepted {r['accepted']}, completed {r['accepted_completed']}, "
                f"429s {r['counts']['rate_limited']}, server up after: {'yes' if r['server_up_after'] else 'NO'}"
            )
        errors = {k: v for k, v in r["error_codes"].items() if not k.startswith("429 ")}
        if errors:
            lines.append(f"rate {r['offered_rate']:g}/s errors: {errors}")
    cap = result["capacity_rps"]
    lines.append(
        f"capacity ~ {cap:.2f} req/s (best completed req/s); 80% = {0.8 * cap:.2f}, 3x = {3 * cap:.2f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None, transport: httpx.AsyncBaseTransport | None = None) -> int:
    """The CLI; `transport` (tests) replaces the network, e.g. httpx.ASGITransport(app)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.compare:
        return compare(args.compare)
    if not args.url:
        ap.error("--url is required (or --compare A.json B.json)")
    if args.peer:
        return versus(args, ap, transport)
    stray = [name for name in VERSUS_ONLY if getattr(args, name) is not None]
    if stray:
        ap.error(f"--{stray[0].replace('_', '-')} goes with --peer URL (the comparison mode)")
    try:
        config = LoadConfig(
            url=args.url,
            rates=args.rates,
            duration_s=None if args.num_requests else (args.duration or 60.0),
            num_requests=args.num_requests,
            num_tasks=args.tasks,
            zipf_s=args.zipf,
            prompt_len=args.prompt_len,
            output_len=args.output_len,
            stream=args.stream,
            temperature=args.temperature,
            seed=args.seed,
            timeout_s=args.timeout,
            warmup=args.warmup,
            concurrency_limit=args.concurrency_limit,
            label=args.label,
            task_prefix=args.task_prefix,
            create_tasks=not args.no_create,
            keep_tasks=args.keep_tasks,
            window_s=args.window,
        )
    except ValueError as e:
        ap.error(str(e))
    out = args.out or Path(tempfile.mkdtemp(prefix="prefix-server-loadtest-")) / args.label
    json_path, png_path = output_paths(out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    busy_before = machine.busy_share()

    def save(result: dict) -> None:  # after every rate, so an interrupted sweep keeps what it measured
        json_path.write_text(json.dumps(result, indent=1))

    async def go() -> dict:
        async with make_client(config.url, config.timeout_s, transport) as client:
            return await run_load(config, client, verbose=not args.no_progress, on_run=save)

    result = run_or_exit_code(go, f"interrupted; the rates that finished are in {json_path}")
    if isinstance(result, int):
        return result
    print(report(result))
    result["machine"] = machine.summary(busy_before)
    save(result)
    for warning in machine.warnings(result["machine"]):
        print(f"loadtest: warning: {warning}", file=sys.stderr)
    print(
        f"wrote {json_path}"
        + (f" and {png_path}" if plot_result(result, png_path) else " (no matplotlib: no PNG)")
    )
    return 0


def run_or_exit_code(go, interrupted: str) -> dict | int:
    """asyncio.run(go()): its result, or the exit code (2 for a LoadgenError, 130 for Ctrl-C) once the
    reason is printed."""
    try:
        return asyncio.run(go())
    except LoadgenError as e:
        print(f"loadtest: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130


def versus(args: argparse.Namespace, ap: argparse.ArgumentParser, transport) -> int:
    """--peer: the comparison of loadtest/versus.py instead of the sweep."""
    given = {
        "peer_model": args.peer_model,
        "model_tasks": args.model_tasks,
        "requests": args.requests,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "prefix_tokens": args.prefix_tokens,
        "repeats": args.repeats,
        "tokenizer": args.tokenizer,
        "ready_timeout_s": args.ready_timeout,
    }
    try:
        config = VersusConfig(
            url=args.url,
            peer_url=args.peer,
            create_tasks=not args.no_create,
            keep_tasks=args.keep_tasks,
            task_prefix=args.task_prefix,
            timeout_s=args.timeout,
            **{k: v for k, v in given.items() if v is not None},
        )
    except ValueError as e:
        ap.error(str(e))

    async def go() -> dict:
        if transport is None:
            return await run_versus(config, verbose=not args.no_progress)
        async with (
            make_client(config.url, config.timeout_s, transport) as ours,
            make_client(config.peer_url, config.timeout_s, transport) as peer,
        ):
            return await run_versus(config, ours, peer, verbose=not args.no_progress)

    result = run_or_exit_code(go, "interrupted")
    if isinstance(result, int):
        return result
    print(format_versus(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
