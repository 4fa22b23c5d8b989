"""/v1/fine_tuning/jobs driven by the official `openai` client, in process on a tiny model: files -> job ->
events -> the new task answers; cancel; a restart mid-job; tenants; quotas; errors. The runs are real
(server/finetune/run.py in its own process, on the tiny model saved to a folder)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import openai
import pytest
from conftest import app_client, chat_engine, save_model_folder, tiny_app
from test_training import synthetic

pytestmark = pytest.mark.timeout(400)
ADMIN, ACME, GLOBEX = "admin-key", "acme-key", "globex-key"
FAST = {"n_epochs": 4, "batch_size": 8, "learning_rate_multiplier": 10.0, "num_virtual_tokens": 8}


def jsonl(examples) -> bytes:
    return b"".join(
        json.dumps({"prompt": e.prompt, "completion": e.completion}).encode() + b"\n" for e in examples
    )


@pytest.fixture(scope="module")
def engine():
    return chat_engine("llama-gqa")


@pytest.fixture(scope="module")
def model_folder(engine, tmp_path_factory):
    return save_model_folder(engine, tmp_path_factory.mktemp("tiny-model"))  # what the runs train on


@pytest.fixture
async def make_server(tmp_path, engine, model_folder):
    """make_server(**settings) -> client(key): an app in process (the same folders for every app: a
    restart), its runs training on the tiny model's folder."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"admin": [ADMIN], "tenants": {"acme": [ACME], "globex": [GLOBEX]}}))
    async with contextlib.AsyncExitStack() as stack:

        async def make(**settings):
            app = tiny_app(
                engine,
                tmp_path / "prefixes",
                model=str(model_folder),
                model_cache_dir=tmp_path / "cache",
                api_keys_file=keys,
                fine_tune_nice=0,
                **settings,
            )
            closing = contextlib.AsyncExitStack()
            await closing.enter_async_context(app_client(app))
            stack.push_async_callback(closing.aclose)

            def client(key: str) -> openai.AsyncOpenAI:
                http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
                return openai.AsyncOpenAI(
                    base_url="http://t/v1", api_key=key, http_client=http, max_retries=0
                )

            client.close = closing.aclose
            client.http = lambda: httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://t"
            )
            return client

        yield make


async def upload(client, examples) -> str:
    return (await client.files.create(file=("data.jsonl", jsonl(examples)), purpose="fine-tune")).id


async def wait_for(client, job_id: str, statuses: tuple[str, ...], timeout_s: float = 300.0):
    deadline = time.monotonic() + timeout_s
    while (job := await client.fine_tuning.jobs.retrieve(job_id)).status not in statuses:
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.2)
    return job


