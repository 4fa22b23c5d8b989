"""Fine-tuning jobs below the HTTP layer (server/finetune): the run in its own process, its events and
checkpoints, resuming after a kill to exactly the prefix an uninterrupted run gives, cancel, and the
runner registering the result once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import chat_engine, save_model_folder
from test_training import synthetic, write_jsonl

from server.finetune.jobs import FINAL, Hyperparameters, JobFolder, job_record
from server.finetune.runner import JobRunner

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_model_folder(chat_engine("llama-gqa"), tmp_path_factory.mktemp("tiny-model"))


def run_args(model_folder, tmp_path) -> list[str]:
    return ["--model", str(model_folder), "--model-cache-dir", str(tmp_path / "cache"), "--nice", "0"]


def make_job(
    root: Path, job_id: str = "ftjob-test", *, n_epochs: int = 2, created: int | None = None
) -> JobFolder:
    folder = JobFolder(root / "acme" / job_id)
    folder.path.mkdir(parents=True)
    write_jsonl(folder.path / "train.jsonl", synthetic(40, seed=1))
    write_jsonl(folder.path / "validation.jsonl", synthetic(10, seed=2))
    job = job_record(
        job_id,
        owner="acme",
        model="tiny",
        training_file="file-1",
        validation_file="file-2",
        hyperparameters=Hyperparameters(n_epochs=n_epochs, batch_size=4, num_virtual_tokens=4),
        suffix="t",
        seed=0,
    )
    job |= {"task_id": f"acme~ft-{job_id}", "fine_tuned_model_name": f"ft-{job_id}"}
    if created is not None:
        job["created_at"] = created
    folder.write(job)
    return folder


def run_child(folder: JobFolder, args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "server.finetune.run", str(folder.path), *args, "--checkpoint-every", "5"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def steps_of(folder: JobFolder) -> list[int]:
    return [
        e["data"]["step"] for e in folder.events() if e["type"] == "metrics" and "step" in (e["data"] or {})
    ]


def prefix_of(folder: JobFolder):
    data = (folder.result / "prefix.safetensors").read_bytes()
    from safetensors.torch import load

    return load(data)


def test_a_run_killed_mid_way_resumes_to_the_same_prefix(model_folder, tmp_path):
    args = run_args(model_folder, tmp_path)
    whole = make_job(tmp_path / "a", "ftjob-whole")
    assert run_child(whole, args).wait() == 0
    assert steps_of(whole) == list(range(1, 21))  # 40 examples / 4 x 2 epochs
    summary = json.loads((whole.result / "prefix.json").read_text())
    assert summary["num_steps"] == 20 and summary["num_eval"] == 10

    killed = make_job(tmp_path / "b", "ftjob-killed")
    child = run_child(killed, args)
    while len(steps_of(killed)) < 7:  # past the checkpoint at step 5
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    checkpoint = killed.load_checkpoint()
    assert not killed.result.exists() and checkpoint is not None
    saved = len(checkpoint["losses"])  # 5, 10, ...: where the kill found it (a fast machine gets further)
    assert saved % 5 == 0 and saved >= 5
    assert run_child(killed, args).wait() == 0
    events = killed.events()
    at = max(i for i, e in enumerate(events) if e["message"].startswith("Resuming"))
    resumed = [
        e["data"]["step"] for e in events[at:] if e["type"] == "metrics" and "step" in (e["data"] or {})
    ]
    assert resumed == list(range(saved + 1, 21))  # from the checkpoint on, again
    a, b = prefix_of(whole), prefix_of(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_runner_registers_results_once_and_cancels(model_folder, tmp_path):
    registered: list[tuple[str, bytes]] = []

    def register(task_id: str, data: bytes) -> int:
        registered.append((task_id, data))
        return len(registered)

    root = tmp_path / "jobs"
    first = make_job(root, "ftjob-1", n_epochs=1, created=1)
    second = make_job(root, "ftjob-2", n_epochs=50, created=2)  # long: cancelled while it runs
    third = make_job(root, "ftjob-3", created=3)  # cancelled while queued
    runner = JobRunner(root, register, run_args(model_folder, tmp_path))
    runner.start()
    try:
        assert runner.cancel(third)["status"] == "cancelled"
        deadline = time.monotonic() + 240
        while second.read()["status"] != "running" or len(steps_of(second)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert first.read()["status"] == "succeeded"
        assert runner.cancel(second)["status"] == "cancelled"
        while (first.read()["status"], second.read()["status"]) != ("succeeded", "cancelled"):
            time.sleep(0.1)
    finally:
        runner.close()
    job = first.read()
    assert job["fine_tuned_model"] == "ft-ftjob-1" and job["task_version"] == 1 and job["finished_at"]
    assert [t for t, _ in registered] == ["acme~ft-ftjob-1"]
    assert registered[0][1] == (first.result / "prefix.safetensors").read_bytes()
    assert not second.result.exists() and third.read()["status"] == "cancelled" and not steps_of(third)
    assert {f.read()["status"] for f in (first, second, third)} <= set(FINAL)


def test_a_restarted_runner_resumes_a_running_job_and_finishes_a_registration(model_folder, tmp_path):
    root = tmp_path / "jobs"
    running = make_job(root, "ftjob-run", n_epochs=1, created=1)
    running.update(status="running")  # as a server killed mid-run leaves it
    registering = make_job(root, "ftjob-reg", n_epochs=1, created=2)
    assert run_child(registering, run_args(model_folder, tmp_path)).wait() == 0
    registering.update(status="registering")  # killed between the run's end and the registry
    registered: list[str] = []
    runner = JobRunner(
        root, lambda task_id, data: registered.append(task_id) or 1, run_args(model_folder, tmp_path)
    )
    runner.start()
    try:
        deadline = time.monotonic() + 240
        while {f.read()["status"] for f in (running, registering)} != {"succeeded"}:
            assert time.monotonic() < deadline, [f.read()["status"] for f in (running, registering)]
            time.sleep(0.1)
    finally:
        runner.close()
    assert sorted(registered) == ["acme~ft-ftjob-reg", "acme~ft-ftjob-run"]
    assert any("server restarted" in e["message"] for e in running.events())


def test_a_failed_run_says_why(model_folder, tmp_path):
    folder = make_job(tmp_path, "ftjob-bad")
    (folder.path / "train.jsonl").write_text('{"prompt": "a"}\n')
    runner = JobRunner(tmp_path, lambda *a: 1, run_args(model_folder, tmp_path))
    runner.start()
    try:
        deadline = time.monotonic() + 120
        while folder.read()["status"] not in FINAL:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        runner.close()
    job = folder.read()
    assert job["status"] == "failed" and 'no "completion" field' in job["error"]["message"]


def test_hyperparameters_are_checked():
    with pytest.raises(Exception, match=r"hyperparameters.n_epochs must be an integer in \[1, 50\]"):
        Hyperparameters(n_epochs=0)
    with pytest.raises(Exception, match="learning_rate_multiplier"):
        Hyperparameters(learning_rate_multiplier=-1.0)
    assert Hyperparameters(learning_rate_multiplier=2).lr == pytest.approx(0.02)


def test_events_skip_a_torn_last_line(tmp_path):
    folder = JobFolder(tmp_path)
    folder.append_event("one")
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"id": "ftevent-x", "mess')  # a writer killed mid-line
    assert [e["message"] for e in folder.events()] == ["one"]


def test_two_servers_over_one_folder_run_each_job_once(model_folder, tmp_path):
    """Ray replicas sharing a folder: the runner lock's holder runs the queue; the other takes over when
    the holder stops."""
    root, registered = tmp_path / "jobs", []
    first_job = make_job(root, "ftjob-a", n_epochs=1, created=1)
    runners = [
        JobRunner(root, lambda t, d: registered.append(t) or 1, run_args(model_folder, tmp_path))
        for _ in "ab"
    ]
    for runner in runners:
        runner.start()
    try:
        deadline = time.monotonic() + 240
        while first_job.read()["status"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        holder = next(r for r in runners if r._lock.is_locked)
        holder.close()
        second_job = make_job(root, "ftjob-b", n_epochs=1, created=2)
        while (
            second_job.read()["status"] != "succeeded"
        ):  # the other runner took the lock (it polls every 5 s)
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        for runner in runners:
            runner.close()
    assert sorted(registered) == ["acme~ft-ftjob-a", "acme~ft-ftjob-b"]
