"""The OpenAI-compatible routes: shapes and every error path in-process on a tiny model, then the official
`openai` client against a real server process on the default model (slow)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import sys
from pathlib import Path

import httpx
import pytest
import torch
from conftest import app_client, chat_engine, tiny_app, wait_for_load_error

from loadtest import serverproc
from server.api import openai as openai_routes
from server.api.app import create_app
from server.api.service import GenerationService
from server.config import Settings
from server.registry.format import save_native
from server.request import Request, SamplingParams

FAMILY = "llama-gqa"


def with_openai(app):
    """Mount the OpenAI router unless app.py already does."""
    if not any(getattr(route, "path", "") == "/v1/models" for route in app.routes):
        app.include_router(openai_routes.router)
    return app


@pytest.fixture
def engine():
    return chat_engine(FAMILY)


@pytest.fixture
async def make_api(tmp_path, engine):
    """make_api(**settings): an in-process client of an app with the OpenAI routes, on the tiny model."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(**overrides):
            app = tiny_app(
                engine, tmp_path / "prefixes", max_batch_size=8, max_batch_wait_ms=100.0, **overrides
            )
            return await stack.enter_async_context(app_client(with_openai(app)))

        yield make


@pytest.fixture
async def api(make_api):
    return await make_api()


async def add_task(api, engine, task_id: str, num_virtual_tokens: int = 5, seed: int = 0) -> None:
    ids = torch.randint(2, 200, (num_virtual_tokens,), generator=torch.Generator().manual_seed(seed)).tolist()
    files = {"file": ("prefix.safetensors", save_native(engine.encode_prefix(ids)))}
    assert (await api.post("/prefixes", data={"task_id": task_id}, files=files)).status_code == 201


def assert_openai_error(resp, status: int, param: str | None, code: str | None, *fragments: str):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    kind = {404: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}.get(status)
    assert error["type"] == (kind or "invalid_request_error"), body
    assert (error["param"], error["code"]) == (param, code), body
    for fragment in fragments:
        assert fragment in error["message"], body


def parse_sse(raw: str) -> list[dict | str]:
    blocks = raw.strip().split("\n\n")
    assert all(b.startswith("data: ") for b in blocks), raw
    return [b[6:] if b == "data: [DONE]" else json.loads(b[6:]) for b in blocks]


# ---- shapes ----
async def test_models_lists_the_base_model_and_the_tasks(api, engine):
    await add_task(api, engine, "pirate")
    listing = (await api.get("/v1/models")).json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["tiny", "pirate"]
    for card in listing["data"]:
        # OpenAI's fields, plus what this server says of the model (tests/test_frame.py)
        assert set(card) == {"id", "object", "created", "owned_by", "prefix_server"}
        assert card["object"] == "model"
    assert (await api.get("/v1/models/pirate")).json()["id"] == "pirate"
    assert (await api.get("/v1/models/tiny")).json()["id"] == "tiny"
    assert_openai_error(await api.get("/v1/models/nope"), 404, "model", "model_not_found", "nope")


