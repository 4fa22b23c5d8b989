"""Structured output (engine/grammar.py): rows constrained by a JSON schema or a regex always give text that
parses and validates, in one batch with unconstrained rows that stay token-exact; bad constraints get a
clear 4xx; the routes (/generate's json_schema and regex, OpenAI's response_format) reach the engine."""

from __future__ import annotations

import contextlib
import json
import re

import jsonschema
import pytest
import torch
from conftest import app_client, chat_engine, tiny_app
from test_openai import assert_openai_error, with_openai

from server.engine.grammar import json_schema_constraint
from server.errors import InvalidRequest
from server.request import Constraint, FinishReason, Request, SamplingParams

# Bounded schemas: a random tiny model would otherwise write a string until max_new_tokens.
BOOKING = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "guests": {"type": "integer", "minimum": 1, "maximum": 20},
        "day": {"enum": ["Monday", "Friday", "Sunday"]},
        "vip": {"type": "boolean"},
    },
    "required": ["name", "guests", "day", "vip"],
    "additionalProperties": False,
}
LIST = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": 99},
    "minItems": 1,
    "maxItems": 3,
}
PHONE = r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"  # not \\d: that is any Unicode digit, in both regex engines


@pytest.fixture(scope="module", params=["llama-gqa", "gpt2"])  # the paged kernel path and the torch-ops one
def engine(request):
    return chat_engine(request.param)


def text_of(engine, request: Request) -> str:
    return engine.tokenizer.decode(request.output_token_ids, skip_special_tokens=True)


def schema_request(
    engine, i: int, schema: dict | None, *, sampled: bool, max_new_tokens: int = 120
) -> Request:
    return Request(
        engine.tokenizer.encode(f"request {i}: "),
        SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if sampled else 0.0,
            seed=i if sampled else None,
            constraint=None if schema is None else json_schema_constraint(schema, "json_schema"),
        ),
    )


@pytest.mark.parametrize("schema", [BOOKING, LIST], ids=["object", "array"])
def test_constrained_rows_always_parse_and_validate(engine, schema):
    requests = [schema_request(engine, i, schema, sampled=i % 2 == 1) for i in range(12)]
    engine.generate(requests)
    for r in requests:
        assert r.finish_reason is FinishReason.STOP, (r.finish_reason, text_of(engine, r))
        jsonschema.validate(json.loads(text_of(engine, r)), schema)
    # The default format: json.dumps's separators, no other whitespace (after at most one leading).
    for r in requests:
        value = json.loads(text_of(engine, r))
        assert text_of(engine, r).lstrip(" \t\n") == json.dumps(value, ensure_ascii=False)


def test_mixed_batch_rows_equal_each_alone(engine):
    """Constrained and unconstrained rows, greedy and seeded, in one batch: every row gives the tokens it
    gives alone (the grammar's mask touches only its own row)."""

    def make() -> list[Request]:
        return [
            schema_request(engine, i, BOOKING if i % 3 else None, sampled=i % 2 == 1, max_new_tokens=60)
            for i in range(9)
        ]

    together = make()
    engine.generate(together)
    alone = make()
    for r in alone:
        engine.generate([r])
    assert [r.output_token_ids for r in together] == [r.output_token_ids for r in alone]
    # ... and the unconstrained rows are what they are without any constrained row in the batch.
    plain = [r for r in make() if r.sampling.constraint is None]
    engine.generate(plain)
    assert [r.output_token_ids for r in plain] == [
        r.output_token_ids for r in together if r.sampling.constraint is None
    ]


def test_regex_rows_match_and_stop_where_the_pattern_ends(engine):
    requests = [
        Request(
            engine.tokenizer.encode(f"call {i}"),
            SamplingParams(
                max_new_tokens=40, temperature=1.0, seed=i, constraint=Constraint("regex", PHONE, "regex")
            ),
        )
        for i in range(6)
    ]
    engine.generate(requests)
    for r in requests:
        assert r.finish_reason is FinishReason.STOP
        assert re.fullmatch(PHONE, text_of(engine, r)), text_of(engine, r)
        assert len(r.output_token_ids) <= 14  # one byte token each, EOS not even needed: the pattern is whole


