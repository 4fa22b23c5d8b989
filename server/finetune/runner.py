"""The server's side of fine-tuning jobs: a queue, one run at a time in its own process (run.py), and the
registration of each result as a new task version.

Why a process: training is a forward and a backward through the base model per step; on the engine's
thread it would hold every running row for that long. A separate process at a lower CPU priority (nice)
takes the cores when serving leaves them idle, and the kernel's scheduler hands them back to serving at
once (measured: docs/training.md). The run dies with the server (PR_SET_PDEATHSIG); a restarted server
finds the job `running` and starts it again, and the run resumes from its last checkpoint.

Several servers over one folder (Ray Serve replicas sharing a prefix dir): one runs the jobs, the one that
holds the folder's runner lock (a file lock that dies with its holder); the others only queue jobs, and
take over when the holder is gone.

Registration is the runner's alone and happens once: the job says `registering` (with the task id) before
the result is added to the registry and `succeeded` after; a restart in between registers it again (the
registry's version is new, the prefix the same), never half of it.
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

from server.finetune.jobs import FINAL, JobFolder
from server.finetune.run import EXIT_CANCELLED, EXIT_DONE

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: between fork and exec only a C call runs


def _die_with_parent() -> None:  # in the child, before exec: SIGKILL when the runner's thread ends
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class JobRunner:
    """Runs the jobs under `root` (<owner>/<job id>/ folders), oldest first, one at a time.

    register(task_id, prefix file bytes) -> the new version: adds a finished job's prefix to the registry.
    run_args: the run's options after its folder (model, cache dir, threads, nice; see run.py)."""

    def __init__(self, root: Path, register: Callable[[str, bytes], int], run_args: list[str]) -> None:
        self.root = Path(root)
        self.register = register
        self.command = [sys.executable, "-m", "server.finetune.run"]
        self.run_args = run_args
        self._wake = threading.Condition()
        self._stopping = False
        self._current: tuple[JobFolder, subprocess.Popen] | None = None
        self._thread: threading.Thread | None = None
        self._lock = FileLock(self.root / ".runner.lock", thread_local=False)  # one runner per folder

    # ---- the server's calls ----
    def start(self) -> None:
        """Run the queue on a thread of its own, once this server holds the folder's runner lock."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._loop, name="fine-tuning", daemon=True)
        self._thread.start()

    def _recover(self) -> None:
        """What the previous runner left: running jobs go back to the queue (they resume from their
        checkpoint), creations killed before their rename are removed."""
        for stale in self.root.glob("*/.creating-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for folder in self.folders():
            if folder.read()["status"] == "running":
                folder.update(status="queued")
                folder.append_event(
                    "The server restarted; the job is queued again and resumes from its checkpoint"
                )

    def submit(self, folder: JobFolder) -> None:
        with self._wake:
            self._wake.notify()

    def cancel(self, folder: JobFolder) -> dict:
        """Cancel a job: a queued one at once, a running one at its next step (its process is also told to
        stop now). A finished job is left as it is."""
        with self._wake:
            job = folder.read()
            if job["status"] in FINAL or job["status"] == "registering":
                return job
            folder.ask_cancel()
            if self._current is not None and self._current[0].path == folder.path:
                self._current[1].send_signal(signal.SIGTERM)
                return folder.update(status="cancelled", finished_at=int(time.time()))
            folder.append_event("Job cancelled before it started")
            return folder.update(status="cancelled", finished_at=int(time.time()))

    def close(self, timeout_s: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            if self._current is not None:
                self._current[1].terminate()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def folders(self) -> list[JobFolder]:
        """Every job, oldest first (a folder without job.json: a creation that did not finish)."""
        found = [
            JobFolder(p.parent) for p in self.root.glob("*/*/job.json") if not p.parent.name.startswith(".")
        ]
        return sorted(found, key=lambda f: (f.read()["created_at"], f.id))

    # ---- the runner's thread ----
    def _next(self) -> JobFolder | None:
        for folder in self.folders():
            if folder.read()["status"] in ("queued", "registering"):
                return folder
        return None

    def _take_the_lock(self) -> bool:
        """Wait until this server holds the folder's runner lock (False: the server is stopping)."""
        while True:
            try:
                self._lock.acquire(timeout=0)
                break
            except Timeout:
                with self._wake:
                    if self._stopping:
                        return False
                    self._wake.wait(timeout=5.0)
        self._recover()
        return True

    def _loop(self) -> None:
        if not self._take_the_lock():
            return
        try:
            self._run_queue()
        finally:
            self._lock.release()

    def _run_queue(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and (folder := self._next()) is None:
                    self._wake.wait(timeout=5.0)
                if self._stopping:
                    return
            try:
                self._run(folder)
            except Exception as e:  # a job's failure must not end the runner
                log.exception("fine-tuning job %s failed", folder.id)
                folder.append_event(f"Failed: {e}", level="error", type="error")
                folder.update(status="failed", finished_at=int(time.time()), error=_error(str(e)))

    def _run(self, folder: JobFolder) -> None:
        job = folder.read()
        if job["status"] == "queued":
            with self._wake:
                if folder.cancel_asked or self._stopping:
                    return
                folder.update(status="running")
                folder.append_event("Job started")
                with open(folder.path / "run.log", "ab") as out:
                    process = subprocess.Popen(
                        [*self.command, str(folder.path), *self.run_args],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        preexec_fn=_die_with_parent,
                    )
                self._current = (folder, process)
            code = process.wait()
            with self._wake:
                self._current = None
                if self._stopping:
                    return  # the server is going away: the job stays `running`, and resumes on restart
            if folder.cancel_asked or code == EXIT_CANCELLED:
                if folder.read()["status"] != "cancelled":
                    folder.update(status="cancelled", finished_at=int(time.time()))
                return
            if code != EXIT_DONE:
                message = (
                    _last_error(folder) or f"the training process ended with status {code} (see run.log)"
                )
                folder.update(status="failed", finished_at=int(time.time()), error=_error(message))
                return
            folder.update(status="registering")
        self._register(folder)

    def _register(self, folder: JobFolder) -> None:
        job = folder.read()
        version = self.register(job["task_id"], (folder.result / "prefix.safetensors").read_bytes())
        folder.append_event(f"New task version {job['fine_tuned_model_name']} v{version}; the job succeeded")
        folder.update(
            status="succeeded",
            fine_tuned_model=job["fine_tuned_model_name"],
            finished_at=int(time.time()),
            task_version=version,
        )


def _last_error(folder: JobFolder) -> str | None:
    errors = [e["message"] for e in folder.events() if e["level"] == "error"]
    return errors[-1] if errors else None


def _error(message: str) -> dict:
    return {"code": "training_failed", "message": message, "param": None}
