"""Logprobs over HTTP, in-process on a tiny model: /generate (plain and SSE) and the OpenAI routes through
the official `openai` client (plain and streamed), their shapes, their values (the model's own forward),
and the 4xx for values out of range."""

from __future__ import annotations

import asyncio
import json
import re
from typing import ClassVar

import openai
import pytest
import torch
from conftest import app_client, byte_tokenizer, chat_engine, tiny_app
from test_logprobs import reference_logprobs
from test_openai import with_openai

from server.api import logprobs as logprobs_api
from server.registry.format import save_native
from server.request import TokenLogprob

ATOL = 1e-4
PROMPT = "The review was"


@pytest.fixture(scope="module")
def engine():
    return chat_engine("llama-gqa")


@pytest.fixture
async def api(tmp_path, engine):
    """An httpx client of an app with the OpenAI routes; .openai: the official client over the same app."""
    app = tiny_app(engine, tmp_path / "prefixes", max_batch_size=8, max_batch_wait_ms=50.0)
    async with app_client(with_openai(app)) as client:
        client.openai = openai.AsyncOpenAI(
            base_url="http://t/v1", api_key="none", http_client=client, max_retries=0
        )
        yield client


async def add_task(api, engine, task_id: str) -> list[int]:
    """A task whose prefix is the K/V of some tokens (acting as those tokens prepended); returns them."""
    ids = torch.randint(2, 200, (5,), generator=torch.Generator().manual_seed(3)).tolist()
    files = {"file": ("prefix.safetensors", save_native(engine.encode_prefix(ids)))}
    assert (await api.post("/prefixes", data={"task_id": task_id}, files=files)).status_code == 201
    return ids


def reference(engine, prompt_ids: list[int], output: list[int], prefix_ids: list[int] | None = None):
    prefix = None if prefix_ids is None else engine.encode_prefix(prefix_ids)
    return reference_logprobs(engine.model, prefix, prompt_ids, output)  # [len(output), vocab]


def token_bytes(shown: str) -> bytes:
    """A token as OpenAI lists it (its text, or "bytes:\\xe2\\x80") back to its bytes."""
    if shown.startswith("bytes:"):
        return bytes(int(h, 16) for h in re.findall(r"\\x([0-9a-f]{2})", shown))
    return shown.encode()


def sse(raw: str) -> list:
    blocks = raw.strip().split("\n\n")
    assert all(b.startswith("data: ") for b in blocks), raw
    return [b[6:] if b == "data: [DONE]" else json.loads(b[6:]) for b in blocks]


# ---- /generate ----
@pytest.mark.parametrize("task", [None, "sentiment"])
async def test_generate_logprobs_are_the_models_own(api, engine, task):
    prefix_ids = await add_task(api, engine, "sentiment") if task else None
    body = {"task_id": task, "prompt": PROMPT, "max_new_tokens": 6, "ignore_eos": True, "logprobs": 3}
    reply = (await api.post("/generate", json=body)).json()
    token_ids, entries = reply["token_ids"], reply["logprobs"]
    assert [e["token_id"] for e in entries] == token_ids and len(token_ids) == 6
    ref = reference(engine, engine.tokenizer(PROMPT)["input_ids"], token_ids, prefix_ids)
    for e, row in zip(entries, ref, strict=True):
        assert set(e) == {"token_id", "text", "logprob", "top"}
        assert e["text"] == engine.tokenizer.decode([e["token_id"]])
        assert abs(e["logprob"] - row[e["token_id"]].item()) < ATOL
        want = torch.topk(row, 3)
        assert [t["token_id"] for t in e["top"]] == want.indices.tolist()
        assert [t["text"] for t in e["top"]] == [engine.tokenizer.decode([t]) for t in want.indices.tolist()]
        assert torch.allclose(torch.tensor([t["logprob"] for t in e["top"]]), want.values, atol=ATOL)
        assert e["top"][0]["token_id"] == e["token_id"]  # greedy
    plain = (await api.post("/generate", json={**body, "logprobs": None})).json()
    assert plain["logprobs"] is None and plain["token_ids"] == token_ids  # greedy tokens unchanged
    none = (await api.post("/generate", json={**body, "logprobs": 0})).json()
    assert all(e["top"] == [] for e in none["logprobs"]) and none["token_ids"] == token_ids


async def test_generate_stream_carries_each_tokens_logprobs(api):
    body = {"prompt": PROMPT, "max_new_tokens": 7, "ignore_eos": True, "logprobs": 2}
    plain = (await api.post("/generate", json=body)).json()
    events = sse((await api.post("/generate", json={**body, "stream": True})).text)
    tokens, done = events[:-1], events[-1]
    assert [e["type"] for e in tokens] == ["token"] * 7 and done["type"] == "done"
    assert all(len(e["logprobs"]) == 1 and e["logprobs"][0]["token_id"] == e["token_id"] for e in tokens)
    assert [e["logprobs"][0] for e in tokens] == plain["logprobs"] == done["logprobs"]
    events = sse((await api.post("/generate", json={**body, "stream": True, "logprobs": None})).text)
    assert all("logprobs" not in e for e in events[:-1]) and events[-1]["logprobs"] is None