@pytest.mark.parametrize("task", [None, "t"])
async def test_greedy_completion_equals_generate(api, engine, task):
    await add_task(api, engine, "t", seed=3)
    prompt = "The quick brown fox"
    gen = {"task_id": task, "prompt": prompt, "max_new_tokens": 12, "ignore_eos": True}
    expected = (await api.post("/generate", json=gen)).json()
    body = {"model": task or "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    out = (await api.post("/v1/completions", json=body)).json()
    assert set(out) == {"id", "object", "created", "model", "choices", "usage"}
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert out["model"] == (task or "tiny") and isinstance(out["created"], int)
    assert out["choices"] == [
        {"index": 0, "text": expected["text"], "logprobs": None, "finish_reason": "length"}
    ]
    usage = expected["usage"]
    assert out["usage"] == {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
    # token ids as the prompt give the same tokens
    ids = engine.tokenizer(prompt)["input_ids"]
    by_ids = (await api.post("/v1/completions", json={**body, "prompt": ids})).json()
    assert by_ids["choices"][0]["text"] == expected["text"]


async def test_default_max_tokens_is_16_and_stop_strings_cut(api):
    body = {"model": "tiny", "prompt": "stop test", "temperature": 0, "ignore_eos": True}
    out = (await api.post("/v1/completions", json=body)).json()
    assert out["usage"]["completion_tokens"] == 16 and out["choices"][0]["finish_reason"] == "length"
    text = out["choices"][0]["text"]
    stop = text[5:7]
    if text.find(stop) >= 1:
        for value in (stop, [stop, "\x00never"]):
            cut = (await api.post("/v1/completions", json={**body, "stop": value})).json()["choices"][0]
            assert cut["text"] == text[: text.find(stop)] and cut["finish_reason"] == "stop"


async def test_chat_applies_the_template_and_equals_generate(api, engine):
    await add_task(api, engine, "t", seed=5)
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
    ]
    rendered = engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    gen = {"task_id": "t", "prompt": rendered, "max_new_tokens": 10, "ignore_eos": True}
    expected = (await api.post("/generate", json=gen)).json()
    body = {"model": "t", "messages": messages, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    out = (await api.post("/v1/chat/completions", json=body)).json()
    assert set(out) == {"id", "object", "created", "model", "choices", "usage"}
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": expected["text"]},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    assert out["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"]
    # max_completion_tokens is OpenAI's newer name; without either, the context's room is the limit
    newer = {**body, "max_completion_tokens": 4}
    del newer["max_tokens"]
    assert (await api.post("/v1/chat/completions", json=newer)).json()["usage"]["completion_tokens"] == 4
    del newer["max_completion_tokens"]
    unlimited = (await api.post("/v1/chat/completions", json=newer)).json()
    room = 512 - 5 - expected["usage"]["prompt_tokens"]  # tiny model context - prefix - prompt
    assert unlimited["usage"]["completion_tokens"] == room


async def test_n_choices_are_seeded_in_turn_and_batch_together(api):
    body = {"model": "tiny", "prompt": "sample me", "max_tokens": 8, "temperature": 1.0, "ignore_eos": True}
    scheduler = api.app.state.server.scheduler
    before = len(scheduler.batch_sizes)
    out = (await api.post("/v1/completions", json={**body, "n": 3, "seed": 11})).json()
    assert set(list(scheduler.batch_sizes)[before:]) == {3}
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert out["usage"]["completion_tokens"] == 24 and out["usage"]["prompt_tokens"] == 9
    for j, choice in enumerate(out["choices"]):
        alone = (await api.post("/v1/completions", json={**body, "seed": 11 + j})).json()
        assert choice["text"] == alone["choices"][0]["text"]
    # a list of prompts: choices are prompt-major
    many = {**body, "prompt": ["one", "two"], "n": 2, "temperature": 0}
    texts = [c["text"] for c in (await api.post("/v1/completions", json=many)).json()["choices"]]
    one, two = [
        (await api.post("/v1/completions", json={**many, "prompt": p, "n": 1})).json()["choices"][0]["text"]
        for p in ("one", "two")
    ]
    assert texts == [one, one, two, two]


async def test_streamed_completion_equals_the_plain_reply(api):
    body = {"model": "tiny", "prompt": "stream me", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    plain = (await api.post("/v1/completions", json=body)).json()
    opts = {"stream": True, "stream_options": {"include_usage": True}}
    resp = await api.post("/v1/completions", json={**body, **opts})
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(resp.text)
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk, _ = events
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all(set(c["choices"][0]) == {"index", "text", "logprobs", "finish_reason"} for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["usage"] is None for c in chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == plain["usage"]
    # without include_usage: no usage at all
    bare = parse_sse((await api.post("/v1/completions", json={**body, "stream": True})).text)
    assert all("usage" not in c for c in bare[:-1]) and bare[-2]["choices"][0]["finish_reason"] == "length"


async def test_streamed_chat_with_n_choices(api):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 6,
        "temperature": 0.8,
        "seed": 1,
        "n": 2,
        "ignore_eos": True,
    }
    plain = (await api.post("/v1/chat/completions", json=body)).json()
    events = parse_sse((await api.post("/v1/chat/completions", json={**body, "stream": True})).text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and len(c["choices"]) == 1 for c in chunks)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] == "length"
        text = "".join(c["delta"].get("content", "") for c in mine)
        assert text == plain["choices"][index]["message"]["content"]


# ---- errors ----
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "tiny", "prompt": "hi"}


@pytest.mark.parametrize(
    "path, body, status, param, code, fragment",
    [
        ("completions", {**COMPLETION, "model": "nope"}, 404, "model", "model_not_found", "'nope'"),
        ("completions", {**COMPLETION, "model": "../x"}, 404, "model", "model_not_found", "does not exist"),
        ("chat/completions", {**CHAT, "model": "nope"}, 404, "model", "model_not_found", "'nope'"),
        ("completions", {"prompt": "hi"}, 400, "model", "invalid_request", "model: required"),
        ("completions", {**COMPLETION, "n": 0}, 400, "n", "invalid_request", "greater than or equal to 1"),
        ("completions", {**COMPLETION, "best_of": 2}, 400, "best_of", "unsupported_parameter", "best_of=2"),
        ("completions", {**COMPLETION, "echo": True}, 400, "echo", "unsupported_parameter", "not supported"),
        ("completions", {**COMPLETION, "logprobs": 21}, 400, "logprobs", "invalid_request", "0-20"),
        ("completions", {**COMPLETION, "suffix": "x"}, 400, "suffix", "unsupported_parameter", ""),
        ("completions", {**COMPLETION, "presence_penalty": 0.5}, 400, "presence_penalty", "unsupported_parameter", ""),
        ("completions", {**COMPLETION, "bogus": 1}, 400, "bogus", "unknown_parameter", "bogus"),
        ("completions", {**COMPLETION, "tools": []}, 400, "tools", "unknown_parameter", ""),
        ("completions", {**COMPLETION, "max_tokens": 0}, 400, "max_tokens", "invalid_request", ""),
        ("completions", {**COMPLETION, "max_tokens": 5000}, 400, "max_tokens", "invalid_request", "<= 1024"),
        ("completions", {**COMPLETION, "max_tokens": 600}, 400, None, "invalid_request", "context is 512"),
        ("completions", {**COMPLETION, "max_tokens": "5"}, 400, "max_tokens", "invalid_request", "'5'"),
        ("completions", {**COMPLETION, "temperature": -1}, 400, "temperature", "invalid_request", ""),
        ("completions", {**COMPLETION, "seed": -1}, 400, "seed", "invalid_request", ""),
        ("completions", {**COMPLETION, "prompt": []}, 400, "prompt", "invalid_request", "non-empty"),
        ("completions", {**COMPLETION, "prompt": [1, "a"]}, 400, "prompt", "invalid_request", ""),
        ("completions", {**COMPLETION, "prompt": ""}, 400, None, "invalid_request", "prompt is empty"),
        ("completions", {**COMPLETION, "prompt": [9999]}, 400, None, "invalid_request", "[0, 258)"),
        ("completions", {**COMPLETION, "stop": ""}, 400, None, "invalid_request", "non-empty"),
        ("completions", {**COMPLETION, "stop": [1]}, 400, "stop", "invalid_request", "list of strings"),
        ("completions", {**COMPLETION, "stream_options": {"x": 1}}, 400, "stream_options.x", "invalid_request", ""),
        ("chat/completions", {**CHAT, "messages": []}, 400, "messages", "invalid_request", ""),
        ("chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", "invalid_request", "'user'"),
        ("chat/completions", {**CHAT, "messages": [{"role": "user"}]}, 400, "messages[0].content", "invalid_request", "required"),
        ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "messages[0].content", "invalid_request", "only text content parts"),
        ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x", "tool_calls": []}]}, 400, "messages[0].tool_calls", "invalid_request", ""),
        ("chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "tools", "unsupported_parameter", ""),
        ("chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs", "invalid_request", "needs logprobs: true"),
        ("chat/completions", {**CHAT, "response_format": {"type": "yaml"}}, 400, "response_format.type", "invalid_request", "'json_schema'"),
        ("chat/completions", {**CHAT, "echo": True}, 400, "echo", "unknown_parameter", ""),
        ("chat/completions", {**CHAT, "stream": True, "n": 2, "model": "nope"}, 404, "model", "model_not_found", ""),
    ],
)  # fmt: skip
async def test_bad_requests_get_openai_errors(api, path, body, status, param, code, fragment):
    assert_openai_error(await api.post(f"/v1/{path}", json=body), status, param, code, fragment)


@pytest.mark.parametrize(
    "path, extra",
    [
        ("completions", {"user": "u1", "presence_penalty": 0, "frequency_penalty": 0.0, "best_of": 1}),
        ("completions", {"echo": False, "logprobs": None, "suffix": None, "logit_bias": {}}),
        ("chat/completions", {"user": "u1", "logprobs": False, "tool_choice": "none", "parallel_tool_calls": True}),
        ("chat/completions", {"stream_options": {"include_usage": False}, "response_format": {"type": "text"}}),
    ],
)  # fmt: skip
async def test_harmless_openai_fields_are_accepted(api, path, extra):
    body = {**(CHAT if path.startswith("chat") else COMPLETION), "max_tokens": 2, **extra}
    assert (await api.post(f"/v1/{path}", json=body)).status_code == 200


async def test_malformed_json_and_no_chat_template(api, engine):
    resp = await api.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert_openai_error(resp, 400, None, "malformed_json", "not valid JSON")
    engine.tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    resp = await api.post("/v1/chat/completions", json=CHAT)
    assert_openai_error(resp, 400, "messages", None, "chat template refused", "roles must alternate")
    engine.tokenizer.chat_template = None
    resp = await api.post("/v1/chat/completions", json=CHAT)
    assert_openai_error(resp, 400, "messages", "no_chat_template", "no chat template")


def post_raw(api, path: str, raw: bytes):
    return api.post(path, content=raw, headers={"content-type": "application/json"})


# A lone UTF-16 surrogate ("\ud800" as a JSON escape): the tokenizer's TypeError made a 500 on
# /v1/completions, a stop string was taken (and never matched), and the chat template's error leaked.
SURROGATES = {
    "prompt": ("completions", {**COMPLETION, "prompt": "\ud800abc"}, "prompt", "at character 0"),
    "prompt-list": ("completions", {**COMPLETION, "prompt": ["ok", "\ud800"]}, "prompt", "of item 1"),
    "stop": ("completions", {**COMPLETION, "stop": "\ud800"}, "stop", "at character 0"),
    "stop-list": ("completions", {**COMPLETION, "stop": ["a\udfff"]}, "stop", "at character 1 of item 0"),
    "content": ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content", ""),
    "content-parts": ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}, "messages[0].content", ""),
    "name": ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hi", "name": "\ud800"}]}, "messages[0].name", ""),
    "role": ("chat/completions", {**CHAT, "messages": [{"role": "\ud800", "content": "hi"}]}, "messages[0].role", ""),
    "model": ("completions", {**COMPLETION, "model": "\ud800"}, "model", ""),
}  # fmt: skip


