"""Ray Serve scale-out: two replicas on this machine, a tiny model, the HTTP API through the ingress.

Shows routing by task id (a task's requests are served by the replica that holds it), that an upload
through any replica is served by every replica (the shared store, hot swap across replicas), and that
the API is the single server's: same replies, same errors, streaming. Skipped where Ray is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import httpx
import pytest
import torch
from conftest import byte_tokenizer, make_tiny_model

from loadtest import serverproc
from server.registry.format import ModelFingerprint, PrefixKV, save_native

ray = pytest.importorskip("ray")
pytestmark = [
    pytest.mark.ray,
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # Ray Serve's own pydantic fields
]

FAMILY = "llama-gqa"  # 2 layers, 2 kv heads, head_dim 16
ADMIN, ACME, GLOBEX = "admin-secret", "acme-secret", "globex-secret"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster serving the app with 2 replicas of a tiny model; yields (client, model)."""
    from ray import serve

    from server.distributed.app import build_app

    model_dir = tmp_path_factory.mktemp("tiny-model")
    model = make_tiny_model(FAMILY)
    model.save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    prefix_dir = tmp_path_factory.mktemp("shared-prefixes")
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps({"admin": [ADMIN], "tenants": {"acme": [ACME], "globex": [GLOBEX]}}))
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108
    saved_env = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp, log_to_driver=False)
    try:
        port = serverproc.free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {
            "model": str(model_dir),
            "prefix_dir": str(prefix_dir),
            "num_replicas": 2,
            "replica_cpus": 0.5,
            "ingress_cpus": 0.1,
            "max_batch_wait_ms": 1,
            "max_upload_bytes": 1_000_000,
            "api_keys_file": str(keys),
        }
        serve.run(build_app(args), name="prefix-server", route_prefix="/")
        headers = {"authorization": f"Bearer {ACME}"}  # tenant acme, unless a test says otherwise
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60) as client:
            yield client, model
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if saved_env is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved_env


def native_prefix(model, num_virtual_tokens: int, seed: int) -> bytes:
    """A random native prefix file for the tiny model."""
    fp = ModelFingerprint.from_config(model.config)
    shape = (fp.num_layers, fp.kv_heads, num_virtual_tokens, fp.head_dim)
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(shape, generator=gen) * 2, torch.randn(shape, generator=gen) * 2
    return save_native(PrefixKV(keys=keys, values=values, fingerprint=fp))


def upload(client, task_id: str, data: bytes) -> httpx.Response:
    resp = client.post(
        "/prefixes", data={"task_id": task_id}, files={"file": ("adapter_model.safetensors", data)}
    )
    assert resp.status_code == 201, resp.text
    return resp


def generate(client, task_id: str | None, **extra) -> httpx.Response:
    body = {"task_id": task_id, "prompt": "Hello there", "max_new_tokens": 4, **extra}
    return client.post("/generate", json=body)


def settle(client, task_id: str) -> str:
    """Generate for a task until its replica is known: 3 replies in a row from one replica. (A replica
    reports the tasks it holds every 0.1 s and the router hears of it a moment later; until then a
    request for a new task goes to the replica holding the fewest.) Returns that replica."""
    last, streak = None, 0
    for _ in range(30):
        resp = generate(client, task_id)
        assert resp.status_code == 200, resp.text
        streak = streak + 1 if resp.headers["x-replica"] == last else 1
        last = resp.headers["x-replica"]
        if streak == 3:
            return last
        time.sleep(0.3)
    pytest.fail(f"requests for {task_id!r} never settled on one replica")


def test_routing_by_task_id(cluster):
    client, model = cluster
    tasks = [f"route-{i}" for i in range(4)]
    for i, task in enumerate(tasks):
        upload(client, task, native_prefix(model, 4, seed=i))
    holders = {task: settle(client, task) for task in tasks}
    for task, holder in holders.items():
        for _ in range(5):
            resp = generate(client, task)
            assert resp.status_code == 200 and resp.json()["task_id"] == task, resp.text
            assert resp.headers["x-replica"] == holder, (task, holders)  # served by the replica that holds it
    # A new task goes to the replica holding the fewest: the tasks are spread over both replicas.
    assert len(set(holders.values())) == 2, holders
    # The OpenAI-compatible routes name the task in `model`: they go to its replica too.
    completion = client.post("/v1/completions", json={"model": tasks[0], "prompt": "Hi", "max_tokens": 3})
    assert completion.status_code == 200, completion.text
    assert completion.headers["x-replica"] == holders[tasks[0]]


def test_upload_through_any_replica_is_served_by_every_replica(cluster):
    client, model = cluster
    task = "shared-task"
    upload(client, task, native_prefix(model, 4, seed=10))
    # Requests not tied to a task go to any replica: both must list it (version 1).
    seen: dict[str, int] = {}
    for _ in range(40):
        resp = client.get(f"/prefixes/{task}")
        assert resp.status_code == 200, resp.text
        seen[resp.headers["x-replica"]] = resp.json()["version"]
        if len(seen) == 2:
            break
    assert len(seen) == 2 and set(seen.values()) == {1}, seen

    holder = settle(client, task)
    assert generate(client, task).json()["prefix_version"] == 1
    # Upload new versions until one goes through the other replica: the holder serves it at once.
    for seed in range(11, 41):
        reply = upload(client, task, native_prefix(model, 4, seed=seed))
        version = reply.json()["version"]
        resp = generate(client, task)
        assert resp.status_code == 200, resp.text
        assert resp.json()["prefix_version"] == version, (resp.json(), version)
        assert resp.headers["x-replica"] == holder
        if reply.headers["x-replica"] != holder:
            break
    else:
        pytest.fail("30 uploads all went to the replica holding the task")

    # A delete through any replica: the holder answers 404 from then on, like the single server.
    assert client.delete(f"/prefixes/{task}").status_code == 204
    gone = generate(client, task)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "task_not_found", gone.text


