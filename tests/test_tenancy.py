"""Tenants: API keys, namespaced task ids, isolation on every endpoint (with keys and open), quotas."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json

import pytest
import torch
from conftest import app_client, make_tiny_model, tiny_app

from server.api.app import create_app
from server.config import Settings
from server.engine.engine import Engine
from server.errors import ConfigError, PrefixNotFound
from server.registry.format import save_native

ADMIN, ACME, GLOBEX = "admin-secret", "acme-secret", "globex-secret"


def keys_file(tmp_path, quotas=None) -> str:
    doc = {
        "admin": [ADMIN],
        "tenants": {"acme": [ACME], "globex": ["sha256:" + hashlib.sha256(GLOBEX.encode()).hexdigest()]},
    }
    if quotas:
        doc["quotas"] = quotas
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(doc))
    return str(path)


@pytest.fixture(scope="module")
def engine(tokenizer):
    return Engine(make_tiny_model("llama-gqa"), tokenizer)


@pytest.fixture
async def make_api(tmp_path, engine):
    """make_api(**settings): an in-process client of the app on the tiny model."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(**settings):
            app = tiny_app(engine, tmp_path / "prefixes", max_batch_wait_ms=1.0, **settings)
            return await stack.enter_async_context(app_client(app))

        yield make


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def native(engine, seed: int) -> bytes:
    ids = torch.randint(2, 200, (4,), generator=torch.Generator().manual_seed(seed)).tolist()
    return save_native(engine.encode_prefix(ids))


async def upload(api, key, task_id, data):
    return await api.post(
        "/prefixes", data={"task_id": task_id}, files={"file": ("p.safetensors", data)}, headers=auth(key)
    )


async def gen(api, key, task_id, prompt="hello"):
    body = {"task_id": task_id, "prompt": prompt, "max_new_tokens": 6, "ignore_eos": True}
    return await api.post("/generate", json=body, headers=auth(key))


ENDPOINTS = [
    ("POST", "/generate", {"json": {"prompt": "x"}}),
    ("POST", "/prefixes/from-text", {"json": {"task_id": "a", "text": "be nice"}}),
    ("POST", "/prefixes", {"data": {"task_id": "a"}, "files": {"file": ("p", b"x")}}),
    ("GET", "/prefixes", {}),
    ("GET", "/prefixes/a", {}),
    ("DELETE", "/prefixes/a", {}),
]


@pytest.mark.parametrize("method, path, kwargs", ENDPOINTS, ids=[f"{m} {p}" for m, p, _ in ENDPOINTS])
@pytest.mark.parametrize("key", [None, "wrong-key", "sha256:" + "0" * 64])
async def test_every_endpoint_needs_a_valid_key(make_api, tmp_path, method, path, kwargs, key):
    api = await make_api(api_keys_file=keys_file(tmp_path))
    headers = auth(key) if key else {}
    resp = await api.request(method, path, headers=headers, **kwargs)
    assert resp.status_code == 401, resp.text
    assert resp.json()["error"]["code"] == "unauthorized" and resp.headers["www-authenticate"] == "Bearer"
    assert (await api.get("/health")).status_code == 200 and (await api.get("/ready")).status_code == 200


async def test_tenants_are_isolated_on_every_endpoint(make_api, tmp_path, engine):
    api = await make_api(api_keys_file=keys_file(tmp_path))
    acme_v = (await upload(api, ACME, "summarize", native(engine, 1))).json()
    globex_v = (await upload(api, GLOBEX, "summarize", native(engine, 2))).json()
    assert acme_v["task_id"] == globex_v["task_id"] == "summarize"
    assert acme_v["version"] == globex_v["version"] == 1 and acme_v["sha256"] != globex_v["sha256"]
    assert (await upload(api, ACME, "private", native(engine, 3))).status_code == 201

    # Each tenant's generate uses its own prefix.
    a, g = (await gen(api, ACME, "summarize")).json(), (await gen(api, GLOBEX, "summarize")).json()
    assert a["task_id"] == g["task_id"] == "summarize" and a["token_ids"] != g["token_ids"]

    # globex cannot see, use, replace or delete acme's "private": 404 everywhere, and its own upload is its own.
    names = lambda r: sorted(p["task_id"] for p in r.json()["prefixes"])  # noqa: E731
    assert names(await api.get("/prefixes", headers=auth(GLOBEX))) == ["summarize"]
    assert names(await api.get("/prefixes", headers=auth(ACME))) == ["private", "summarize"]
    assert (await api.get("/prefixes/private", headers=auth(GLOBEX))).status_code == 404
    assert (await gen(api, GLOBEX, "private")).status_code == 404
    assert (await api.delete("/prefixes/private", headers=auth(GLOBEX))).status_code == 404
    assert (await upload(api, GLOBEX, "private", native(engine, 4))).json()["version"] == 1
    assert (await api.get("/prefixes/private", headers=auth(ACME))).json()["sha256"] != (
        await api.get("/prefixes/private", headers=auth(GLOBEX))
    ).json()["sha256"]
    # A tenant cannot reach into a namespace by name.
    resp = await gen(api, GLOBEX, "acme~private")
    assert resp.status_code == 422 and "no '~'" in resp.json()["error"]["message"]
    resp = await api.post(
        "/prefixes/from-text", json={"task_id": "acme~x", "text": "hi"}, headers=auth(GLOBEX)
    )
    assert resp.status_code == 422

    # The admin sees and manages everyone's, by stored id.
    all_ids = names(await api.get("/prefixes", headers=auth(ADMIN)))
    assert all_ids == ["acme~private", "acme~summarize", "globex~private", "globex~summarize"]
    admin_gen = (await gen(api, ADMIN, "acme~summarize")).json()
    assert admin_gen["token_ids"] == a["token_ids"]
    assert (await api.delete("/prefixes/acme~private", headers=auth(ADMIN))).status_code == 204
    assert (await gen(api, ACME, "private")).status_code == 404
    assert (await gen(api, GLOBEX, "private")).status_code == 200


