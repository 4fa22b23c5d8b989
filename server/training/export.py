"""Write a training run's results: the native prefix file, its JSON summary, and the PEFT adapter folder."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from server.registry.format import save_native
from server.registry.frame import TaskFrame
from server.training.data import Example, answer
from server.training.trainer import TrainConfig, TrainResult

NUM_SAMPLES = 5  # held-out examples shown in the summary, with the base model's and the prefix's output


def summarize(
    result: TrainResult,
    config: TrainConfig,
    *,
    task_id: str,
    base_model: str,
    num_train: int,
    held_out: Sequence[Example],
) -> dict:
    """Everything worth knowing about a run, JSON-ready (scores are exact-match fractions in [0, 1])."""
    tail = result.losses[-10:]
    return {
        "task_id": task_id,
        "base_model": base_model,
        "num_virtual_tokens": config.num_virtual_tokens,
        "prefix_projection": config.prefix_projection,
        "init": config.init,
        "chat_template": config.chat_template,
        "num_train": num_train,
        "num_eval": len(held_out),
        "epochs": config.epochs,
        "num_steps": len(result.losses),
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": config.seed,
        "eval_before": round(result.before.score, 4),
        "eval_after": round(result.after.score, 4),
        "first_loss": round(result.losses[0], 4),
        "final_loss": round(statistics.fmean(tail), 4),  # mean of the last 10 steps
        "train_seconds": round(result.train_seconds, 1),
        "eval_seconds": round(result.eval_seconds, 1),
        "samples": [
            {"prompt": ex.prompt, "expected": answer(ex.completion), "before": before, "after": after}
            for ex, before, after in zip(
                held_out[:NUM_SAMPLES], result.before.outputs, result.after.outputs, strict=False
            )
        ],
    }


def write_outputs(
    result: TrainResult,
    summary: dict,
    output: Path,
    peft_output: Path | None = None,
    frame: TaskFrame | None = None,
) -> list[Path]:
    """Native prefix at `output` (summary scores and the prompt frame in its metadata), summary at
    output.with_suffix('.json'), and PEFT's save_pretrained folder at `peft_output` if given.
    Returns the paths written."""
    keys = ("task_id", "base_model", "num_train", "num_eval", "eval_before", "eval_after", "chat_template")
    metadata = {k: str(summary[k]).lower() if isinstance(summary[k], bool) else str(summary[k]) for k in keys}
    if frame is not None:
        metadata.update(frame.to_metadata())
        summary = {**summary, "frame": frame.to_dict()}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(save_native(result.prefix, metadata))
    summary_path = output.with_suffix(".json")
    summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    written = [output, summary_path]
    if peft_output is not None:
        result.peft_model.save_pretrained(str(peft_output))
        written.append(Path(peft_output))
    return written