@pytest.mark.parametrize("path, body, param, where", SURROGATES.values(), ids=SURROGATES.keys())
@pytest.mark.parametrize("stream", [False, True])
async def test_lone_surrogates_are_a_clear_400(api, path, body, param, where, stream):
    resp = await post_raw(api, f"/v1/{path}", json.dumps({**body, "stream": stream}).encode())
    assert_openai_error(resp, 400, param, "invalid_request", "lone UTF-16 surrogate \\ud", where)


UNREADABLE_JSON = {
    "huge-int": (b'{"model": "tiny", "prompt": "hi", "seed": ' + b"9" * 5000 + b"}", "at most 4300 digits"),
    "deep": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),  # was a 500
    "not-utf8": (b'{"model": "tiny", "prompt": "\xff"}', "expected UTF-8 text, got byte 0xff at offset 29"),
    "syntax": (b'{"model": ', "Expecting value at character 10"),
}


@pytest.mark.parametrize("path", ["completions", "chat/completions"])
@pytest.mark.parametrize("raw, fragment", UNREADABLE_JSON.values(), ids=UNREADABLE_JSON.keys())
async def test_unreadable_json_is_malformed_json(api, path, raw, fragment):
    assert_openai_error(await post_raw(api, f"/v1/{path}", raw), 400, None, "malformed_json", fragment)