async def test_errors_name_tasks_as_the_tenant_does(make_api, tmp_path, engine):
    """globex's task 'booking' is stored as 'globex~booking'; no reply to globex shows the namespace."""
    api = await make_api(api_keys_file=keys_file(tmp_path))
    stream = {"task_id": "booking", "prompt": "x", "stream": True}
    replies = [
        await gen(api, GLOBEX, "booking"),
        await api.post("/generate", json=stream, headers=auth(GLOBEX)),
        await api.get("/prefixes/booking", headers=auth(GLOBEX)),
        await api.delete("/prefixes/booking", headers=auth(GLOBEX)),
    ]
    for resp in replies:
        message = resp.json()["error"]["message"]
        assert resp.status_code == 404 and message.startswith("task 'booking' not found"), resp.text
        assert "~" not in message
    # An admin names stored ids, and sees them.
    resp = await gen(api, ADMIN, "globex~booking")
    assert resp.json()["error"]["message"].startswith("task 'globex~booking' not found")
    # A tenant that spells out its own namespace is told so (not "got 'booking'").
    resp = await gen(api, GLOBEX, "globex~booking")
    assert resp.status_code == 422 and "must not name the namespace 'globex~'" in resp.text, resp.text

    # Deleted between the request's submit and its admission: the error comes from the scheduler, on the
    # plain and the streamed reply of both APIs.
    assert (await upload(api, GLOBEX, "booking", native(engine, 1))).status_code == 201
    registry = api._transport.app.state.server.components.registry

    def deleted_meanwhile(task_id):
        raise PrefixNotFound(f"task {task_id!r} not found")

    registry.acquire = deleted_meanwhile
    body = {"model": "booking", "prompt": "x", "max_tokens": 2}
    replies = [
        await gen(api, GLOBEX, "booking"),
        await api.post("/generate", json=stream, headers=auth(GLOBEX)),
        await api.post("/v1/completions", json=body, headers=auth(GLOBEX)),
        await api.post("/v1/completions", json={**body, "stream": True}, headers=auth(GLOBEX)),
    ]
    for resp in replies:
        assert "'booking'" in resp.text and "globex~" not in resp.text, resp.text


async def test_unauthorized_says_what_arrived_but_never_a_key(make_api, tmp_path):
    api = await make_api(api_keys_file=keys_file(tmp_path))
    cases = {
        "Basic " + "b" * 100_000: "got the scheme 'Basic'",
        "B" * 100_000 + " key": "got the scheme 'BBBB",  # cut short
        "Bearer ": "got no key after 'Bearer'",
        ACME: "got a value with no scheme",  # a bare key is not echoed
    }
    for header, fragment in cases.items():
        resp = await api.get("/prefixes", headers={"Authorization": header})
        assert resp.status_code == 401 and fragment in resp.text, resp.text
        assert len(resp.content) < 600 and ACME not in resp.text


async def test_open_mode_has_no_auth_and_hides_namespaced_tasks(make_api, engine):
    api = await make_api()
    assert (
        await api.post("/prefixes", data={"task_id": "t"}, files={"file": ("p", native(engine, 1))})
    ).status_code == 201
    # A store written by a keyed server may hold namespaced tasks; open mode never shows them.
    registry = api._transport.app.state.server.components.registry
    registry.upload("acme~secret", native(engine, 2))
    assert [p["task_id"] for p in (await api.get("/prefixes")).json()["prefixes"]] == ["t"]
    assert (await api.post("/generate", json={"task_id": "acme~secret", "prompt": "x"})).status_code == 422
    assert (
        await api.post("/generate", json={"task_id": "t", "prompt": "x", "max_new_tokens": 2})
    ).status_code == 200


async def test_prefix_count_and_bytes_quotas(make_api, tmp_path, engine):
    size = len(native(engine, 1))
    quotas = {"acme": {"max_prefixes": 2, "max_prefix_bytes": 3 * size}}
    api = await make_api(api_keys_file=keys_file(tmp_path, quotas))
    assert (await upload(api, ACME, "a", native(engine, 1))).status_code == 201
    assert (await upload(api, ACME, "b", native(engine, 2))).status_code == 201
    assert (
        await upload(api, ACME, "b", native(engine, 3))
    ).status_code == 201  # replacing is not a new prefix
    resp = await upload(api, ACME, "c", native(engine, 4))
    assert resp.status_code == 429 and "may keep 2 prefixes" in resp.json()["error"]["message"]
    assert (await upload(api, GLOBEX, "c", native(engine, 4))).status_code == 201  # globex has no quota


