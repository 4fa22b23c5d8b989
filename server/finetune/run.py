"""One fine-tuning job's run, in its own process: `python -m server.finetune.run JOB_FOLDER [options]`.

It loads the base model (the server's --model, from the same model cache), trains the job's prefix
(server/training/trainer.py) with events after every step and a checkpoint every few, and writes the
result (the native prefix with its frame and scores, and a summary) into result/ whole. Started again on
the same folder, it resumes from the last checkpoint (the same steps, the same numbers as an uninterrupted
run). The server (runner.py) starts it, registers the result, and owns job.json; this process writes only
events.jsonl, checkpoint.pt and result/. It runs at a lower CPU priority (`--nice`) with `--threads` torch
threads, so serving keeps the cores it needs.

Exit status: 0 done (result/ written), 3 stopped by a cancel, 1 failed (the last event says why).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

EXIT_DONE, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 3
MIN_EXAMPLES = 10  # as OpenAI: fewer is refused (without a validation file, a tenth is held out)


def run(folder, *, model: str, dtype: str, device: str, cache_dir: Path, checkpoint_every: int) -> int:
    from server.engine.model import load_model
    from server.finetune.jobs import BASE_LR
    from server.registry.frame import TaskScores
    from server.training.data import read_jsonl, split_examples
    from server.training.export import summarize
    from server.training.frame import frame_from_data
    from server.training.trainer import TrainConfig, TrainHooks, TrainingStopped, train_prefix

    job = folder.read()
    hp = job["hyperparameters"]
    train = read_jsonl(folder.path / "train.jsonl")
    validation = folder.path / "validation.jsonl"
    if validation.is_file():
        held_out = read_jsonl(validation)
    else:
        train, held_out = split_examples(train, 0.1, job["seed"])
    config = TrainConfig(
        num_virtual_tokens=hp["num_virtual_tokens"],
        epochs=hp["n_epochs"],
        batch_size=hp["batch_size"],
        lr=BASE_LR * hp["learning_rate_multiplier"],
        seed=job["seed"],
        chat_template=bool(job.get("chat_template")),
    )
    resume = folder.load_checkpoint()
    folder.append_event(
        f"{'Resuming' if resume else 'Starting'} training: {len(train)} examples, {len(held_out)} held out, "
        f"{config.num_virtual_tokens} virtual tokens"
    )
    loaded = load_model(model, dtype=dtype, device=device, cache_dir=cache_dir)

    def on_step(step: int, total: int, loss: float) -> None:
        data = {"step": step, "total_steps": total, "train_loss": round(loss, 6)}
        folder.append_event(f"Step {step}/{total}: training loss={loss:.4f}", type="metrics", data=data)

    hooks = TrainHooks(
        on_step=on_step,
        checkpoint_every=checkpoint_every,
        save=folder.save_checkpoint,
        resume=resume,
        stop=lambda: folder.cancel_asked,
    )
    try:
        result = train_prefix(
            loaded.model,
            loaded.tokenizer,
            train,
            held_out,
            config,
            progress=False,
            log=logging.info,
            hooks=hooks,
        )
    except TrainingStopped as e:
        folder.append_event(f"Cancelled: {e}", level="warn")
        return EXIT_CANCELLED
    summary = summarize(
        result,
        config,
        task_id=job["task_id"],
        base_model=loaded.name,
        num_train=len(train),
        held_out=held_out,
    )
    scores = TaskScores(float(summary["eval_before"]), float(summary["eval_after"]), len(held_out))
    frame = frame_from_data(train, loaded.tokenizer, chat_template=config.chat_template, scores=scores)
    write_result(folder, result, summary, frame)
    folder.append_event(
        f"Held-out exact match: {summary['eval_after']:.1%} (base model: {summary['eval_before']:.1%}) "
        f"on {len(held_out)} examples",
        type="metrics",
        data={
            "eval_before": summary["eval_before"],
            "eval_after": summary["eval_after"],
            "num_eval": len(held_out),
        },
    )
    return EXIT_DONE


def write_result(folder, result, summary: dict, frame) -> None:
    """result/ whole or not at all: written in a temporary folder, renamed into place."""
    from server.training.export import write_outputs

    tmp = Path(tempfile.mkdtemp(prefix=".result-", dir=folder.path))
    try:
        write_outputs(result, summary, tmp / "prefix.safetensors", frame=frame)
        shutil.rmtree(folder.result, ignore_errors=True)
        os.replace(tmp, folder.result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from server.finetune.jobs import JobFolder

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-cache-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--nice", type=int, default=10, help="added to this process's CPU niceness")
    parser.add_argument("--checkpoint-every", type=int, default=5, help="steps between checkpoints")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.nice:
        os.nice(args.nice)
    import torch

    torch.set_num_threads(args.threads)
    folder = JobFolder(args.folder)
    started = time.monotonic()
    try:
        status = run(
            folder,
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            cache_dir=args.model_cache_dir,
            checkpoint_every=args.checkpoint_every,
        )
    except Exception as e:  # the job fails with the reason; the server reads it from the last event
        logging.exception("fine-tuning run failed")
        folder.append_event(f"Failed: {e}", level="error", type="error", data={"error": str(e)})
        return EXIT_FAILED
    logging.info("run ended with %d after %.0f s", status, time.monotonic() - started)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
