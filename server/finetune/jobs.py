"""A fine-tuning job on disk: one folder per job, everything in it safe against a process killed at any
instruction.

    <jobs root>/<owner>/<job id>/
        job.json          the job as OpenAI's API shows it (+ our fields), replaced whole on every change
        train.jsonl       the training examples, copied from the file at creation (deleting the file later
        validation.jsonl  does not break the job); validation only if one was given
        events.jsonl      one event per line, appended; a torn last line (a kill mid-write) is skipped
        checkpoint.pt     the run's state every few steps (trainer.TrainHooks), replaced whole
        cancel            exists once a cancel was asked: the run stops before its next step
        result/           prefix.safetensors + summary.json, written by the run once training is done

A job's status moves validating_files -> queued -> running -> succeeded | failed | cancelled, as OpenAI's;
`registering` (ours, between running and succeeded) marks a result being added to the prefix registry, so a
restart in the middle finishes the registration instead of training again.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from server.errors import InvalidRequest

BASE_LR = 1e-2  # learning_rate_multiplier 1.0 means this (AdamW's peak, as `prefix-server train --lr`)
FINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Hyperparameters:
    """OpenAI's names, plus num_virtual_tokens (the prefix's length)."""

    n_epochs: int = 3
    batch_size: int = 8
    learning_rate_multiplier: float = 1.0
    num_virtual_tokens: int = 16

    def __post_init__(self) -> None:
        for name, low, high in (("n_epochs", 1, 50), ("batch_size", 1, 256), ("num_virtual_tokens", 1, 256)):
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                raise InvalidRequest(
                    f"hyperparameters.{name} must be an integer in [{low}, {high}], got {value!r}",
                    param=f"hyperparameters.{name}",
                )
        lr = self.learning_rate_multiplier
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr <= 100:
            raise InvalidRequest(
                f"hyperparameters.learning_rate_multiplier must be a number in (0, 100], got {lr!r}",
                param="hyperparameters.learning_rate_multiplier",
            )

    @property
    def lr(self) -> float:
        return BASE_LR * self.learning_rate_multiplier


def new_job_id() -> str:
    return "ftjob-" + secrets.token_hex(12)


def write_json(path: Path, value: object) -> None:
    """Replace `path` whole: a reader finds the old content or the new, never part of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, ensure_ascii=False, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class JobFolder:
    """One job's folder (see the module docstring). The server and the run's process both write here:
    job.json is the server's alone; events.jsonl, checkpoint.pt and result/ are the run's."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def id(self) -> str:
        return self.path.name

    # ---- the record ----
    def read(self) -> dict:
        return json.loads((self.path / "job.json").read_text(encoding="utf-8"))

    def write(self, job: dict) -> None:
        write_json(self.path / "job.json", job)

    def update(self, **changes) -> dict:
        job = {**self.read(), **changes}
        self.write(job)
        return job

    # ---- events ----
    def append_event(self, message: str, *, level: str = "info", type: str = "message", data=None) -> dict:
        event = {
            "id": "ftevent-" + secrets.token_hex(12),
            "object": "fine_tuning.job.event",
            "created_at": int(time.time()),
            "level": level,
            "message": message,
            "data": data,
            "type": type,
        }
        with open(self.path / "events.jsonl", "a", encoding="utf-8") as f:  # one write per line
            f.write(json.dumps(event, ensure_ascii=False) + "\n")
        return event

    def events(self) -> list[dict]:
        """Oldest first; a torn last line (its writer killed mid-write) is skipped."""
        try:
            lines = (self.path / "events.jsonl").read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    # ---- the run's state ----
    def save_checkpoint(self, state: dict) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", dir=self.path)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path / "checkpoint.pt")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self) -> dict | None:
        path = self.path / "checkpoint.pt"
        return torch.load(path, weights_only=False) if path.is_file() else None

    def ask_cancel(self) -> None:
        (self.path / "cancel").touch()

    @property
    def cancel_asked(self) -> bool:
        return (self.path / "cancel").exists()

    @property
    def result(self) -> Path:
        return self.path / "result"


def job_record(
    job_id: str,
    *,
    owner: str,
    model: str,
    training_file: str,
    validation_file: str | None,
    hyperparameters: Hyperparameters,
    suffix: str | None,
    seed: int,
) -> dict:
    """A new job as OpenAI's `fine_tuning.job` object (our additions: owner, task_id)."""
    return {
        "id": job_id,
        "object": "fine_tuning.job",
        "created_at": int(time.time()),
        "finished_at": None,
        "model": model,
        "fine_tuned_model": None,
        "organization_id": owner,
        "status": "queued",
        "hyperparameters": asdict(hyperparameters),
        "training_file": training_file,
        "validation_file": validation_file,
        "result_files": [],
        "trained_tokens": None,
        "error": None,
        "seed": seed,
        "suffix": suffix,
        "estimated_finish": None,
        "method": {"type": "prefix_tuning"},
        "metadata": None,
        "integrations": [],
        "user_provided_suffix": suffix,
    }