async def test_a_whole_job_through_the_openai_client(make_server):
    client = (await make_server())(ACME)
    train, held_out = synthetic(96, seed=1), synthetic(16, seed=2)
    job = await client.fine_tuning.jobs.create(
        model="tiny",
        training_file=await upload(client, train),
        validation_file=await upload(client, held_out),
        suffix="ok",
        seed=1,
        hyperparameters=FAST,
    )
    assert job.status == "queued" and job.object == "fine_tuning.job" and job.hyperparameters.n_epochs == 4
    job = await wait_for(client, job.id, ("succeeded", "failed", "cancelled"))
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith("ft-ok-") and job.finished_at >= job.created_at
    events = [e async for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    steps = [e.data["step"] for e in events if e.type == "metrics" and "step" in e.data]
    assert sorted(steps) == list(range(1, 49))  # 96 / 8 x 4 epochs, newest first as OpenAI lists them
    score = next(e.data for e in events if e.type == "metrics" and "eval_after" in e.data)
    assert score["eval_before"] <= 0.1 and score["eval_after"] >= 0.9
    assert events[0].message.startswith("New task version")
    # The new task answers as trained, by its name, through the same client.
    out = await client.completions.create(
        model=job.fine_tuned_model, prompt=held_out[0].prompt, max_tokens=3, temperature=0
    )
    assert out.choices[0].text.startswith(held_out[0].completion)
    assert [j.id async for j in client.fine_tuning.jobs.list()] == [job.id]


async def test_tenants_see_only_their_own_jobs_and_a_quota_holds(make_server):
    make = await make_server(max_jobs_per_tenant=1)
    acme, globex = make(ACME), make(GLOBEX)
    long = {**FAST, "n_epochs": 50}
    job = await acme.fine_tuning.jobs.create(
        model="tiny", training_file=await upload(acme, synthetic(96, seed=1)), hyperparameters=long
    )
    with pytest.raises(openai.RateLimitError) as e:  # one active job each
        await acme.fine_tuning.jobs.create(
            model="tiny", training_file=await upload(acme, synthetic(20, seed=3)), hyperparameters=long
        )
    assert e.value.code == "quota_exceeded"
    for call in (globex.fine_tuning.jobs.retrieve, globex.fine_tuning.jobs.cancel):
        with pytest.raises(openai.NotFoundError):
            await call(job.id)
    assert [j async for j in globex.fine_tuning.jobs.list()] == []
    with pytest.raises(openai.NotFoundError) as e:  # acme's file is no file of globex's
        await globex.fine_tuning.jobs.create(model="tiny", training_file=job.training_file)
    assert e.value.param == "training_file"
    await wait_for(acme, job.id, ("running",))
    while not [e async for e in acme.fine_tuning.jobs.list_events(job.id) if e.type == "metrics"]:
        await asyncio.sleep(0.1)
    cancelled = await acme.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    job = await wait_for(acme, job.id, ("cancelled",))
    assert job.fine_tuned_model is None
    with pytest.raises(openai.BadRequestError):  # nothing left to cancel
        await acme.fine_tuning.jobs.cancel(job.id)
    # the quota is free again
    again = await acme.fine_tuning.jobs.create(
        model="tiny", training_file=await upload(acme, synthetic(20, seed=3)), hyperparameters={"n_epochs": 1}
    )
    assert (await wait_for(acme, again.id, ("succeeded", "failed"))).status == "succeeded"


async def test_a_restart_mid_job_resumes_it(make_server):
    first = await make_server()
    client = first(ACME)
    job = await client.fine_tuning.jobs.create(
        model="tiny",
        training_file=await upload(client, synthetic(96, seed=1)),
        hyperparameters={**FAST, "n_epochs": 40},
    )
    await wait_for(client, job.id, ("running",))
    while (
        len([e async for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"])
        < 8
    ):
        await asyncio.sleep(0.05)
    await first.close()  # the server stops: the run is killed, the job stays running
    restarted = (await make_server())(ACME)  # a new server over the same folders
    job = await wait_for(restarted, job.id, ("succeeded", "failed"))
    assert job.status == "succeeded", job.error
    messages = [e.message async for e in restarted.fine_tuning.jobs.list_events(job.id, limit=200)]
    assert any("server restarted" in m for m in messages) and any(m.startswith("Resuming") for m in messages)


@pytest.mark.parametrize(
    ("body", "status", "param", "fragment"),
    [
        ({"model": "gpt-4o"}, 400, "model", "must be the base model 'tiny'"),
        ({"training_file": "file-nope"}, 404, "training_file", ""),
        ({"hyperparameters": {"n_epochs": 0}}, 400, "hyperparameters.n_epochs", "[1, 50]"),
        ({"hyperparameters": {"n_epochs": "many"}}, 400, "hyperparameters.n_epochs", ""),
        ({"suffix": "no spaces"}, 400, "suffix", "A-Za-z0-9_-"),
        ({"wat": 1}, 400, "wat", ""),
    ],
)
async def test_bad_jobs_get_openai_errors(make_server, body, status, param, fragment):
    make = await make_server()
    client = make(ACME)
    file_id = await upload(client, synthetic(12, seed=1))
    raw = {"model": "tiny", "training_file": file_id, **body}
    async with make.http() as http:
        response = await http.post(
            "/v1/fine_tuning/jobs", json=raw, headers={"Authorization": f"Bearer {ACME}"}
        )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"], error
    with pytest.raises(openai.NotFoundError):
        await client.fine_tuning.jobs.retrieve("ftjob-" + "0" * 24)


@pytest.mark.slow
def test_a_real_server_process_trains_and_survives_a_kill_mid_job(model_folder, tmp_path):
    """The official (sync) client against `prefix-server serve` processes: files -> job -> SIGKILL of the
    server mid-run -> a new server resumes the job -> events -> the new task answers."""
    from loadtest import serverproc

    args = ["--model", str(model_folder), "--prefix-dir", str(tmp_path / "prefixes"), "--compile", "off"]
    args += ["--model-cache-dir", str(tmp_path / "cache"), "--fine-tune-nice", "0"]
    train, held_out = synthetic(96, seed=1), synthetic(16, seed=2)
    with (
        open(tmp_path / "server.log", "w+") as log,
        serverproc.running(args, log=log, timeout_s=120) as (proc, base),
    ):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        files = [
            client.files.create(file=("d.jsonl", jsonl(d)), purpose="fine-tune").id for d in (train, held_out)
        ]
        job = client.fine_tuning.jobs.create(
            model=client.models.list().data[0].id,
            training_file=files[0],
            validation_file=files[1],
            hyperparameters={**FAST, "n_epochs": 40},  # 480 steps: the kill comes long before the end
        )
        deadline = time.monotonic() + 240
        while (
            len([e for e in client.fine_tuning.jobs.list_events(job.id, limit=1000) if e.type == "metrics"])
            < 12
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.kill()  # SIGKILL: no drain; the run dies with it (PR_SET_PDEATHSIG)
        proc.wait()
    with (
        open(tmp_path / "server2.log", "w+") as log,
        serverproc.running(args, log=log, timeout_s=120) as (_, base),
    ):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in (
            "succeeded",
            "failed",
            "cancelled",
        ):
            assert time.monotonic() < deadline + 120
            time.sleep(0.2)
        assert job.status == "succeeded", job.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
        assert any(m.startswith("Resuming") for m in messages)
        out = client.completions.create(
            model=job.fine_tuned_model, prompt=held_out[0].prompt, max_tokens=3, temperature=0
        )
        assert out.choices[0].text.startswith(held_out[0].completion)
