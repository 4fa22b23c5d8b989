"""Schemathesis against the app's own OpenAPI schema, in-process, on a tiny model: every operation, with
schema-valid and schema-invalid requests, in open mode and with API keys (tenant and admin).

Every response must be documented (status, content type, body schema) and never a 5xx. Schema-valid
requests must be accepted, except for the few rejections listed in `_ALLOWED_REJECTIONS`, each of which
the schema cannot express (server settings, tokenization, file contents).
"""

from __future__ import annotations

import json
import re

import pytest
import requests
import schemathesis
import torch
from conftest import byte_tokenizer, make_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import positive_data_acceptance

from server.api.app import Components, create_app
from server.config import Settings
from server.engine.engine import Engine
from server.registry.format import save_native, to_peft
from server.registry.registry import PrefixRegistry

MAX_EXAMPLES = 100  # per operation, mode and generation mode; the whole file runs in about 45 s on 2 cores
ADMIN, TENANT = "admin-key", "tenant-key"
MODES = {"open": None, "tenant": TENANT, "admin": ADMIN}
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
# OpenAI routes that read their body themselves: the schema must still describe it.
MODEL_BODIES = {("POST", "/v1/completions"), ("POST", "/v1/chat/completions")}
LIMITS = dict(max_new_tokens=64, max_prompt_tokens=64, max_virtual_tokens=16, max_upload_bytes=200_000)


def _operations() -> list[tuple[str, str]]:
    """(method, path) of every operation in the schema; building the app loads no model."""
    paths = create_app(Settings()).openapi()["paths"]
    return [(method.upper(), path) for path, ops in paths.items() for method in ops]


OPERATIONS = _operations()


@pytest.fixture(scope="module")
def engine():
    max_seq_len = LIMITS["max_virtual_tokens"] + LIMITS["max_prompt_tokens"] + LIMITS["max_new_tokens"]
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE  # /v1/chat/completions needs one
    return Engine(
        make_tiny_model("llama-gqa"),
        tokenizer,
        max_rows=4,
        max_seq_len=max_seq_len,
        max_virtual_tokens=LIMITS["max_virtual_tokens"],
    )


def _build_app(tmp_path, engine, mode: str):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"admin": [ADMIN], "tenants": {"acme": [TENANT]}}))
    settings = Settings(
        prefix_dir=tmp_path / "prefixes",
        api_keys_file=None if mode == "open" else keys,
        max_batch_size=4,
        max_batch_wait_ms=1.0,
        **LIMITS,
    )
    registry = PrefixRegistry.open(
        settings.prefix_dir,
        engine.fingerprint,
        cache_bytes=10**7,
        dtype=engine.dtype,
        device=engine.device,
        max_virtual_tokens=LIMITS["max_virtual_tokens"],
    )
    # Stored prefixes, so that the listing and the lookups have records to validate against the schema.
    for stored_id in ("shared", "acme~mine"):
        registry.add(stored_id, engine.encode_prefix([5, 6, 7]))
    return create_app(settings, Components(engine=engine, registry=registry, model_name="tiny"))


@pytest.fixture(scope="module", params=list(MODES))
def served(request, tmp_path_factory, engine):
    """(schema, headers) for one auth mode; schemathesis runs the app's lifespan on its own event loop."""
    mode = request.param
    app = _build_app(tmp_path_factory.mktemp(mode), engine, mode)
    key = MODES[mode]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    yield schema, headers
    asgi.shutdown_lifespans()  # drains this app's scheduler