async def test_tokenizer_errors_stay_inside(api, engine):
    """The chat template's own refusal is shown; the tokenizer's internals are not."""

    def broken(*args, **kwargs):
        raise TypeError(
            "TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]"
        )

    engine.tokenizer.apply_chat_template = broken
    resp = await api.post("/v1/chat/completions", json=CHAT)
    assert_openai_error(resp, 400, "messages", None, "the chat template could not format the messages")
    assert "TextEncodeInput" not in resp.text


async def test_long_values_are_echoed_short(api):
    long = "m" * 100_000
    bodies = [{**COMPLETION, key: long} for key in ("model", "best_of", "n")] + [{**COMPLETION, long: 1}]
    bodies.append({**COMPLETION, "max_tokens": 10**4000})  # an int JSON allows, past the server's limit
    for body in bodies:  # a long value, or a long unknown field's name
        resp = await api.post("/v1/completions", json=body)
        assert resp.status_code in (400, 404) and len(resp.content) < 1000, resp.content[:300]
        assert re.search(r"\.\.\. \(\d+ characters", resp.json()["error"]["message"]), resp.text


def test_openapi_describes_the_request_bodies(tmp_path):
    """The routes read their bodies themselves (errors in OpenAI's shape); the schema still says what
    they take, so generated clients and schema fuzzing send real bodies."""
    schema = with_openai(create_app(Settings(prefix_dir=tmp_path))).openapi()
    for path, fields in (
        ("/v1/completions", {"model", "prompt"}),
        ("/v1/chat/completions", {"model", "messages"}),
    ):
        body = schema["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        described = body["content"]["application/json"]["schema"]
        assert set(described["required"]) == fields and {"max_tokens", "stop", "stream"} <= set(
            described["properties"]
        )
        assert "$ref" not in json.dumps(described)  # inlined: these models are not in the components
    message = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    item = message["schema"]["properties"]["messages"]["items"]
    assert set(item["properties"]) == {"role", "content", "name"}


def test_openapi_documents_the_routes(tmp_path):
    schema = with_openai(create_app(Settings(prefix_dir=tmp_path))).openapi()
    for path in ("/v1/models", "/v1/models/{model}", "/v1/completions", "/v1/chat/completions"):
        assert path in schema["paths"]
    assert "ErrorBody" in json.dumps(schema["paths"]["/v1/completions"]["post"]["responses"])


async def test_full_queue_is_429_and_leaves_nothing_queued(api):
    scheduler = api.app.state.server.scheduler
    scheduler.config = dataclasses.replace(scheduler.config, max_queue=1)
    resp = await api.post("/v1/completions", json={**COMPLETION, "n": 2})  # the second choice does not fit
    assert_openai_error(resp, 429, None, "overloaded", "queue is full")
    assert resp.headers["retry-after"] == "1" and scheduler.num_waiting == 0


async def test_not_ready_is_503_in_openai_shape(tmp_path):
    app = with_openai(create_app(Settings(model=str(tmp_path / "no-such-model"), prefix_dir=tmp_path / "p")))
    async with app_client(app, base_url="http://test") as client:
        assert await wait_for_load_error(app)
        assert_openai_error(await client.get("/v1/models"), 503, None, "not_ready", "startup failed")
        assert_openai_error(await client.post("/v1/completions", json=COMPLETION), 503, None, "not_ready")


async def test_closing_the_event_stream_aborts_every_choice(api):
    """A client that goes away mid-stream (the generator is closed) aborts all n choices, and the
    server keeps serving."""
    state = api.app.state.server
    scheduler = state.scheduler
    sampling = SamplingParams(max_new_tokens=400, ignore_eos=True)
    requests = [Request([5, 6, 7], sampling, stream=True) for _ in range(3)]
    for req in requests:
        scheduler.submit(req)
    async with contextlib.aclosing(GenerationService(state).events(requests)) as events:
        async for _, event in events:
            assert event.kind == "token"
            break
    for _ in range(200):
        if scheduler.num_running == 0:
            break
        await asyncio.sleep(0.01)
    assert [r.finish_reason.value for r in requests] == ["abort"] * 3
    assert all(len(r.output_token_ids) < 400 for r in requests)
    # Aborting rows that are not in the last slot must not kill the scheduler loop (Engine.abort
    # moves slots, which needs torch.inference_mode).
    assert not scheduler._task.done(), f"scheduler loop died: {scheduler._task.exception()!r}"
    resp = await api.post("/v1/completions", json={**COMPLETION, "max_tokens": 2})
    assert resp.status_code == 200


# ---- tenants: the same keys as every other route ----
ADMIN, ACME, GLOBEX = "admin-key", "acme-key", "globex-key"


def keys_file(tmp_path) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"admin": [ADMIN], "tenants": {"acme": [ACME], "globex": [GLOBEX]}}))
    return path


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("key", [None, "wrong-key"])
@pytest.mark.parametrize(
    "method, path", [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]
)
async def test_a_valid_key_is_required(make_api, tmp_path, key, method, path):
    api = await make_api(api_keys_file=keys_file(tmp_path))
    body = CHAT if "chat" in path else COMPLETION
    resp = await api.request(method, path, json=body, headers=auth(key) if key else {})
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    error = resp.json()["error"]
    assert (error["type"], error["code"]) == ("authentication_error", "unauthorized"), error