def test_the_api_is_the_single_servers(cluster):
    client, _ = cluster
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["status"] == "ready"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/generate", "/prefixes", "/prefixes/{task_id}", "/ready", "/health"} <= set(paths)

    base = generate(client, None)
    assert base.status_code == 200 and base.json()["prefix_version"] is None, base.text
    missing = generate(client, "no-such-task")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "task_not_found"
    bad = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "malformed_json", bad.text
    unknown_field = generate(client, None, bogus=1)
    assert unknown_field.status_code == 422 and unknown_field.json()["error"]["code"] == "invalid_request"
    too_big = client.post(
        "/prefixes", data={"task_id": "big"}, files={"file": ("x.safetensors", b"\0" * 3_000_000)}
    )
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "payload_too_large"
    # Auth and tenancy are the single server's: no key, a wrong key, another tenant's task.
    no_key = client.post("/generate", json={"prompt": "hi"}, headers={"authorization": ""})
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "unauthorized", no_key.text
    wrong_key = client.get("/prefixes", headers={"authorization": "Bearer nope"})
    assert wrong_key.status_code == 401 and wrong_key.json()["error"]["message"] == "invalid API key"
    upload(client, "acme-only", native_prefix(cluster[1], 4, seed=5))
    globex = {"authorization": f"Bearer {GLOBEX}"}
    assert client.get("/prefixes/acme-only", headers=globex).status_code == 404
    assert generate(client, "acme-only").status_code == 200
    hidden = client.post("/generate", json={"task_id": "acme-only", "prompt": "hi"}, headers=globex)
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "task_not_found", hidden.text
    admin = client.get("/prefixes/acme~acme-only", headers={"authorization": f"Bearer {ADMIN}"})
    assert admin.status_code == 200 and admin.json()["task_id"] == "acme~acme-only", admin.text
    bad_prefix = client.post(
        "/prefixes", data={"task_id": "junk"}, files={"file": ("x.safetensors", b"not a prefix")}
    )
    assert bad_prefix.status_code == 422 and bad_prefix.json()["error"]["code"] == "invalid_prefix"


def test_streaming_through_the_ingress(cluster):
    client, model = cluster
    upload(client, "stream-task", native_prefix(model, 4, seed=99))
    plain = generate(client, "stream-task", max_new_tokens=6, ignore_eos=True).json()
    events = []
    with client.stream(
        "POST",
        "/generate",
        json={
            "task_id": "stream-task",
            "prompt": "Hello there",
            "max_new_tokens": 6,
            "ignore_eos": True,
            "stream": True,
        },
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    assert [e["type"] for e in events] == ["token"] * 6 + ["done"], events
    assert [e["token_id"] for e in events[:-1]] == plain["token_ids"]
    assert events[-1]["text"] == plain["text"]


@pytest.mark.parametrize(
    ("path", "body", "key", "expected"),
    [
        ("/generate", {"task_id": "summarize", "prompt": "x"}, ACME, "acme~summarize"),
        ("/generate", {"task_id": None, "prompt": "x"}, ACME, "__base__"),
        ("/generate", {"prompt": "x"}, ACME, "__base__"),
        ("/generate", {"task_id": "acme~summarize"}, ADMIN, "acme~summarize"),  # admins name stored ids
        ("/v1/chat/completions", {"model": "summarize", "messages": []}, GLOBEX, "globex~summarize"),
        ("/generate", {"task_id": "summarize"}, "wrong-key", None),  # the replica answers 401
        ("/generate", {"task_id": "acme~summarize"}, ACME, None),  # a tenant cannot name a namespace
        ("/generate", {"task_id": "bad id!"}, ACME, None),  # the replica answers 422
        ("/generate", ["not", "an", "object"], ACME, None),
        ("/prefixes", {"task_id": "summarize"}, ACME, None),  # not tied to a task's prefix: any replica
    ],
)
def test_routing_id_names_the_stored_task(tmp_path, path, body, key, expected):
    from server.api.auth import KeyRing
    from server.api.quotas import Quotas
    from server.distributed.ingress import routing_id

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"admin": [ADMIN], "tenants": {"acme": [ACME], "globex": [GLOBEX]}}))
    ring = KeyRing.load(keys, Quotas())
    assert routing_id(path, json.dumps(body).encode(), ring, f"Bearer {key}") == expected
    assert routing_id("/generate", b"{not json", ring, f"Bearer {key}") is None
    open_ring = KeyRing.load(None, Quotas())  # no keys file: task ids are stored as named
    assert routing_id("/generate", b'{"task_id": "t"}', open_ring, None) == "t"


def test_replicas_start_with_the_engines_openmp_spin(monkeypatch):
    """Each replica's process gets server/threads.py's OpenMP variables before it imports torch (a value
    set where the app is built wins)."""
    from server.distributed.app import replica_actor_options
    from server.threads import OPENMP_ENV

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    options = replica_actor_options({"replica_cpus": 1.0, "replica_gpus": 0.0})
    assert options["runtime_env"]["env_vars"] == {**OPENMP_ENV, "GOMP_SPINCOUNT": "1000"}
    assert (options["num_cpus"], options["num_gpus"]) == (1.0, 0.0)