def test_a_short_budget_ends_with_length_and_a_valid_start(engine):
    r = schema_request(engine, 1, BOOKING, sampled=False, max_new_tokens=5)
    engine.generate([r])
    assert r.finish_reason is FinishReason.LENGTH
    assert text_of(engine, r).lstrip().startswith('{"na')


def test_logprobs_of_constrained_rows_are_the_raw_distribution(engine):
    """A constrained row's logprobs are the model's, before the grammar's mask (as for temperature and
    top-k): a row's first token's logprob equals the unconstrained row's logprob of that same token."""
    prompt = engine.tokenizer.encode("x")
    free = Request(prompt, SamplingParams(max_new_tokens=1, logprobs=20))
    forced = Request(
        prompt, SamplingParams(max_new_tokens=1, logprobs=20, constraint=Constraint("regex", "Q", "regex"))
    )
    engine.generate([free, forced])
    q = engine.tokenizer.encode("Q")[0]
    assert forced.output_token_ids == [q]
    assert forced.output_logprobs[0].top == free.output_logprobs[0].top
    raw = torch.tensor([lp for _, lp in free.output_logprobs[0].top])
    assert forced.output_logprobs[0].logprob <= raw.max().item()


@pytest.mark.parametrize(
    "constraint, fragment",
    [
        (Constraint("json_schema", json.dumps({"type": "strin"}), "json_schema"), "strin"),
        (Constraint("json_schema", json.dumps({"not": {"type": "string"}}), "json_schema"), "not"),
        (Constraint("json_schema", json.dumps({"x-guidance": 5}), "json_schema"), "x-guidance"),
        (Constraint("regex", "a(b", "regex"), "unclosed group"),
    ],
    ids=["bad-type", "unsupported-keyword", "bad-options", "bad-regex"],
)
def test_constraints_that_cannot_be_enforced_are_refused(engine, constraint, fragment):
    r = Request(engine.tokenizer.encode("x"), SamplingParams(constraint=constraint))
    with pytest.raises(InvalidRequest, match=re.escape(fragment)) as info:
        engine.validate(r)
    assert info.value.param == constraint.param
    assert str(info.value).startswith(constraint.param)


def test_ignore_eos_and_non_object_schemas_are_refused():
    with pytest.raises(InvalidRequest, match="ignore_eos cannot be combined with regex"):
        SamplingParams(ignore_eos=True, constraint=Constraint("regex", "a", "regex"))
    with pytest.raises(InvalidRequest, match="must be a JSON object"):
        json_schema_constraint([1], "json_schema")


# ---- the routes ----
@pytest.fixture
async def api(tmp_path):
    engine = chat_engine("llama-gqa")
    async with contextlib.AsyncExitStack() as stack:
        app = with_openai(tiny_app(engine, tmp_path / "prefixes", max_batch_size=8))
        yield await stack.enter_async_context(app_client(app))