async def test_tenants_see_and_use_only_their_own_tasks(make_api, tmp_path):
    api = await make_api(api_keys_file=keys_file(tmp_path))
    for key, text in ((ACME, "Talk like a pirate."), (GLOBEX, "Talk like a robot.")):
        body = {"task_id": "style", "text": text}
        assert (await api.post("/prefixes/from-text", json=body, headers=auth(key))).status_code == 201
    body = {"task_id": "secret", "text": "Only acme."}
    assert (await api.post("/prefixes/from-text", json=body, headers=auth(ACME))).status_code == 201

    async def models(key):
        return [m["id"] for m in (await api.get("/v1/models", headers=auth(key))).json()["data"]]

    assert await models(ACME) == ["tiny", "secret", "style"]
    assert await models(GLOBEX) == ["tiny", "style"]
    assert await models(ADMIN) == ["tiny", "acme~secret", "acme~style", "globex~style"]

    ask = {"prompt": "Hi!", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    texts = {}
    for key in (ACME, GLOBEX):
        out = (await api.post("/v1/completions", json={**ask, "model": "style"}, headers=auth(key))).json()
        gen = {"task_id": "style", "prompt": "Hi!", "max_new_tokens": 8, "ignore_eos": True}
        expected = (await api.post("/generate", json=gen, headers=auth(key))).json()
        assert out["model"] == "style" and out["choices"][0]["text"] == expected["text"]
        texts[key] = expected["token_ids"]
    assert texts[ACME] != texts[GLOBEX]
    for model in ("secret", "acme~secret"):
        resp = await api.post("/v1/completions", json={**ask, "model": model}, headers=auth(GLOBEX))
        assert_openai_error(resp, 404, "model", "model_not_found")
        resp = await api.get(f"/v1/models/{model}", headers=auth(GLOBEX))
        assert_openai_error(resp, 404, "model", "model_not_found")
    admin = await api.post("/v1/completions", json={**ask, "model": "acme~style"}, headers=auth(ADMIN))
    assert admin.json()["model"] == "acme~style" and admin.status_code == 200


async def test_each_choice_counts_against_quotas_and_in_metrics(make_api, tmp_path):
    api = await make_api(api_keys_file=keys_file(tmp_path), tenant_max_concurrent=2)
    body = {**COMPLETION, "n": 2, "max_tokens": 4}
    for stream in (False, True, False):  # every call gives its slots back, streamed or not
        resp = await api.post("/v1/completions", json={**body, "stream": stream}, headers=auth(ACME))
        assert resp.status_code == 200, resp.text
    resp = await api.post("/v1/completions", json={**body, "n": 3}, headers=auth(ACME))
    assert_openai_error(resp, 429, None, "quota_exceeded", "concurrent requests (max 2)")
    assert api.app.state.server.scheduler.num_waiting == 0
    metrics = (await api.get("/metrics", headers=auth(ADMIN))).text
    assert 'prefix_server_requests_total{status="ok",task="__base__"} 6.0' in metrics

    api = await make_api(api_keys_file=keys_file(tmp_path), tenant_rate=0.01, tenant_burst=2)
    assert (await api.post("/v1/completions", json=body, headers=auth(ACME))).status_code == 200
    resp = await api.post("/v1/chat/completions", json=CHAT, headers=auth(ACME))
    assert_openai_error(resp, 429, None, "quota_exceeded", "request rate")


# ---- the official client against a real server process (default model) ----
LAUNCH = """
import sys
from server import cli
from server.api import app as app_module, openai
create_app = app_module.create_app
def create_app_with_openai(*args, **kwargs):
    app = create_app(*args, **kwargs)
    if not any(getattr(route, "path", "") == "/v1/models" for route in app.routes):
        app.include_router(openai.router)
    return app
app_module.create_app = create_app_with_openai
cli.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base url, an httpx client with acme's key): a real `prefix-server serve` with the OpenAI routes and
    API keys; acme's task `pirate` made."""
    root = tmp_path_factory.mktemp("openai-server")
    prefix_dir, keys = root / "prefixes", keys_file(root)
    with open(root / "server.log", "w+") as log:
        args = ["--prefix-dir", str(prefix_dir), "--api-keys-file", str(keys)]
        with (
            serverproc.running(args, log=log, launcher=[sys.executable, "-c", LAUNCH]) as (_, base),
            httpx.Client(base_url=base, timeout=120, headers=auth(ACME)) as client,
        ):
            text = {"task_id": "pirate", "text": "You are a pirate. Answer like a pirate would."}
            assert client.post("/prefixes/from-text", json=text).status_code == 201
            yield base, client


def openai_client(server, key: str):
    import openai

    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(server):
    """The official client, with acme's key as its api_key (sent as Authorization: Bearer)."""
    return openai_client(server, ACME)


BASE = "SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_client_lists_models(client):
    assert [m.id for m in client.models.list()] == [BASE, "pirate"]
    assert client.models.retrieve("pirate").id == "pirate"


@pytest.mark.slow
@pytest.mark.parametrize("model", [BASE, "pirate"])
def test_client_completions_plain_and_streamed(server, client, model):
    prompt = "The capital of France is"
    expected = server[1].post(
        "/generate",
        json={"task_id": None if model == BASE else "pirate", "prompt": prompt, "max_new_tokens": 12},
    )
    out = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.model == model
    assert out.choices[0].text == expected.json()["text"]
    assert out.choices[0].finish_reason == expected.json()["finish_reason"]
    assert out.usage.completion_tokens == expected.json()["usage"]["completion_tokens"]
    stream = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert chunks[-1].usage.total_tokens == out.usage.total_tokens


@pytest.mark.slow
@pytest.mark.parametrize("model", [BASE, "pirate"])
def test_client_chat_plain_and_streamed(client, model):
    messages = [{"role": "user", "content": "What is the capital of Italy?"}]
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content and out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


@pytest.mark.slow
def test_client_sees_openai_errors(server, client):
    import openai

    with pytest.raises(openai.AuthenticationError) as e:
        openai_client(server, "wrong-key").models.list()
    assert e.value.code == "unauthorized" and e.value.type == "authentication_error"
    with pytest.raises(openai.NotFoundError) as e:  # acme's task is invisible to globex
        openai_client(server, GLOBEX).completions.create(model="pirate", prompt="hi")
    assert e.value.code == "model_not_found"

    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-task", prompt="hi")
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=BASE, prompt="hi", best_of=2)
    assert e.value.code == "unsupported_parameter" and e.value.param == "best_of"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=21
        )
    assert e.value.param == "top_logprobs"


@pytest.mark.slow
@pytest.mark.parametrize("model", [BASE, "pirate"])
def test_client_parses_structured_output_into_a_pydantic_model(client, model):
    """The client's own structured-output call (`chat.completions.parse` with a pydantic model: a strict
    json_schema response_format) gets JSON that its model parses, in every sampled choice."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=30)
        country: str = Field(max_length=30)
        population_millions: int = Field(ge=0, le=50)
        capital: bool
        climate: Literal["cold", "mild", "hot"]

    messages = [{"role": "user", "content": "Describe Rome as JSON."}]
    out = client.chat.completions.parse(
        model=model, messages=messages, response_format=City, max_tokens=120, temperature=1.0, seed=7, n=3
    )
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, City)
        assert City.model_validate_json(choice.message.content) == choice.message.parsed