# A schema-valid request the server may still refuse with 422, and why the schema cannot say so.
# (operation, error code, message pattern)
_ALLOWED_REJECTIONS = [
    # Server settings and the tokenizer: --max-new-tokens, --max-prompt-tokens (counted in tokens),
    # the model's context, --max-batch-tokens, --max-virtual-tokens. The schema is the same for every
    # server; the limits are not.
    ("POST /generate", "invalid_request", r"max_new_tokens must be <= \d+"),
    ("POST /generate", "invalid_request", r"prompt has \d+ tokens, the limit is \d+"),
    ("POST /generate", "invalid_request", r"prompt is empty: expected at least 1 token"),
    ("POST /generate", "invalid_request", r"prefix \(\d+\) \+ prompt \(\d+\) \+ max_new_tokens"),
    ("POST /generate", "invalid_request", r"request needs \d+ tokens"),
    ("POST /prefixes/from-text", "invalid_request", r"prefix text has \d+ tokens, the limit is \d+"),
    ("POST /prefixes/from-text", "invalid_request", r"prefix text is empty"),
    # Whether a file is a valid prefix for this model is a question of its bytes, not of the form.
    ("POST /prefixes", "invalid_prefix", r""),
    # A prompt frame's template holds {input} exactly once: a count no schema pattern here can state
    # (no lookahead); `input` needs a task whose stored frame has a template (tests/test_frame.py).
    ("*", "invalid_request", r"template must contain \{input\} exactly once"),
    ("POST /generate", "invalid_request", r"input needs a task with a template|has no template to fill"),
    # The task-id pattern admits an admin's "tenant~task"; other callers may not use '~' (auth.py).
    ("*", "invalid_request", r"task_id must be .*\(no '~'\)"),
    # "." and ".." in a body or a form match the pattern but are not folder names (in a path, the
    # pattern leaves them out: see test_path_task_ids_reach_the_route).
    ("*", "invalid_request", r"task_id must be .*and not '\.' or '\.\.'; got '(\w+~)?\.{1,2}'"),
    # Structured output: whether a JSON schema or a regex can be enforced (its keywords, its syntax, the
    # grammar library's limits) is the library's question, not one a schema of the body can state.
    (
        "*",
        "invalid_request",
        r"^(json_schema|regex|response_format)('s x-guidance must be| cannot be enforced)",
    ),
    ("*", "invalid_request", r"^ignore_eos cannot be combined with"),
]


def _rejection_is_allowed(case, response) -> bool:
    error = response.json()["error"]
    for label, code, pattern in _ALLOWED_REJECTIONS:
        if (
            label in ("*", case.operation.label)
            and error["code"] == code
            and re.search(pattern, error["message"])
        ):
            return True
    body = case.body if isinstance(case.body, dict) else {}
    # JSON Schema counts 64.0 as an integer; the request models are strict and refuse to coerce it
    # (README: "wrong types are refused, not coerced").
    if "should be a valid integer" in error["message"]:
        return any(isinstance(v, float) and v.is_integer() for v in body.values())
    # FastAPI writes the bound `seed < 2**63` as the float 9.223372036854776e+18 (exactly 2**63), and the
    # generator draws integers up to a float spacing (2048 there) past it.
    if error["message"].startswith("seed: Input should be less than 9223372036854775808"):
        return 2**63 <= body["seed"] <= 2**63 + 2048
    return False


def positive_data_accepted(ctx, response, case) -> None:
    """Schemathesis' positive_data_acceptance, with `_ALLOWED_REJECTIONS` taken out (and only those)."""
    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code != 422:
        return
    assert _rejection_is_allowed(case, response), (
        f"schema-valid request rejected: {case.operation.label} {case.body!r:.300} -> {response.text[:300]}"
    )


def _names_a_model(operation) -> bool:
    """An OpenAI route whose body selects the model (a task, or the base model) by name."""
    return any(
        "model" in (body.definition.get("schema") or {}).get("properties", {}) for body in operation.body
    )