async def test_generate_json_schema_and_regex(api):
    resp = await api.post(
        "/generate", json={"prompt": "book:", "json_schema": BOOKING, "max_new_tokens": 100}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["finish_reason"] == "stop"
    jsonschema.validate(json.loads(body["text"]), BOOKING)
    resp = await api.post(
        "/generate", json={"prompt": "call:", "regex": PHONE, "temperature": 1.0, "seed": 3}
    )
    assert resp.status_code == 200, resp.text
    assert re.fullmatch(PHONE, resp.json()["text"])
    # streamed: the events' text is the same valid JSON
    resp = await api.post(
        "/generate", json={"prompt": "book:", "json_schema": BOOKING, "stream": True, "max_new_tokens": 100}
    )
    done = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")][-1]
    assert done["type"] == "done"
    jsonschema.validate(json.loads(done["text"]), BOOKING)


@pytest.mark.parametrize(
    "extra, status, fragment",
    [
        ({"json_schema": BOOKING, "regex": "a"}, 422, "at most one of json_schema and regex"),
        ({"json_schema": {"type": "strin"}}, 422, '"json_schema cannot be enforced: Invalid type: strin"'),
        ({"regex": "a(b"}, 422, "regex cannot be enforced: invalid regex"),
        ({"json_schema": "{}"}, 422, "json_schema"),
        ({"regex": "a", "ignore_eos": True}, 422, "ignore_eos cannot be combined with regex"),
    ],
)
async def test_generate_refuses_bad_constraints(api, extra, status, fragment):
    resp = await api.post("/generate", json={"prompt": "x", **extra})
    assert resp.status_code == status, resp.text
    assert fragment in resp.text


async def test_openai_response_format(api):
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "book"}], "max_tokens": 100}
    schema_format = {
        "type": "json_schema",
        "json_schema": {"name": "booking", "schema": BOOKING, "strict": True},
    }
    resp = await api.post(
        "/v1/chat/completions", json={**chat, "response_format": schema_format, "n": 3, "temperature": 1.0}
    )
    assert resp.status_code == 200, resp.text
    for choice in resp.json()["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), BOOKING)
    completion = {"model": "tiny", "prompt": "book", "max_tokens": 100, "response_format": schema_format}
    resp = await api.post("/v1/completions", json=completion)
    assert resp.status_code == 200, resp.text
    jsonschema.validate(json.loads(resp.json()["choices"][0]["text"]), BOOKING)
    # json_object: some JSON object (bounded here by max_tokens; a random model may not close it)
    resp = await api.post(
        "/v1/chat/completions", json={**chat, "max_tokens": 8, "response_format": {"type": "json_object"}}
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"].lstrip().startswith("{")
    resp = await api.post("/v1/chat/completions", json={**chat, "response_format": {"type": "json_schema"}})
    assert_openai_error(resp, 400, "response_format", "invalid_request", "json_schema is required")
    bad = {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "strin"}}}
    resp = await api.post("/v1/chat/completions", json={**chat, "response_format": bad})
    assert_openai_error(resp, 400, "response_format", "invalid_request", "cannot be enforced")


# ---- the real default model ----
@pytest.mark.slow
def test_booking_task_answers_valid_json_for_every_prompt_with_its_schema():
    """The shipped booking task with its schema: every held-out prompt, and prompts that are no booking
    request at all, answer JSON that validates; the held-out exact match stays what it is without it."""
    from pathlib import Path

    from server.config import Settings
    from server.engine.engine import Engine
    from server.engine.model import load_model
    from server.output import finish_texts
    from server.registry.format import load_prefix
    from server.training.data import answer, prompt_token_ids, read_jsonl
    from server.training.evaluate import evaluate

    booking = Path(__file__).resolve().parent.parent / "prefixes" / "examples" / "booking"
    loaded = load_model("default", dtype="float32", cache_dir=Settings().model_cache_dir)
    engine = Engine(loaded.model, loaded.tokenizer)
    prefix = load_prefix((booking / "prefix.safetensors").read_bytes(), engine.fingerprint)
    schema = json.loads((booking / "schema.json").read_text())
    constraint = json_schema_constraint(schema, "json_schema")
    examples = read_jsonl(booking / "eval.jsonl")
    free = evaluate(engine, examples, prefix, chat_template=False)
    held_out = evaluate(engine, examples, prefix, chat_template=False, constraint=constraint)
    for text in held_out.outputs:
        jsonschema.validate(json.loads(answer(text)), schema)
    assert held_out.score == free.score
    others = ["What is the capital of France?", "Request: I want to cancel.\nJSON:", "Write a haiku."]
    requests = [
        Request(
            prompt_token_ids(p, engine.tokenizer, False),
            SamplingParams(max_new_tokens=64, constraint=constraint),
            prefix=prefix,
        )
        for p in others
    ]
    for r in finish_texts(engine.generate(requests), engine.tokenizer):
        assert r.finish_reason is FinishReason.STOP
        jsonschema.validate(json.loads(r.text), schema)
