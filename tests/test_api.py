"""The HTTP API in-process (httpx over ASGITransport) on a tiny model: every route, every error shape."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
import torch
from conftest import (
    app_client,
    make_tiny_model,
    peft_greedy,
    peft_prefix_model,
    tiny_app,
    wait_for_load_error,
)

from server.api.app import create_app
from server.config import Settings
from server.engine.engine import Engine
from server.registry.format import save_native
from server.request import Request, SamplingParams

FAMILY = "llama-gqa"


def store_listing(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def engine(tokenizer):
    return Engine(make_tiny_model(FAMILY), tokenizer)


@pytest.fixture
async def api(tmp_path, engine):
    app = tiny_app(
        engine, tmp_path / "prefixes", max_batch_size=8, max_batch_wait_ms=300.0, max_upload_bytes=100_000
    )
    async with app_client(app, base_url="http://test") as client:
        yield client


def random_native(engine, num_virtual_tokens: int, seed: int) -> bytes:
    return save_native(
        engine.encode_prefix(
            torch.randint(
                2, 200, (num_virtual_tokens,), generator=torch.Generator().manual_seed(seed)
            ).tolist()
        )
    )


async def upload(api, task_id, data: bytes, config: bytes | None = None):
    files = {"file": ("adapter_model.safetensors", data)}
    if config is not None:
        files["config"] = ("adapter_config.json", config)
    return await api.post("/prefixes", data={"task_id": task_id}, files=files)


def assert_error(resp, status: int, code: str, *fragments: str):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    for fragment in fragments:
        assert fragment in body["error"]["message"], body


async def test_health_and_ready(api):
    assert (await api.get("/health")).json() == {"status": "ok"}
    assert (await api.get("/ready")).json() == {"status": "ready", "model": "tiny"}


async def test_peft_upload_then_generate_matches_peft(api, tokenizer, tmp_path):
    peft_model, weights, config = peft_prefix_model(make_tiny_model(FAMILY), 6, seed=4, tmp_path=tmp_path)
    resp = await upload(api, "summarize", weights, config)
    assert resp.status_code == 201, resp.text
    info = resp.json()
    assert info["task_id"] == "summarize" and info["version"] == 1 and info["num_virtual_tokens"] == 6
    assert len(info["sha256"]) == 64 and info["bytes"] > 0
    body = {"task_id": "summarize", "prompt": "Hello there, prefix!", "max_new_tokens": 9, "ignore_eos": True}
    out = (await api.post("/generate", json=body)).json()
    prompt_ids = tokenizer("Hello there, prefix!")["input_ids"]
    assert out["token_ids"] == peft_greedy(peft_model, prompt_ids, 9)
    assert out["prefix_version"] == 1 and out["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 9}
    assert out["text"] == tokenizer.decode(out["token_ids"], skip_special_tokens=True)


async def test_swap_list_get_delete(api, engine):
    v1, v2 = random_native(engine, 5, 1), random_native(engine, 7, 2)
    assert (await upload(api, "chat", v1)).json()["version"] == 1
    body = {"task_id": "chat", "prompt": "abc", "max_new_tokens": 6, "ignore_eos": True}
    first = (await api.post("/generate", json=body)).json()
    assert (await upload(api, "chat", v2)).json()["version"] == 2  # hot swap
    second = (await api.post("/generate", json=body)).json()
    assert second["prefix_version"] == 2
    from server.registry.format import load_prefix

    alone = Request(
        engine.tokenizer("abc")["input_ids"],
        SamplingParams(max_new_tokens=6, ignore_eos=True),
        prefix=load_prefix(v2, engine.fingerprint),
    )
    engine.generate([alone])
    assert second["token_ids"] == alone.output_token_ids != first["token_ids"]
    listing = (await api.get("/prefixes")).json()["prefixes"]
    assert [(p["task_id"], p["version"], p["num_virtual_tokens"]) for p in listing] == [("chat", 2, 7)]
    assert (await api.get("/prefixes/chat")).json()["version"] == 2
    assert (await api.delete("/prefixes/chat")).status_code == 204
    assert_error(await api.post("/generate", json=body), 404, "task_not_found", "chat")
    assert_error(await api.get("/prefixes/chat"), 404, "task_not_found")
    assert_error(await api.delete("/prefixes/chat"), 404, "task_not_found")


async def test_prefix_from_text_equals_prepending(api, engine):
    resp = await api.post("/prefixes/from-text", json={"task_id": "pirate", "text": "Talk like a pirate. "})
    assert resp.status_code == 201 and resp.json()["source"] == "text"
    with_prefix = await api.post(
        "/generate", json={"task_id": "pirate", "prompt": "Hi!", "max_new_tokens": 8, "ignore_eos": True}
    )
    prepended = await api.post(
        "/generate", json={"prompt": "Talk like a pirate. Hi!", "max_new_tokens": 8, "ignore_eos": True}
    )
    assert with_prefix.json()["token_ids"] == prepended.json()["token_ids"]
    assert prepended.json()["prefix_version"] is None and prepended.json()["task_id"] is None


async def test_eight_concurrent_requests_for_eight_tasks_run_as_one_batch(api, engine):
    for i in range(8):
        assert (await upload(api, f"task-{i}", random_native(engine, 3 + i, i))).status_code == 201
    bodies = [
        {"task_id": f"task-{i}", "prompt": f"prompt number {i}", "max_new_tokens": 5, "ignore_eos": True}
        for i in range(8)
    ]
    scheduler = api.app.state.server.scheduler
    before = len(scheduler.batch_sizes)
    results = await asyncio.gather(*(api.post("/generate", json=b) for b in bodies))
    assert all(r.status_code == 200 for r in results)
    assert set(list(scheduler.batch_sizes)[before:]) == {8}  # every decode step ran all 8 rows together
    # ... and each row equals the same request alone.
    alone = (await api.post("/generate", json=bodies[5])).json()
    assert alone["token_ids"] == results[5].json()["token_ids"]


@pytest.mark.parametrize(
    "make_file, status, code, fragments",
    [
        (lambda e: b"not a safetensors file at all", 422, "invalid_prefix", ()),
        (lambda e: random_native(e, 3, 0)[:-10], 422, "invalid_prefix", ()),
        (lambda e: b"x" * 200_000, 413, "payload_too_large", ("file is larger than the limit of 100000",)),
        (lambda e: b"x" * 1_300_000, 413, "payload_too_large", ("larger than the limit of 1148576 bytes",)),
    ],
    ids=["garbage", "truncated", "too-large", "body-too-large"],
)
async def test_bad_uploads_leave_the_registry_as_it_was(api, engine, make_file, status, code, fragments):
    assert (await upload(api, "keep", random_native(engine, 4, 9))).status_code == 201
    before = store_listing(api.root)
    assert_error(await upload(api, "keep", make_file(engine)), status, code, *fragments)
    assert store_listing(api.root) == before
    assert (await api.get("/prefixes/keep")).json()["version"] == 1


async def test_wrong_model_prefix_names_the_mismatch(api, tokenizer):
    other = Engine(make_tiny_model("gpt2"), tokenizer)
    data = save_native(other.encode_prefix([5, 6, 7]))
    assert_error(await upload(api, "x", data), 422, "invalid_prefix", "gpt2", "llama")
    assert (await api.get("/prefixes")).json() == {"prefixes": []}


@pytest.mark.parametrize(
    "body, status, code, fragments",
    [
        ({"prompt": "hi", "max_new_tokens": 0}, 422, "invalid_request", ("max_new_tokens",)),
        ({"prompt": "hi", "temperature": -1}, 422, "invalid_request", ("temperature",)),
        ({"prompt": "hi", "top_p": 1.5}, 422, "invalid_request", ("top_p",)),
        ({"prompt": "hi", "max_new_tokens": "5"}, 422, "invalid_request", ("max_new_tokens", "'5'")),
        ({"prompt": "hi", "max_new_tokens": True}, 422, "invalid_request", ("max_new_tokens",)),
        ({"prompt": "hi", "bogus": 1}, 422, "invalid_request", ("bogus",)),
        ({"max_new_tokens": 3}, 422, "invalid_request", ("prompt",)),
        ({"prompt": ""}, 422, "invalid_request", ("prompt is empty",)),
        (
            {"prompt": "hi", "max_new_tokens": 5000},
            422,
            "invalid_request",
            ("max_new_tokens must be <= 1024",),
        ),
        ({"prompt": "hi", "max_new_tokens": 600}, 422, "invalid_request", ("model context is 512",)),
        ({"prompt": "hi", "task_id": "nope"}, 404, "task_not_found", ("nope",)),
        ({"prompt": "hi", "task_id": "../etc"}, 422, "invalid_request", ("task_id",)),
    ],
)
async def test_bad_generate_requests_get_clear_4xx(api, body, status, code, fragments):
    assert_error(await api.post("/generate", json=body), status, code, *fragments)


async def test_malformed_json_is_400(api):
    resp = await api.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(resp, 400, "malformed_json")


def post_raw(api, path: str, raw: bytes):
    return api.post(path, content=raw, headers={"content-type": "application/json"})


# Bodies Python's JSON decoder refuses with something other than a syntax error (they were 400
# bad_request "There was an error parsing the body"), and a syntax error, whose place is now said.
UNREADABLE_JSON = {
    "huge-int": (b'{"prompt": ' + b"9" * 5000 + b"}", "integers may have at most 4300 digits"),
    "deep": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "not-utf8": (b'{"prompt": "\xff\xfe"}', "expected UTF-8 text, got byte 0xff at offset 12"),
    "syntax": (b'{"prompt": ', "Expecting value at character 11"),
}


@pytest.mark.parametrize("path", ["/generate", "/prefixes/from-text"])
@pytest.mark.parametrize("raw, fragment", UNREADABLE_JSON.values(), ids=UNREADABLE_JSON.keys())
async def test_unreadable_json_is_malformed_json(api, path, raw, fragment):
    assert_error(await post_raw(api, path, raw), 400, "malformed_json", fragment)


# A lone UTF-16 surrogate ("\ud800" as a JSON escape) is valid JSON but no text a tokenizer can encode:
# /generate answered 500; /prefixes/from-text refused it with pydantic's own words.
SURROGATES = {
    "prompt": ("/generate", {"prompt": "\ud800abc"}, "prompt: ", "at character 0"),
    "prompt-streamed": ("/generate", {"prompt": "ab\udc00", "stream": True}, "prompt: ", "at character 2"),
    "stop": ("/generate", {"prompt": "hi", "stop": "\ud800"}, "stop: ", "at character 0"),
    "stop-list": (
        "/generate",
        {"prompt": "hi", "stop": ["ok", "x\ud800"]},
        "stop: ",
        "at character 1 of item 1",
    ),
    "text": ("/prefixes/from-text", {"task_id": "t", "text": "\ud800"}, "text: ", "at character 0"),
}


@pytest.mark.parametrize("path, body, field, where", SURROGATES.values(), ids=SURROGATES.keys())
async def test_lone_surrogates_are_a_clear_422(api, path, body, field, where):
    raw = json.dumps(body).encode()  # ASCII: the surrogate travels as its \u escape
    resp = await post_raw(api, path, raw)
    assert_error(
        resp, 422, "invalid_request", field, "expected Unicode text, got a lone UTF-16 surrogate", where
    )
    assert resp.headers["content-type"] == "application/json"  # not an event stream


async def test_long_client_values_are_echoed_short(api):
    """Every echo of a client's value is cut to ~200 characters with the full length (replies once
    reached ~1 MB)."""
    long = "x" * 100_000
    replies = [
        await api.post("/generate", json={"prompt": "hi", "task_id": long}),
        await api.post("/generate", json={"prompt": "hi", long: 1}),  # the field name
        await api.post("/generate", json={"prompt": "hi", "bogus": long}),
        await api.post("/generate", json={"prompt": "hi", "temperature": long}),
        await api.post("/prefixes/from-text", json={"task_id": long, "text": "t"}),
    ]
    for resp in replies:
        assert resp.status_code == 422 and len(resp.content) < 1000, resp.content[:300]
        assert "... (100000 characters)" in resp.json()["error"]["message"], resp.text


async def test_form_fields_are_echoed_as_sent(api):
    """Non-ASCII form values come back as the client wrote them, not as Latin-1 mojibake."""
    # A file part where a text field belongs: once its repr, with its raw headers decoded as Latin-1.
    files = {"task_id": ("café.txt", "café".encode()), "file": ("p", b"x")}
    assert_error(
        await api.post("/prefixes", files=files), 422, "invalid_request", "a file part named 'café.txt'"
    )
    # A URL-encoded form sent as raw UTF-8 (curl --data 'task_id=café'), once read as Latin-1.
    for raw in ("task_id=café".encode(), b"task_id=caf%C3%A9"):
        form = {"content-type": "application/x-www-form-urlencoded"}
        resp = await api.post("/prefixes", content=raw, headers=form)
        assert_error(resp, 422, "invalid_request", "(got 'café')")
        assert "Ã" not in resp.text


async def test_bad_task_id_on_upload(api, engine):
    assert_error(
        await upload(api, "a/b", random_native(engine, 2, 1)), 422, "invalid_request", "A-Za-z0-9._-"
    )
    assert_error(await upload(api, "x" * 65, random_native(engine, 2, 1)), 422, "invalid_request")


async def test_stop_string_and_sampling_over_http(api):
    greedy = (
        await api.post("/generate", json={"prompt": "stop test", "max_new_tokens": 12, "ignore_eos": True})
    ).json()
    seeded = {"prompt": "stop test", "max_new_tokens": 12, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    a, b = [(await api.post("/generate", json=seeded)).json() for _ in range(2)]
    assert a["token_ids"] == b["token_ids"]
    text = greedy["text"]
    stop = text[4:6]
    if stop and text.find(stop) >= 1:
        out = (
            await api.post(
                "/generate",
                json={"prompt": "stop test", "max_new_tokens": 12, "ignore_eos": True, "stop": stop},
            )
        ).json()
        assert out["finish_reason"] == "stop" and out["text"] == text[: text.find(stop)]


async def test_not_ready_while_loading(tmp_path):
    settings = Settings(model=str(tmp_path / "no-such-model"), prefix_dir=tmp_path / "p")
    app = create_app(settings)
    async with app_client(app, base_url="http://test") as client:
        assert (await client.get("/health")).status_code == 200
        assert await wait_for_load_error(app)
        resp = await client.get("/ready")
        assert_error(resp, 503, "not_ready", "startup failed")
        assert_error(await client.post("/generate", json={"prompt": "x"}), 503, "not_ready")


def test_openapi_documents_the_routes(engine, tmp_path):
    app = create_app(Settings(prefix_dir=tmp_path))
    schema = app.openapi()
    paths = schema["paths"]
    for path in ["/generate", "/prefixes", "/prefixes/from-text", "/prefixes/{task_id}", "/health", "/ready"]:
        assert path in paths
    assert "ErrorResponse" in json.dumps(paths["/generate"]["post"]["responses"])


async def test_streamed_body_is_cut_off_at_the_limit(api):
    async def chunks():
        yield b'--zzz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
        for _ in range(40):
            yield b"y" * 50_000  # 2 MB in all, no Content-Length

    resp = await api.post(
        "/prefixes", content=chunks(), headers={"content-type": "multipart/form-data; boundary=zzz"}
    )
    assert_error(resp, 413, "payload_too_large", "larger than the limit of 1148576 bytes")


def parse_sse(raw: str) -> list[dict]:
    events = []
    for block in raw.strip().split("\n\n"):
        assert block.startswith("data: "), block
        events.append(json.loads(block[len("data: ") :]))
    return events


async def test_streaming_equals_the_plain_reply(api, engine):
    assert (await upload(api, "s", random_native(engine, 5, 3))).status_code == 201
    body = {"task_id": "s", "prompt": "stream me", "max_new_tokens": 10, "ignore_eos": True}
    plain = (await api.post("/generate", json=body)).json()
    resp = await api.post("/generate", json={**body, "stream": True})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(resp.text)
    tokens = [e for e in events if e["type"] == "token"]
    assert [e["token_id"] for e in tokens] == plain["token_ids"]
    assert "".join(e["text"] for e in tokens) == plain["text"]
    done = events[-1]
    assert done["type"] == "done" and done["finish_reason"] == "length" and done["prefix_version"] == 1
    assert done["usage"] == plain["usage"] and len(events) == 11


async def test_stream_errors_before_streaming_are_plain_4xx(api):
    assert_error(
        await api.post("/generate", json={"prompt": "x", "task_id": "nope", "stream": True}),
        404,
        "task_not_found",
    )


async def test_full_queue_answers_429_with_retry_after(api):
    scheduler = api.app.state.server.scheduler
    scheduler.config = dataclasses.replace(scheduler.config, max_queue=0)
    resp = await api.post("/generate", json={"prompt": "x"})
    assert_error(resp, 429, "overloaded", "queue is full")
    assert resp.headers["retry-after"] == "1"


async def test_a_body_not_sent_as_json_says_which_content_type_to_send(api):
    body = json.dumps({"prompt": "hi", "max_new_tokens": 2})
    for headers in ({"content-type": "application/x-www-form-urlencoded"}, {"content-type": "text/plain"}):
        resp = await api.post("/generate", content=body, headers=headers)
        assert_error(resp, 422, "invalid_request", "content-type: application/json", headers["content-type"])
        assert "prompt" not in resp.json()["error"]["message"]  # the raw body is not dumped back


async def test_training_data_uploaded_as_a_prefix_is_named(api):
    jsonl = b'{"prompt": "Review: good\\nSentiment:", "completion": " positive"}\n' * 3
    resp = await upload(api, "oops", jsonl)
    assert_error(resp, 422, "invalid_prefix", "starts like JSON text", "prefix-server train")
    assert "8390326431219982971" not in resp.json()["error"]["message"]


async def test_an_unknown_task_gets_a_hint_of_the_known_ones(api, engine):
    assert_error(
        await api.post("/generate", json={"prompt": "hi", "task_id": "x"}),
        404,
        "task_not_found",
        "task 'x' not found; there are no tasks yet",
    )
    for task in ("sentiment", "booking"):
        assert (await upload(api, task, random_native(engine, 3, 0))).status_code == 201
    assert_error(
        await api.post("/generate", json={"prompt": "hi", "task_id": "sentimnet"}),
        404,
        "task_not_found",
        "known tasks: booking, sentiment (GET /prefixes lists them)",
    )


async def test_ready_and_generate_say_503_when_the_scheduler_loop_is_not_running(api):
    assert (await api.get("/ready")).status_code == 200
    scheduler = api.app.state.server.scheduler
    scheduler._task.cancel()  # as if the loop had died
    await asyncio.gather(scheduler._task, return_exceptions=True)
    assert_error(await api.get("/ready"), 503, "not_ready", "scheduler loop stopped")
    assert_error(
        await api.post("/generate", json={"prompt": "hi"}), 503, "not_ready", "scheduler loop stopped"
    )
    scheduler._task = None  # nothing left for the shutdown to wait on


async def test_a_top_k_beyond_int64_is_a_clear_4xx_not_a_failed_batch(api):
    """Found by the schema fuzzer: a huge top_k passed validation and failed the engine step (500 for the
    whole batch). Now it is refused (422 here, 400 on the OpenAI route), and a top_k above the vocabulary
    keeps every token."""
    body = {"prompt": "hi", "max_new_tokens": 2, "temperature": 1.0, "seed": 3}
    huge = 17553672784685947682816
    reply = await api.post("/generate", json={**body, "top_k": huge})
    message = reply.json()["error"]["message"]
    assert (
        reply.status_code == 422 and "top_k" in message and "2147483647" in message and str(huge) in message
    )
    openai = await api.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "top_k": huge})
    assert openai.status_code == 400 and "top_k" in openai.text
    everything = await api.post("/generate", json={**body, "top_k": 2**31 - 1})
    assert everything.status_code == 200
    assert everything.json()["text"] == (await api.post("/generate", json=body)).json()["text"]