def _whole(value):
    """Integral floats (JSON Schema's integers include 5.0) as ints: the request models refuse to
    coerce them (see `_rejection_is_allowed`), so such a body would end at its first 400."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_whole(v) for v in value]
    return {k: _whole(v) for k, v in value.items()} if isinstance(value, dict) else value


# Server settings the schema cannot express (see `_ALLOWED_REJECTIONS`): counts past them are a 400.
_SETTING_LIMITS = {"max_tokens": 64, "max_completion_tokens": 64, "n": 4}


def _servable(prompt):
    """A drawn prompt made one the tiny server takes: short texts (its tokenizer takes a token per byte, up
    to 4 per character; the limit is 64 tokens, and the chat template adds some), token ids within its
    vocabulary, at most 2 prompts, messages or content parts. The schema cannot say these (settings and
    the tokenizer); without them most drawn prompts are a 400 (empty, too long, ids out of range), and a
    run could draw no answerable one."""
    if isinstance(prompt, str):
        return prompt[:6] or "hi"
    if isinstance(prompt, int) and not isinstance(prompt, bool):
        return prompt % 256
    if isinstance(prompt, list):
        return [_servable(p) for p in prompt[: 16 if all(isinstance(p, int) for p in prompt) else 2]] or [104]
    if isinstance(prompt, dict):  # a chat message or a content part: its text
        return {k: _servable(v) if k in ("content", "text") else v for k, v in prompt.items()}
    return prompt


def _with_served_model(case):
    """The case naming the served model, with whole numbers as ints, counts and prompts within the server's
    settings, and without the fields the schema leaves open (additional properties, refused by name:
    400 unknown_parameter)."""
    if isinstance(case.body, dict):
        known = {name for body in case.operation.body for name in body.definition["schema"]["properties"]}
        body = {k: _whole(v) for k, v in case.body.items() if k in known}
        for name, limit in _SETTING_LIMITS.items():
            if type(body.get(name)) is int:
                body[name] = min(body[name], limit)
        for name in ("prompt", "messages"):
            if name in body:
                body[name] = _servable(body[name])
        case.body = {**body, "model": "tiny"}
    return case


def _strategy(operation):
    positive = operation.as_strategy(GenerationMode.POSITIVE)
    if _names_a_model(operation):
        # A random `model` names no model, so every body would end at 404: half of the schema-valid
        # ones name the served model, and reach the tokenizer, the chat template and the scheduler.
        positive = st.one_of(positive, positive.map(_with_served_model))
    has_inputs = any(
        len(c) for c in (operation.path_parameters, operation.query, operation.headers, operation.body)
    )
    return st.one_of(positive, operation.as_strategy(GenerationMode.NEGATIVE)) if has_inputs else positive


def _check(case, headers):
    return case.call_and_validate(
        headers=dict(headers),  # call_and_validate adds to the dict it is given
        excluded_checks=[positive_data_acceptance],
        additional_checks=[positive_data_accepted],
    )


@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_operation_conforms_to_schema(served, method, path):
    schema, headers = served
    operation = schema[path][method]

    replies = []  # (body, status)

    @given(case=_strategy(operation))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case):
        replies.append((case.body, _check(case, headers).status_code))

    run()
    if (method, path) in MODEL_BODIES:  # real bodies went in (the schema describes them), and were answered
        assert _names_a_model(operation), "the schema describes no body with a model"
        assert sum(isinstance(body, dict) and "model" in body for body, _ in replies) >= MAX_EXAMPLES // 4
        assert any(status == 200 for _, status in replies), sorted(status for _, status in replies)


def test_path_task_ids_reach_the_route():
    """Every task id the schema allows in a path arrives as sent. HTTP clients drop "." and ".." segments
    from a URL (RFC 3986), so a drawn task id "." went out as DELETE /prefixes/, was redirected to
    /prefixes and answered 405 (GET: the listing), an undocumented reply; it failed a run only when
    the generator happened to draw exactly "." for DELETE or GET /prefixes/{task_id}."""
    paths = create_app(Settings()).openapi()["paths"]
    for method, operation in paths["/prefixes/{task_id}"].items():
        pattern = next(p for p in operation["parameters"] if p["name"] == "task_id")["schema"]["pattern"]
        for task_id in (".", "..", "acme~.", "acme~.."):
            assert not re.search(pattern, task_id), (method, task_id)
        for task_id in ("...", ".a", "a.", "..a", "acme~x.y", "-", "a" * 64, "acme~" + "." * 64):
            assert re.search(pattern, task_id), (method, task_id)
            sent = requests.Request(method.upper(), f"http://t/prefixes/{task_id}").prepare().path_url
            assert sent == f"/prefixes/{task_id}"


def test_every_ref_in_the_schema_resolves():
    """A dangling $ref (e.g. to a model no route returns) breaks every client generated from the schema."""
    schema = create_app(Settings()).openapi()
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(schema)))
    assert refs <= set(schema["components"]["schemas"]), refs - set(schema["components"]["schemas"])


def _native(engine, seed: int, num_virtual_tokens: int = 4) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    return save_native(
        engine.encode_prefix(torch.randint(2, 200, (num_virtual_tokens,), generator=gen).tolist())
    )


def test_documented_success_responses(served, engine):
    """Hand-made valid requests reach every 2xx reply (random ones rarely name a stored task), and each
    reply, a streamed one included, matches the schema."""
    schema, headers = served

    def call(method, path, **kwargs):
        response = schema[path][method].Case(**kwargs).call_and_validate(headers=dict(headers))
        assert response.status_code < 300, response.text
        return response

    peft_file, peft_config = to_peft(engine.encode_prefix([9, 8, 7, 6, 5]))
    call("GET", "/health")
    call("GET", "/ready")
    call(
        "POST",
        "/prefixes",
        body={"task_id": "up", "file": _native(engine, 1)},
        media_type="multipart/form-data",
    )
    call(
        "POST",
        "/prefixes",
        body={"task_id": "up", "file": peft_file, "config": json.dumps(peft_config)},  # a text part
        media_type="multipart/form-data",
    )
    call("POST", "/prefixes/from-text", body={"task_id": "txt", "text": "Be brief."})
    assert call("GET", "/prefixes/{task_id}", path_parameters={"task_id": "up"}).json()["version"] == 2
    assert {p["task_id"] for p in call("GET", "/prefixes").json()["prefixes"]} >= {"up", "txt"}
    body = {"task_id": "up", "prompt": "hello", "max_new_tokens": 5, "ignore_eos": True}
    plain = call("POST", "/generate", body=body).json()
    assert plain["prefix_version"] == 2 and len(plain["token_ids"]) == 5
    streamed = call("POST", "/generate", body={**body, "stream": True})
    assert streamed.headers["content-type"][0].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert [e["token_id"] for e in events if e["type"] == "token"] == plain["token_ids"]
    base = call(
        "POST", "/generate", body={"prompt": "hi", "max_new_tokens": 3, "temperature": 0.7, "seed": 1}
    )
    assert base.json()["prefix_version"] is None
    # Sampling values below float32's range sample like greedy (they once made NaN probabilities: a 500
    # for every request in the batch).
    tiny = {"prompt": "hi", "max_new_tokens": 4, "ignore_eos": True}
    greedy = call("POST", "/generate", body=tiny).json()["token_ids"]
    for extreme in ({"temperature": 1e-300}, {"temperature": 1.0, "top_p": 5e-324}):
        assert call("POST", "/generate", body={**tiny, **extreme}).json()["token_ids"] == greedy
    call("DELETE", "/prefixes/{task_id}", path_parameters={"task_id": "up"})
    # fine-tuning files: each reply (the File object, the list, the bytes, the deletion) as documented
    lines = b'{"prompt": "a", "completion": "b"}\n'
    upload = {"file": lines, "purpose": "fine-tune"}
    file_id = call("POST", "/v1/files", body=upload, media_type="multipart/form-data").json()["id"]
    file_path = {"file_id": file_id}
    assert call("GET", "/v1/files/{file_id}", path_parameters=file_path).json()["bytes"] == len(lines)
    assert file_id in [f["id"] for f in call("GET", "/v1/files", query={"order": "asc"}).json()["data"]]
    assert call("GET", "/v1/files/{file_id}/content", path_parameters=file_path).content == lines
    assert call("DELETE", "/v1/files/{file_id}", path_parameters=file_path).json()["deleted"] is True
    if headers.get("Authorization") != f"Bearer {TENANT}":  # metrics need an admin key when keys are set
        call("GET", "/metrics")


def test_malformed_json_is_a_documented_400(served):
    """FastAPI's own 400 for a body that is not JSON is undocumented; ours is in the schema, as JSON."""
    schema, headers = served
    json_operations = [
        schema[path][method]
        for method, path in OPERATIONS
        if any(body.media_type == "application/json" for body in schema[path][method].body)
    ]
    assert len(json_operations) >= 2
    for operation in json_operations:
        case = operation.Case(body={}, media_type="application/json")
        response = case.call(headers={**headers, "Content-Type": "application/json"}, data=b'{"prompt": ')
        assert response.status_code == 400, (operation.label, response.text)
        case.validate_response(response, headers=dict(headers))
