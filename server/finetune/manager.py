"""Fine-tuning jobs as the API sees them: create one from a caller's files, list, retrieve, cancel, events.
Each owner (a tenant, or the shared owner of open mode and admins) sees only its own jobs; another's is
'not found'. The runs themselves are runner.py's.

A job is created whole or not at all: its folder (the record and a copy of its examples, written as
prompt/completion lines) is made under a temporary name and renamed into place, then the runner is told.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import InvalidRequest, JobNotFound, QuotaExceeded, shown
from server.finetune.files import FileStore
from server.finetune.jobs import FINAL, Hyperparameters, JobFolder, job_record, new_job_id
from server.finetune.runner import JobRunner
from server.finetune.training_file import CHAT
from server.training.data import Example

SUFFIX_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,40}")
ACTIVE = ("validating_files", "queued", "running", "registering")


@dataclass(frozen=True)
class JobRequest:
    """A job as the caller asked for it (the API's body, checked)."""

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = None
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)


class FineTuning:
    """The jobs under `root` (<owner>/<job id>/), their files from `files`, their runs on `runner`."""

    def __init__(self, root: Path, files: FileStore, runner: JobRunner, *, max_active_per_owner: int) -> None:
        self.root, self.files, self.runner = Path(root), files, runner
        self.max_active_per_owner = max_active_per_owner
        self._lock = threading.Lock()  # one creation at a time: the quota count and the new folder agree

    def create(self, owner: str, request: JobRequest, *, task_id: str, task_name: str) -> dict:
        """A new queued job training `task_name` (stored as `task_id` in the registry)."""
        if request.suffix is not None and not SUFFIX_PATTERN.fullmatch(request.suffix):
            raise InvalidRequest(
                f"suffix must be 1-40 of A-Za-z0-9_-, got {shown(request.suffix)}", param="suffix"
            )
        train = self._examples(owner, request.training_file, "training_file")
        validation = None
        if request.validation_file is not None:
            validation = self._examples(owner, request.validation_file, "validation_file")
            if validation[1] != train[1]:
                raise InvalidRequest(
                    f"validation_file is in the {validation[1]} shape, training_file in the {train[1]} shape: "
                    "give both in one",
                    param="validation_file",
                )
        job_id = new_job_id()
        job = job_record(
            job_id,
            owner=owner,
            model=request.model,
            training_file=request.training_file,
            validation_file=request.validation_file,
            hyperparameters=request.hyperparameters,
            suffix=request.suffix,
            seed=request.seed if request.seed is not None else secrets.randbelow(2**31),
        )
        job |= {"task_id": task_id, "fine_tuned_model_name": task_name, "chat_template": train[1] == CHAT}
        with self._lock:
            active = [j for j in self._jobs(owner) if j["status"] in ACTIVE]
            if self.max_active_per_owner and len(active) >= self.max_active_per_owner:
                raise QuotaExceeded(
                    f"{len(active)} fine-tuning jobs are queued or running, the limit is "
                    f"{self.max_active_per_owner} (--max-jobs-per-tenant): wait for one or cancel one"
                )
            folder = self._write(owner, job, train[0], validation[0] if validation else None)
        folder.append_event(f"Created fine-tuning job {job_id}")
        self.runner.submit(folder)
        return job

    def list(self, owner: str, *, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        """Newest first; `after`: the last id of the previous page."""
        jobs = sorted(self._jobs(owner), key=lambda j: (j["created_at"], j["id"]), reverse=True)
        if after is not None:
            ids = [j["id"] for j in jobs]
            if after not in ids:
                raise InvalidRequest(f"after must name one of your jobs, got {shown(after)}", param="after")
            jobs = jobs[ids.index(after) + 1 :]
        return [_shown(j) for j in jobs[:limit]], len(jobs) > limit

    def get(self, owner: str, job_id: str) -> dict:
        return _shown(self._folder(owner, job_id).read())

    def cancel(self, owner: str, job_id: str) -> dict:
        folder = self._folder(owner, job_id)
        job = folder.read()
        if job["status"] in FINAL:
            raise InvalidRequest(f"job {job_id} has already {job['status']}: there is nothing to cancel")
        return _shown(self.runner.cancel(folder))

    def events(
        self, owner: str, job_id: str, *, after: str | None = None, limit: int = 20
    ) -> tuple[list, bool]:
        """Newest first, as OpenAI lists them; `after`: the last id of the previous page."""
        events = list(reversed(self._folder(owner, job_id).events()))
        if after is not None:
            ids = [e["id"] for e in events]
            if after not in ids:
                raise InvalidRequest(
                    f"after must name one of the job's events, got {shown(after)}", param="after"
                )
            events = events[ids.index(after) + 1 :]
        return events[:limit], len(events) > limit

    # ---- internals ----
    def _examples(self, owner: str, file_id: str, param: str) -> tuple[list[Example], str]:
        try:
            record = self.files.get(owner, file_id)
        except Exception as e:  # FileNotFound: say which field named it
            e.param = param
            raise
        return self.files.examples(owner, file_id), record.shape

    def _folder(self, owner: str, job_id: str) -> JobFolder:
        if not re.fullmatch(r"ftjob-[0-9a-f]{24}", job_id or ""):
            raise JobNotFound(f"no fine-tuning job {shown(job_id)}", param="fine_tuning_job_id")
        folder = JobFolder(self.root / owner / job_id)
        if not (folder.path / "job.json").is_file():
            raise JobNotFound(f"no fine-tuning job {shown(job_id)}", param="fine_tuning_job_id")
        return folder

    def _jobs(self, owner: str) -> list[dict]:
        folders = (p.parent for p in (self.root / owner).glob("*/job.json"))
        return [JobFolder(f).read() for f in folders if not f.name.startswith(".")]

    def _write(
        self, owner: str, job: dict, train: list[Example], validation: list[Example] | None
    ) -> JobFolder:
        parent = self.root / owner
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".creating-", dir=parent))
        try:
            _write_examples(tmp / "train.jsonl", train)
            if validation is not None:
                _write_examples(tmp / "validation.jsonl", validation)
            JobFolder(tmp).write(job)
            os.replace(tmp, parent / job["id"])  # the runner sees the job whole, or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return JobFolder(parent / job["id"])


def _write_examples(path: Path, examples: list[Example]) -> None:
    lines = (
        json.dumps({"prompt": e.prompt, "completion": e.completion}, ensure_ascii=False) for e in examples
    )
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _shown(job: dict) -> dict:
    """The job as the API answers it: OpenAI's fields, and ours under `prefix_server`."""
    ours = ("task_id", "fine_tuned_model_name", "chat_template", "task_version", "total_steps")
    shown_job = {k: v for k, v in job.items() if k not in ours}
    shown_job["prefix_server"] = {
        "task": job.get("fine_tuned_model_name"),
        "task_version": job.get("task_version"),
        "chat_template": job.get("chat_template"),
    }
    return shown_job
