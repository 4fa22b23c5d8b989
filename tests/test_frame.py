"""Prompt frames: a task's template and answer defaults, stored in its prefix file's metadata, set at
upload, inferred by training, and applied by /generate (`input`) and the OpenAI routes; in-process on a
tiny model, then the shipped examples on the real default model (slow)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import torch
from conftest import (
    STORE_FP,
    app_client,
    chat_engine,
    make_tiny_model,
    native_bytes,
    peft_prefix_model,
    tiny_app,
)

from server.api.app import create_app
from server.config import Settings
from server.errors import InvalidRequest, PrefixFormatError
from server.registry.folder_store import FolderStore
from server.registry.format import PrefixKV, read_metadata, save_native
from server.registry.frame import TaskFrame, TaskScores
from server.registry.registry import PrefixRegistry
from server.training.data import Example, answer, read_jsonl
from server.training.examples import register_examples
from server.training.frame import default_max_new_tokens, default_stop, frame_from_data, infer_template

FAMILY = "llama-gqa"
FULL = TaskFrame(
    template='Review: {input}\nSentiment {"json": true}:',  # other braces are plain text
    description="Sentiment of a review.",
    max_new_tokens=7,
    stop=("\n", "END"),
    scores=TaskScores(0.08, 1.0, 50),
)
EXAMPLES = Path(__file__).resolve().parent.parent / "prefixes" / "examples"


# ---- the frame itself ----
@pytest.mark.parametrize(
    "frame",
    [FULL, TaskFrame(template="{input}"), TaskFrame(stop=()), TaskFrame(description="ü ✓ \U0001f600")],
)
def test_metadata_round_trip(frame):
    md = frame.to_metadata()
    assert all(isinstance(v, str) for v in md.values())
    assert TaskFrame.from_metadata(md) == frame
    # through a real file, beside the fingerprint
    prefix = PrefixKV(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16), STORE_FP)
    assert TaskFrame.from_metadata(read_metadata(save_native(prefix, md))) == frame


def test_no_frame_keys_means_no_frame():
    assert TaskFrame.from_metadata({}) is None
    assert TaskFrame.from_metadata(read_metadata(native_bytes(0))) is None
    # training scores alone are a frame (shown), with no template
    assert TaskFrame.from_metadata({"eval_before": "0.1", "eval_after": "0.9"}).template is None


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"template": "Review: X\nSentiment:"}, "exactly once"),
        ({"template": "{input} and {input}"}, "2 times"),
        ({"template": "{input}" + "x" * 5000}, "the limit is 4096"),
        ({"template": "{input}\ud800"}, "lone UTF-16 surrogate \\ud800"),
        ({"description": "d" * 2000}, "the limit is 1024"),
        ({"description": 5}, "must be a string"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer in [1, 65536]"),
        ({"max_new_tokens": 1 << 20}, "max_new_tokens must be"),
        ({"max_new_tokens": True}, "max_new_tokens must be"),
        ({"stop": ("",)}, "stop[0] must be a non-empty string"),
        ({"stop": ("a",) * 9}, "at most 8"),
        ({"stop": ("a", "s" * 300)}, "stop[1] has 300 characters"),
        ({"stop": ("\udc00",)}, "lone UTF-16 surrogate"),
    ],
)
def test_invalid_frames_name_the_field(fields, fragment):
    with pytest.raises(InvalidRequest) as e:
        TaskFrame(**fields)
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    ("md", "fragment"),
    [
        ({"stop": "\n"}, "stop must be a JSON list"),
        ({"stop": '"x"'}, "stop must be a JSON list"),
        ({"stop": "[1]"}, "stop[0] must be a non-empty string"),
        ({"max_new_tokens": "ten"}, "max_new_tokens must be an integer"),
        ({"max_new_tokens": "+5"}, "max_new_tokens must be an integer"),
        ({"eval_before": "0", "eval_after": "1.5"}, "eval_after must be a number in [0, 1]"),
        ({"eval_before": "nan", "eval_after": "1"}, "eval_before must be a number in [0, 1]"),
        ({"template": "no slot"}, "exactly once"),
    ],
)
def test_invalid_metadata_is_a_format_error(md, fragment):
    with pytest.raises(PrefixFormatError) as e:
        TaskFrame.from_metadata(md)
    assert "prefix metadata" in str(e.value) and fragment in str(e.value)


def test_fill_is_plain_text_replacement():
    assert FULL.fill("great {food}") == 'Review: great {food}\nSentiment {"json": true}:'
    assert FULL.merged(TaskFrame(max_new_tokens=3)) == TaskFrame(**{**FULL.__dict__, "max_new_tokens": 3})
    assert FULL.merged(None) == FULL and FULL.merged(TaskFrame()) == FULL


# ---- what training infers ----
@pytest.mark.parametrize(
    ("prompts", "template"),
    [
        (["Review: Good food.\nSentiment:", "Review: Bad.\nSentiment:"], "Review: {input}\nSentiment:"),
        (["Request: a\nJSON:", "Request: bb\nJSON:", "Request: ccc\nJSON:"], "Request: {input}\nJSON:"),
        (["Q: What is 2+2?\nA:", "Q: Who are you?\nA:"], "Q: {input}\nA:"),  # "What"/"Who": no "W"
        (["abc=", "xyz="], "{input}="),
        (["Translate: hi", "Translate: bye"], "Translate: {input}"),
        (["The cat", "The dog"], "The {input}"),
        (["x: \nA:", "x: y\nA:"], "x: {input}\nA:"),  # an empty input is still an input
        (["hello world", "goodbye moon"], None),  # nothing in common
        (["same", "same"], None),  # one distinct prompt: nothing varies
        (["only one"], None),
        ([" a ", " b "], None),  # only blanks in common
        (["{input} a", "{input} b"], None),  # a literal slot in the frame text
    ],
)
def test_infer_template(prompts, template):
    assert infer_template(prompts) == template


def test_defaults_from_completions(tokenizer):
    # one token per byte: the longest is 9 tokens, + 1 EOS + max(4, 9 // 4)
    assert default_max_new_tokens([" positive", " no"], tokenizer) == 9 + 1 + 4
    assert default_max_new_tokens(["x" * 40], tokenizer) == 40 + 1 + 10
    assert default_stop([" a\n", " bb\n"]) == ("\n",)
    assert default_stop([" a\n", " bb"]) is None
    assert default_stop([" a\nb\n"]) is None  # several lines: EOS ends it, not the first newline
    frame = frame_from_data([Example("n: 1\nA:", " one"), Example("n: 22\nA:", " two")], tokenizer)
    assert (frame.template, frame.max_new_tokens, frame.stop) == ("n: {input}\nA:", 9, None)
    given = frame_from_data([Example("a", "b")], tokenizer, template="<{input}>", description="d")
    assert (given.template, given.description) == ("<{input}>", "d")


# ---- store and registry ----
def test_store_reads_the_frame_from_the_file(tmp_path):
    prefix = PrefixKV(torch.ones(2, 2, 4, 16), torch.ones(2, 2, 4, 16), STORE_FP)
    data = save_native(prefix, FULL.to_metadata())
    store = FolderStore(tmp_path)
    store.recover()
    record = store.put("t", lambda version: data, num_virtual_tokens=4, source="native")
    assert record.frame == FULL and record.to_dict()["frame"] == FULL.to_dict()
    assert json.loads((tmp_path / "tasks/t/v1.json").read_text())["frame"]["template"] == FULL.template
    again = FolderStore(tmp_path)
    again.recover()
    assert again.get("t") == record  # after a restart, read back from the file


@pytest.fixture
def registry(tmp_path):
    return PrefixRegistry.open(
        tmp_path / "store", STORE_FP, cache_bytes=1 << 20, dtype=torch.float32, device="cpu"
    )


def test_upload_keeps_the_file_frame_and_applies_overrides(registry):
    prefix = PrefixKV(torch.ones(2, 2, 4, 16), torch.ones(2, 2, 4, 16), STORE_FP)
    record = registry.upload("t", save_native(prefix, FULL.to_metadata()))
    assert record.frame == FULL
    record = registry.upload(
        "t", save_native(prefix, FULL.to_metadata()), frame=TaskFrame(template="<{input}>")
    )
    assert record.frame == FULL.merged(TaskFrame(template="<{input}>"))
    assert TaskFrame.from_metadata(read_metadata(registry.store.read(registry.get("t")))) == record.frame
    assert registry.upload("plain", native_bytes(1)).frame is None
    assert registry.add("text", prefix, frame=TaskFrame(stop=("x",))).frame == TaskFrame(stop=("x",))


# ---- over HTTP ----
@pytest.fixture
def engine():
    return chat_engine(FAMILY)


@pytest.fixture
async def api(tmp_path, engine):
    app = tiny_app(engine, tmp_path / "prefixes", max_batch_size=8, max_batch_wait_ms=50.0)
    async with app_client(app) as c:
        yield c


def prefix_file(engine, seed: int = 0, metadata: dict | None = None) -> bytes:
    ids = torch.randint(2, 200, (5,), generator=torch.Generator().manual_seed(seed)).tolist()
    return save_native(engine.encode_prefix(ids), metadata)


async def upload(api, engine, task_id: str, seed: int = 0, metadata: dict | None = None, **form):
    files = {"file": ("p.safetensors", prefix_file(engine, seed, metadata))}
    return await api.post("/prefixes", data={"task_id": task_id, **form}, files=files)


def assert_error(resp, status: int, code: str, *fragments: str):
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["code"] == code, error
    for fragment in fragments:
        assert fragment in error["message"], error


TEMPLATE = "Review: {input}\nSentiment:"


async def test_upload_form_fields_set_the_frame_and_every_listing_shows_it(api, engine):
    form = {"template": TEMPLATE, "description": "reviews", "max_new_tokens": "5", "stop": ["\n", "END"]}
    resp = await upload(api, engine, "senti", metadata=FULL.to_metadata(), **form)
    assert resp.status_code == 201, resp.text
    want = {**FULL.to_dict(), "template": TEMPLATE, "description": "reviews", "max_new_tokens": 5}
    want["stop"] = ["\n", "END"]
    assert resp.json()["frame"] == want
    assert (await api.get("/prefixes/senti")).json()["frame"] == want
    assert (await api.get("/prefixes")).json()["prefixes"][0]["frame"] == want
    models = (await api.get("/v1/models")).json()["data"]
    base, task = models
    assert {k: base[k] for k in ("id", "object", "owned_by")} == {
        "id": "tiny",
        "object": "model",
        "owned_by": "prefix-server",
    }
    assert base["prefix_server"] == {"kind": "base_model", "chat": "chat_template"}
    assert task["id"] == "senti" and task["object"] == "model" and isinstance(task["created"], int)
    assert task["prefix_server"] == {
        "kind": "task",
        "version": 1,
        "num_virtual_tokens": 5,
        "chat": "template",
        "frame": want,
    }
    assert (await api.get("/v1/models/senti")).json() == task
    # the file the server hands back carries the frame too
    assert (await api.get("/prefixes/senti")).json()["version"] == 1


async def test_peft_upload_without_frame_is_unchanged(api, engine, tmp_path):
    _, weights, config = peft_prefix_model(make_tiny_model(FAMILY), 4, seed=2, tmp_path=tmp_path)
    files = {"file": ("adapter_model.safetensors", weights), "config": ("adapter_config.json", config)}
    resp = await api.post("/prefixes", data={"task_id": "peft"}, files=files)
    assert resp.status_code == 201 and resp.json()["frame"] is None and resp.json()["source"] == "peft"
    card = (await api.get("/v1/models/peft")).json()
    assert card["prefix_server"]["frame"] is None and card["prefix_server"]["chat"] == "chat_template"
    body = {"task_id": "peft", "prompt": "hello", "ignore_eos": True}
    out = (await api.post("/generate", json=body)).json()
    assert out["usage"]["completion_tokens"] == 64  # today's default
    resp = await api.post("/generate", json={"task_id": "peft", "input": "hello"})
    assert_error(resp, 422, "invalid_request", "task 'peft' has no template", "prompt", "template=")
    # and a PEFT upload may be given a frame
    files = {"file": ("adapter_model.safetensors", weights), "config": ("adapter_config.json", config)}
    resp = await api.post("/prefixes", data={"task_id": "peft", "template": "{input}:"}, files=files)
    assert resp.json()["frame"]["template"] == "{input}:"


@pytest.mark.parametrize(
    ("form", "fragment"),
    [
        ({"template": "no slot"}, "template must contain {input} exactly once"),
        ({"max_new_tokens": "0"}, "max_new_tokens"),
        ({"max_new_tokens": "99999999"}, "max_new_tokens: Input should be less than or equal to 65536"),
        ({"stop": [""]}, "stop.0: String should have at least 1 character"),
        ({"stop": ["s"] * 9}, "stop: List should have at most 8 items"),
        ({"description": "d" * 1025}, "description: String should have at most 1024 characters"),
    ],
)
async def test_bad_frame_fields_are_422_and_store_nothing(api, engine, form, fragment):
    resp = await upload(api, engine, "t", **form)
    assert resp.status_code == 422 and fragment in resp.text, resp.text
    assert (await api.get("/prefixes")).json()["prefixes"] == []


async def test_a_bad_frame_in_the_file_is_invalid_prefix(api, engine):
    resp = await upload(api, engine, "t", metadata={"template": "nothing to fill"})
    assert_error(resp, 422, "invalid_prefix", "prefix metadata: template must contain {input}")


async def test_from_text_takes_the_frame(api):
    body = {"task_id": "p", "text": "Be a pirate.", "template": "Q: {input}\nA:", "max_new_tokens": 3}
    resp = await api.post("/prefixes/from-text", json=body)
    assert resp.status_code == 201 and resp.json()["frame"]["template"] == "Q: {input}\nA:"
    assert resp.json()["frame"]["max_new_tokens"] == 3 and resp.json()["frame"]["stop"] is None
    resp = await api.post("/prefixes/from-text", json={**body, "stop": ["x"] * 9})
    assert_error(resp, 422, "invalid_request", "stop: List should have at most 8 items")
    raw = json.dumps({**body, "template": "Q \ud800 {input}"})  # escaped: httpx cannot encode it
    resp = await api.post("/prefixes/from-text", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 422 and "surrogate" in resp.text
    plain = await api.post("/prefixes/from-text", json={"task_id": "q", "text": "Be brief."})
    assert plain.json()["frame"] is None


async def test_generate_input_equals_the_filled_prompt(api, engine):
    assert (await upload(api, engine, "senti", seed=3, template=TEMPLATE)).status_code == 201
    text = "The soup was {cold}."
    common = {"task_id": "senti", "max_new_tokens": 12, "ignore_eos": True}
    by_input = (await api.post("/generate", json={**common, "input": text})).json()
    by_prompt = (
        await api.post("/generate", json={**common, "prompt": TEMPLATE.replace("{input}", text)})
    ).json()
    assert by_input["token_ids"] == by_prompt["token_ids"] and len(by_input["token_ids"]) == 12
    assert by_input["text"] == by_prompt["text"] and by_input["usage"] == by_prompt["usage"]
    stream = await api.post("/generate", json={**common, "input": text, "stream": True})
    events = [json.loads(line[6:]) for line in stream.text.split("\n\n") if line.startswith("data: ")]
    assert [e["token_id"] for e in events if e["type"] == "token"] == by_prompt["token_ids"]


async def test_task_defaults_apply_when_the_request_is_silent(api, engine):
    plain = {"task_id": "d", "prompt": "abc", "ignore_eos": True}
    assert (await upload(api, engine, "d", seed=4, max_new_tokens="20")).status_code == 201
    full = (await api.post("/generate", json=plain)).json()
    assert full["usage"]["completion_tokens"] == 20 and full["finish_reason"] == "length"
    assert (await api.post("/generate", json={**plain, "max_new_tokens": 3})).json()["usage"][
        "completion_tokens"
    ] == 3
    stop = full["text"][6:8]
    assert stop and full["text"].find(stop) >= 1
    cut = full["text"][: full["text"].find(stop)]
    assert (await upload(api, engine, "d", seed=4, max_new_tokens="20", stop=[stop])).status_code == 201
    by_default = (await api.post("/generate", json=plain)).json()
    explicit = (await api.post("/generate", json={**plain, "stop": stop})).json()
    assert by_default["text"] == explicit["text"] == cut and by_default["finish_reason"] == "stop"
    unstopped = (await api.post("/generate", json={**plain, "stop": []})).json()  # an explicit "none"
    assert unstopped["text"] == full["text"]
    # the OpenAI routes take the same defaults
    body = {"model": "d", "prompt": "abc", "temperature": 0, "ignore_eos": True}
    out = (await api.post("/v1/completions", json=body)).json()
    assert out["choices"][0]["text"] == cut and out["choices"][0]["finish_reason"] == "stop"
    out = (await api.post("/v1/completions", json={**body, "stop": None})).json()  # null: the default
    assert out["choices"][0]["text"] == cut
    out = (await api.post("/v1/completions", json={**body, "stop": []})).json()
    assert out["usage"]["completion_tokens"] == 20


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"prompt": "a", "input": "b"}, "exactly one of prompt"),
        ({"task_id": "senti"}, "exactly one of prompt"),
        ({"input": "b"}, "input needs a task with a template (task_id)"),
        ({"task_id": "nope", "input": "b"}, None),  # an unknown task stays a 404
    ],
)
async def test_generate_input_errors(api, engine, body, fragment):
    assert (await upload(api, engine, "senti", template=TEMPLATE)).status_code == 201
    resp = await api.post("/generate", json=body)
    if fragment is None:
        assert_error(resp, 404, "task_not_found")
    else:
        assert resp.status_code == 422 and fragment in resp.text, resp.text


async def test_chat_fills_the_template_with_the_last_user_message(api, engine):
    assert (
        await upload(api, engine, "senti", seed=5, template=TEMPLATE, max_new_tokens="9")
    ).status_code == 201
    text = "Cold soup, rude staff."
    filled = TEMPLATE.replace("{input}", text)
    generated = (
        await api.post("/generate", json={"task_id": "senti", "input": text, "ignore_eos": True})
    ).json()
    messages = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": "an earlier turn, ignored"},
        {"role": "assistant", "content": "ignored too"},
        {"role": "user", "content": text},
    ]
    body = {"model": "senti", "messages": messages, "temperature": 0, "ignore_eos": True}
    chat = (await api.post("/v1/chat/completions", json=body)).json()
    completion = (
        await api.post(
            "/v1/completions", json={**{k: v for k, v in body.items() if k != "messages"}, "prompt": filled}
        )
    ).json()
    assert chat["choices"][0]["message"]["content"] == completion["choices"][0]["text"] == generated["text"]
    assert chat["usage"] == completion["usage"]
    assert chat["usage"]["prompt_tokens"] == len(engine.tokenizer(filled)["input_ids"])
    assert (
        chat["usage"]["completion_tokens"] == 9 == generated["usage"]["completion_tokens"]
    )  # the task's default
    alone = (await api.post("/v1/chat/completions", json={**body, "messages": messages[-1:]})).json()
    assert alone["choices"] == chat["choices"]
    resp = await api.post("/v1/chat/completions", json={**body, "messages": messages[:-1]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages[2].role", resp.text
    assert "must be the user's" in resp.json()["error"]["message"]


async def test_chat_with_a_task_without_template_keeps_the_chat_template(api, engine):
    assert (await upload(api, engine, "plain", seed=6)).status_code == 201
    messages = [{"role": "user", "content": "Hi"}]
    rendered = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    gen = (
        await api.post(
            "/generate",
            json={"task_id": "plain", "prompt": rendered, "max_new_tokens": 6, "ignore_eos": True},
        )
    ).json()
    body = {"model": "plain", "messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    chat = (await api.post("/v1/chat/completions", json=body)).json()
    assert chat["choices"][0]["message"]["content"] == gen["text"]


# ---- the shipped examples ----
def test_register_examples_gives_a_stored_example_its_frame(tmp_path, registry):
    prefix = PrefixKV(torch.randn(2, 2, 4, 16), torch.randn(2, 2, 4, 16), STORE_FP)
    examples = tmp_path / "examples"
    for task in ("old", "users", "framed"):
        (examples / task).mkdir(parents=True)
        (examples / task / "prefix.safetensors").write_bytes(save_native(prefix, FULL.to_metadata()))
    registry.upload("old", save_native(prefix, {"task_id": "old"}))  # registered before frames
    users = registry.upload("users", native_bytes(3))  # the user's own tensors
    framed = registry.upload("framed", save_native(prefix), frame=TaskFrame(description="mine"))

    assert register_examples(registry, examples) == ["old"]
    assert registry.get("old").version == 2 and registry.get("old").frame == FULL
    assert registry.get("users") == users and registry.get("framed") == framed
    assert register_examples(registry, examples) == []  # idempotent


@pytest.mark.parametrize("task", ["sentiment", "booking"])
def test_shipped_examples_carry_their_frames(task):
    md = read_metadata((EXAMPLES / task / "prefix.safetensors").read_bytes())
    frame = TaskFrame.from_metadata(md)
    prompts = [e.prompt for e in read_jsonl(EXAMPLES / task / "eval.jsonl")]
    head, tail = frame.template.split("{input}")
    assert all(p.startswith(head) and p.endswith(tail) for p in prompts)
    assert frame.description and frame.max_new_tokens >= 5 and frame.scores.eval_after == 1.0
    assert json.loads((EXAMPLES / task / "prefix.json").read_text())["frame"] == frame.to_dict()


@pytest.mark.slow
async def test_shipped_examples_answer_by_input_and_by_openai_chat(tmp_path):
    """The default model as `make serve` starts it (loaded in the background, the examples registered:
    `--examples on`): each example answers its held-out prompts by `input`, and the official client's chat
    call, which fills the template, answers the same."""
    import openai

    real_app = create_app(Settings(prefix_dir=tmp_path / "prefixes", compile="off", examples="on"))
    async with real_app.router.lifespan_context(real_app):
        transport = httpx.ASGITransport(app=real_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=300) as api:
            for _ in range(600):
                if (await api.get("/ready")).status_code == 200:
                    break
                assert not real_app.state.server.load_error
                await asyncio.sleep(0.5)
            client = openai.AsyncOpenAI(
                base_url="http://t/v1",
                api_key="x",
                http_client=httpx.AsyncClient(transport=transport, base_url="http://t", timeout=300),
            )
            models = {m.id: m for m in (await client.models.list()).data}
            for task in ("sentiment", "booking"):
                frame = (await api.get(f"/prefixes/{task}")).json()["frame"]
                assert models[task].model_extra["prefix_server"]["frame"] == frame
                template = frame["template"]
                head, tail = template.split("{input}")
                for example in read_jsonl(EXAMPLES / task / "eval.jsonl")[:3]:
                    text = example.prompt[len(head) : len(example.prompt) - len(tail)]
                    assert head + text + tail == example.prompt
                    out = (await api.post("/generate", json={"task_id": task, "input": text})).json()
                    assert answer(out["text"]) == answer(example.completion), (task, text, out)
                    assert out["finish_reason"] == "stop"  # EOS within the task's max_new_tokens
                    chat = await client.chat.completions.create(
                        model=task, messages=[{"role": "user", "content": text}], temperature=0
                    )
                    assert chat.choices[0].message.content == out["text"], (task, text)