@pytest.mark.parametrize(
    "value, problem",
    [
        (-1, "should be null or an integer 0-20"),
        (21, "should be null or an integer 0-20"),
        ("3", "should be a valid integer (null or 0-20"),
        (True, "should be a valid integer (null or 0-20"),
        (2.0, "should be a valid integer (null or 0-20"),  # no coercion, as on every integer field
    ],
)
async def test_generate_logprobs_out_of_range_is_422(api, value, problem):
    resp = await api.post("/generate", json={"prompt": PROMPT, "logprobs": value})
    assert resp.status_code == 422, resp.text
    message = resp.json()["error"]["message"]
    assert message.startswith(f"logprobs: Input {problem}"), message
    assert message.endswith(f"(got {value!r})"), message


# ---- /v1/completions ----
async def test_completion_logprobs_in_openais_shape(api, engine):
    generate = {"prompt": PROMPT, "max_new_tokens": 8, "ignore_eos": True, "logprobs": 4}
    expected = (await api.post("/generate", json=generate)).json()
    args = dict(
        model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=4, extra_body={"ignore_eos": True}
    )
    out = await api.openai.completions.create(**args)
    choice = out.choices[0]
    assert choice.text == expected["text"]
    lp = choice.logprobs
    ids = expected["token_ids"]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert lp.token_logprobs == [e["logprob"] for e in expected["logprobs"]]
    for i, (token, top, e) in enumerate(zip(lp.tokens, lp.top_logprobs, expected["logprobs"], strict=True)):
        text = engine.tokenizer.decode([ids[i]])
        assert token == text if "\ufffd" not in text else re.fullmatch(r"bytes:(\\x[0-9a-f]{2})+", token)
        assert top[token] == lp.token_logprobs[i]  # the chosen token is always among them
        assert list(top.values()) == [t["logprob"] for t in e["top"]][: len(top)]
        assert len(top) <= 5
        assert lp.text_offset[i] == len(engine.tokenizer.decode(ids[:i]))
    assert b"".join(token_bytes(t) for t in lp.tokens).decode(errors="replace") == choice.text
    stream = await api.openai.completions.create(**args, stream=True)
    chunks = [c async for c in stream]
    streamed = {key: [] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    for c in chunks:
        if c.choices[0].logprobs is not None:
            for key, values in streamed.items():
                values += getattr(c.choices[0].logprobs, key)
    assert streamed == {key: getattr(lp, key) for key in streamed}
    assert "".join(c.choices[0].text for c in chunks) == choice.text


async def test_completion_choices_with_and_without_logprobs(api):
    """n sampled choices of two prompts: each its own logprobs; a request without them gets null."""
    out = await api.openai.completions.create(
        model="tiny", prompt=[PROMPT, "Another one"], max_tokens=5, n=2, seed=7, temperature=1.0, logprobs=0
    )
    assert len(out.choices) == 4
    for choice in out.choices:
        assert len(choice.logprobs.tokens) == len(choice.logprobs.top_logprobs) > 0
        assert all(len(top) == 1 for top in choice.logprobs.top_logprobs)  # the chosen token alone
    plain = await api.openai.completions.create(model="tiny", prompt=PROMPT, max_tokens=3)
    assert plain.choices[0].logprobs is None


# ---- /v1/chat/completions ----
async def test_chat_logprobs_in_openais_shape(api, engine):
    messages = [{"role": "user", "content": "Is it good?"}]
    args = dict(model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    out = await api.openai.chat.completions.create(**args, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    prompt_ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
        prompt_ids = prompt_ids["input_ids"]
    ids = (
        await api.post(
            "/generate",
            json={"prompt": engine.tokenizer.decode(prompt_ids), "max_new_tokens": 6, "ignore_eos": True},
        )
    ).json()["token_ids"]
    ref = reference(engine, list(prompt_ids), ids)
    for item, token_id, row in zip(content, ids, ref, strict=True):
        assert bytes(item.bytes) == token_bytes(item.token)
        assert abs(item.logprob - row[token_id].item()) < ATOL
        want = torch.topk(row, 3)
        assert torch.allclose(torch.tensor([t.logprob for t in item.top_logprobs]), want.values, atol=ATOL)
        assert item.top_logprobs[0].token == item.token and item.top_logprobs[0].bytes == item.bytes
    assert (
        b"".join(bytes(i.bytes) for i in content).decode(errors="replace") == out.choices[0].message.content
    )
    stream = await api.openai.chat.completions.create(**args, stream=True, extra_body={"ignore_eos": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].logprobs is None  # the role chunk
    streamed = [i for c in chunks if c.choices[0].logprobs for i in c.choices[0].logprobs.content]
    assert streamed == content
    plain = await api.openai.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


async def test_chat_logprobs_without_top(api):
    out = await api.openai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3, logprobs=True
    )
    assert all(item.top_logprobs == [] for item in out.choices[0].logprobs.content)


@pytest.mark.parametrize(
    "path, extra, param, fragment",
    [
        ("completions", {"logprobs": -1}, "logprobs", "Input should be null or an integer 0-20"),
        ("completions", {"logprobs": 21}, "logprobs", "0-20"),
        ("completions", {"logprobs": True}, "logprobs", "0-20"),
        ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "0-20"),
        ("chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs", "0-20"),
        ("chat/completions", {"top_logprobs": 3}, "top_logprobs", "needs logprobs: true"),
        ("chat/completions", {"logprobs": False, "top_logprobs": 3}, "top_logprobs", "needs logprobs: true"),
        ("chat/completions", {"logprobs": 1}, "logprobs", "valid boolean"),
    ],
)
async def test_openai_logprobs_out_of_range_are_400(api, path, extra, param, fragment):
    """OpenAI answers a bad parameter with 400 (not 422), naming it."""
    base = {"model": "tiny", "max_tokens": 2}
    base |= {"messages": [{"role": "user", "content": "x"}]} if path.startswith("chat") else {"prompt": "x"}
    resp = await api.post(f"/v1/{path}", json={**base, **extra})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and fragment in error["message"], error


async def test_concurrent_requests_of_other_tasks_each_get_their_own(api, engine):
    """Requests batched together (two tasks and the base model, with and without logprobs) answer as
    each does alone."""
    await add_task(api, engine, "sentiment")
    bodies = [
        {"task_id": "sentiment", "prompt": PROMPT, "logprobs": 2},
        {"prompt": "Another prompt", "logprobs": None},
        {"task_id": "sentiment", "prompt": "A third one", "logprobs": 0},
        {"prompt": PROMPT, "logprobs": 5, "temperature": 0.9, "seed": 3},
    ]
    bodies = [{**b, "max_new_tokens": 5, "ignore_eos": True} for b in bodies]
    together = await asyncio.gather(*(api.post("/generate", json=b) for b in bodies))
    for body, reply in zip(bodies, together, strict=True):
        alone = (await api.post("/generate", json=body)).json()
        assert reply.json()["token_ids"] == alone["token_ids"]
        if body["logprobs"] is None:
            assert reply.json()["logprobs"] is None
            continue
        for got, want in zip(reply.json()["logprobs"], alone["logprobs"], strict=True):
            assert got["token_id"] == want["token_id"] and abs(got["logprob"] - want["logprob"]) < ATOL
            assert [t["token_id"] for t in got["top"]] == [t["token_id"] for t in want["top"]]


# ---- rendering ----
class SentencePieceLike:
    """decode / convert_ids_to_tokens of a tokenizer with byte-fallback tokens (<0xE2>) and specials."""

    pieces: ClassVar[dict[int, str]] = {0: "</s>", 1: "<0xE2>", 2: "▁positive", 3: "<0x82>"}

    def decode(self, ids, skip_special_tokens=False):
        text = "".join(self.pieces[i] for i in ids)
        text = re.sub(r"(<0x[0-9A-F]{2}>)+", lambda m: _from_bytes(m[0]), text)
        return text.replace("▁", " ").replace("</s>", "" if skip_special_tokens else "</s>")

    def convert_ids_to_tokens(self, token_id):
        return self.pieces[token_id]


def _from_bytes(run: str) -> str:
    return bytes(int(h, 16) for h in re.findall(r"<0x([0-9A-F]{2})>", run)).decode(errors="replace")


@pytest.mark.parametrize(
    "tokenizer, token_id, text, raw, shown",
    [
        (SentencePieceLike(), 1, "\ufffd", b"\xe2", "bytes:\\xe2"),
        (SentencePieceLike(), 2, " positive", b" positive", " positive"),
        (SentencePieceLike(), 0, "</s>", b"</s>", "</s>"),
        (byte_tokenizer(), 160, "\ufffd", b"\xe2", "bytes:\\xe2"),  # GPT-2's byte-level symbol for 0xe2
        (byte_tokenizer(), 0, "<|endoftext|>", b"<|endoftext|>", "<|endoftext|>"),
    ],
)
def test_token_text_bytes_and_openai_name(tokenizer, token_id, text, raw, shown):
    assert logprobs_api.token_text(tokenizer, token_id) == text
    assert logprobs_api.token_bytes(tokenizer, token_id) == raw
    assert logprobs_api.shown_token(tokenizer, token_id) == shown


def test_infinite_and_nan_logprobs_are_json_numbers():
    """-inf (probability 0) and NaN (a broken prefix) would make invalid JSON: both are -9999.0."""
    entry = TokenLogprob(2, float("-inf"), ((2, float("nan")), (1, -0.5)))
    tokenizer = SentencePieceLike()
    shapes = [
        logprobs_api.generate_entries(tokenizer, [entry]),
        logprobs_api.completion_logprobs(tokenizer, [entry], [2], 0, " positive"),
        logprobs_api.chat_logprobs(tokenizer, [entry]),
    ]
    text = json.dumps(shapes, allow_nan=False)
    assert text.count("-9999.0") == 6 and text.count("-0.5") == 3  # each shape: the token and top[0]
