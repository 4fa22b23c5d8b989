"""Serving while a fine-tuning job trains: each alone, then both at once, on the default model.

Serving: the server's Engine in this process (float32, eager step), `--rows` requests of the booking task
decoding 32 tokens, again and again: tokens/s. Training: a fine-tuning run in its own process
(server/finetune/run.py, as the job runner starts it) on the booking task's training data: optimizer steps
per second, read from its events. Then both at once, for each way of running the trainer (`--variants`:
its CPU niceness and torch threads). Ratios are against each alone, measured in the same run.

    python -m loadtest.bench_finetune [--rows 16] [--steps 20] [--variants 10:1 0:1 0:2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from server.config import Settings
from server.engine.engine import Engine
from server.engine.model import load_model
from server.finetune.jobs import Hyperparameters, JobFolder, job_record
from server.registry.format import load_prefix
from server.request import Request, SamplingParams
from server.training.data import prompt_token_ids, read_jsonl

BOOKING = Path(__file__).resolve().parent.parent / "prefixes" / "examples" / "booking"


def make_job(root: Path, steps: int, batch_size: int) -> JobFolder:
    folder = JobFolder(root / "bench" / f"ftjob-{time.monotonic_ns()}")
    folder.path.mkdir(parents=True)
    lines = (BOOKING / "train.jsonl").read_text().splitlines()[: steps * batch_size]
    (folder.path / "train.jsonl").write_text("\n".join(lines) + "\n")
    (folder.path / "validation.jsonl").write_text(
        "\n".join((BOOKING / "eval.jsonl").read_text().splitlines()[:8])
    )
    hp = Hyperparameters(n_epochs=1, batch_size=batch_size, num_virtual_tokens=16)
    job = job_record(
        folder.id, owner="bench", model="default", training_file="-", validation_file="-",
        hyperparameters=hp, suffix=None, seed=0,
    )  # fmt: skip
    folder.write(job | {"task_id": "bench", "fine_tuned_model_name": "bench"})
    return folder


def start_training(folder: JobFolder, nice: int, threads: int) -> subprocess.Popen:
    args = [
        "--model-cache-dir",
        str(Settings().model_cache_dir),
        "--nice",
        str(nice),
        "--threads",
        str(threads),
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "server.finetune.run", str(folder.path), *args, "--checkpoint-every", "1000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def steps(folder: JobFolder) -> int:
    return sum(1 for e in folder.events() if e["type"] == "metrics" and "step" in (e["data"] or {}))


def training_rate(folder: JobFolder, process: subprocess.Popen, serve=None) -> tuple[float, float | None]:
    """(steps/s of the run from its first step to its last, serving tokens/s meanwhile or None)."""
    while steps(folder) < 1:  # model load and the base model's evaluation: not timed
        if process.poll() is not None:
            raise RuntimeError(
                f"training run ended with {process.returncode}; see {folder.path}/events.jsonl"
            )
        time.sleep(0.05)
    start, first, tokens = time.perf_counter(), steps(folder), 0
    while process.poll() is None and steps(folder) < folder.read()["total_steps"]:
        if serve is not None:
            tokens += serve()
        else:
            time.sleep(0.05)
    seconds = time.perf_counter() - start
    done = steps(folder) - first
    process.wait()
    return done / seconds, (tokens / seconds if serve is not None else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=["10:1", "0:1", "0:2"], help="nice:threads")
    args = parser.parse_args()
    loaded = load_model("default", dtype="float32", cache_dir=Settings().model_cache_dir)
    engine = Engine(loaded.model, loaded.tokenizer)
    prefix = load_prefix((BOOKING / "prefix.safetensors").read_bytes(), engine.fingerprint)
    prompts = [
        prompt_token_ids(e.prompt, engine.tokenizer, False) for e in read_jsonl(BOOKING / "eval.jsonl")
    ]

    def serve() -> int:
        requests = [
            Request(
                prompts[i % len(prompts)], SamplingParams(max_new_tokens=32, ignore_eos=True), prefix=prefix
            )
            for i in range(args.rows)
        ]
        engine.generate(requests)
        return sum(len(r.output_token_ids) for r in requests)

    def serving_alone(seconds: float = 15.0) -> float:
        start, tokens = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            tokens += serve()
        return tokens / (time.perf_counter() - start)

    serve()  # warm
    print(
        f"# serving while training, {torch.get_num_threads()} serving threads, {args.rows} rows x 32 tokens\n"
    )
    print(
        "| trainer (nice, threads) | training alone, steps/s | with serving | ratio | serving alone, tokens/s "
        "| with training | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            nice, threads = (int(x) for x in variant.split(":"))
            alone_tps = serving_alone()  # the baseline again before each variant: the machine drifts
            folder = make_job(Path(tmp), args.steps, args.batch_size)
            folder.update(total_steps=args.steps)
            alone, _ = training_rate(folder, start_training(folder, nice, threads))
            folder = make_job(Path(tmp), args.steps, args.batch_size)
            folder.update(total_steps=args.steps)
            both, served = training_rate(folder, start_training(folder, nice, threads), serve)
            print(
                f"| {nice}, {threads} | {alone:.3f} | {both:.3f} | {both / alone:.2f} | {alone_tps:.1f} | "
                f"{served:.1f} | {served / alone_tps:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