async def test_prefix_bytes_quota(make_api, tmp_path, engine):
    size = len(native(engine, 1))
    api = await make_api(api_keys_file=keys_file(tmp_path), tenant_max_prefix_bytes=size + 10)
    assert (await upload(api, ACME, "a", native(engine, 1))).status_code == 201
    resp = await upload(api, ACME, "b", native(engine, 2))
    assert resp.status_code == 429 and "prefix bytes would be" in resp.json()["error"]["message"]


async def test_rate_quota(make_api, tmp_path):
    api = await make_api(api_keys_file=keys_file(tmp_path), tenant_rate=0.01, tenant_burst=2)
    body = {"prompt": "x", "max_new_tokens": 1}
    codes = [(await api.post("/generate", json=body, headers=auth(ACME))).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    resp = await api.post("/generate", json=body, headers=auth(ACME))
    assert "request rate" in resp.json()["error"]["message"] and resp.headers["retry-after"]
    assert (await api.post("/generate", json=body, headers=auth(ADMIN))).status_code == 200


async def test_concurrency_quota(make_api, tmp_path):
    api = await make_api(api_keys_file=keys_file(tmp_path), tenant_max_concurrent=1)
    long = {"prompt": "x", "max_new_tokens": 200, "ignore_eos": True}
    first = asyncio.create_task(api.post("/generate", json=long, headers=auth(ACME)))
    scheduler = api.app.state.server.scheduler
    for _ in range(500):  # until the first is in flight (it tokenizes on a worker thread first)
        if scheduler.num_running + scheduler.num_waiting:
            break
        await asyncio.sleep(0.01)
    second = await api.post("/generate", json={"prompt": "y", "max_new_tokens": 1}, headers=auth(ACME))
    assert second.status_code == 429 and "concurrent requests (max 1)" in second.json()["error"]["message"]
    other = await api.post("/generate", json={"prompt": "y", "max_new_tokens": 1}, headers=auth(GLOBEX))
    assert other.status_code == 200
    assert (await first).status_code == 200
    third = await api.post("/generate", json={"prompt": "y", "max_new_tokens": 1}, headers=auth(ACME))
    assert third.status_code == 200  # the slot was given back


async def test_pickle_upload_is_refused_unread(make_api, engine):
    api = await make_api()
    buf = io.BytesIO()
    torch.save({"prompt_embeddings": torch.zeros(2, 2)}, buf)
    resp = await api.post(
        "/prefixes", data={"task_id": "p"}, files={"file": ("adapter_model.bin", buf.getvalue())}
    )
    assert resp.status_code == 422 and "pickle" in resp.json()["error"]["message"]
    resp = await api.post(
        "/prefixes", data={"task_id": "p"}, files={"file": ("x.safetensors", b"\x80\x04\x95junk")}
    )
    assert resp.status_code == 422 and "pickle" in resp.json()["error"]["message"]
    assert (await api.get("/prefixes")).json() == {"prefixes": []}


@pytest.mark.parametrize(
    "doc, message",
    [
        ("not json", "cannot read JSON"),
        (json.dumps({"admins": []}), "expected"),
        (json.dumps({"tenants": {"bad name": ["k"]}}), "tenant name must be"),
        (json.dumps({"tenants": {"acme": "k"}}), "must be a list"),
        (json.dumps({"admin": ["sha256:xyz"]}), "64 hex digits"),
        (json.dumps({"admin": []}), "holds no keys"),
    ],
)
def test_bad_keys_file_is_a_clear_startup_error(tmp_path, doc, message):
    path = tmp_path / "keys.json"
    path.write_text(doc)
    with pytest.raises(ConfigError, match=message):  # the operator's to fix, not a client's
        create_app(Settings(prefix_dir=tmp_path, api_keys_file=path))


async def test_a_404_names_the_tasks_the_caller_can_use_and_no_others(make_api, tmp_path, engine):
    api = await make_api(api_keys_file=keys_file(tmp_path))
    prefix = save_native(engine.encode_prefix([5, 6, 7]))
    for key, task in ((ACME, "alpha"), (GLOBEX, "beta"), (GLOBEX, "gamma")):
        files = {"file": ("p.safetensors", prefix)}
        resp = await api.post("/prefixes", data={"task_id": task}, files=files, headers=auth(key))
        assert resp.status_code == 201, resp.text
    message = (await gen(api, GLOBEX, "betta")).json()["error"]["message"]
    assert message == "task 'betta' not found; known tasks: beta, gamma (GET /prefixes lists them)"
    message = (await gen(api, ACME, "beta")).json()["error"]["message"]
    assert message == "task 'beta' not found; known tasks: alpha (GET /prefixes lists them)"
