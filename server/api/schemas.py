"""Pydantic models of the native routes (/generate, /prefixes, /health, /ready); the OpenAI routes' are in
openai_schemas.py. Pydantic is used only in these two files, at the HTTP edge: the layers below take plain
dataclasses (SamplingParams, Request, Settings)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from server.api.logprobs import RAW_DISTRIBUTION, NumTopLogprobs
from server.engine.grammar import json_schema_constraint
from server.registry import frame
from server.request import MAX_TOP_K, Constraint

# A task id; an admin may also name a tenant's task as "tenant~task" (see api/auth.py).
TASK_ID_PATTERN = r"^(?:[A-Za-z0-9_-]{1,32}~)?[A-Za-z0-9._-]{1,64}$"
# The same in a URL path, less "." and "..": no folder names (the store refuses them), and no path
# segments either, as HTTP clients drop them from a URL before sending it (RFC 3986 dot segments):
# DELETE /prefixes/. arrives as DELETE /prefixes/. Written as alternatives: the Rust regex engine that
# checks patterns has no lookahead.
_TASK_NAME_NO_DOTS = (
    r"(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|\.\.[A-Za-z0-9._-]{1,62})"
)
TASK_ID_PATH_PATTERN = rf"^(?:[A-Za-z0-9_-]{{1,32}}~)?{_TASK_NAME_NO_DOTS}$"
StopString = Annotated[str, Field(min_length=1)]  # an empty one would match everywhere
FrameStop = Annotated[str, Field(min_length=1, max_length=frame.MAX_STOP_CHARS)]


def check_text(value: object) -> object:
    """Every text field a client sends passes here (a string, or a list of strings): a lone UTF-16
    surrogate (a JSON escape like "\\ud800" that pairs with nothing) is refused, as no tokenizer can
    encode it. Other values pass on unchanged, to the field's own type check."""
    for index, item in enumerate(value if isinstance(value, list) else [value]):
        if not isinstance(item, str):
            continue
        try:
            item.encode("utf-8")
        except UnicodeEncodeError as e:
            where = f" of item {index}" if isinstance(value, list) else ""
            raise PydanticCustomError(
                "lone_surrogate",
                "expected Unicode text, got a lone UTF-16 surrogate {char} at character {at}{where}: "
                "a \\u escape must pair a high surrogate with a low one",
                {"char": f"\\u{ord(item[e.start]):04x}", "at": e.start, "where": where},
            ) from None
    return value


TextCheck = BeforeValidator(check_text)
TaskId = Field(pattern=TASK_ID_PATTERN, min_length=1, max_length=97, description="1-64 of A-Za-z0-9._-")


class ErrorDetail(BaseModel):
    code: str
    message: str


class _Strict(BaseModel):
    # Unknown fields are an error (a typo must not silently fall back to a default), and no lax coercion.
    model_config = ConfigDict(extra="forbid", strict=True)


class GenerateRequest(_Strict):
    task_id: str | None = Field(None, pattern=TASK_ID_PATTERN, description="null or absent: the base model")
    # Exactly one of prompt and input (the oneOf below); absent is None, null is refused.
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [{"required": ["prompt"]}, {"required": ["input"]}],
            "not": {"required": ["json_schema", "regex"]},
        }
    )
    prompt: Annotated[str, TextCheck] = Field(
        None, description="tokenized as tokenizer(prompt) would by default; give this or `input`"
    )
    input: Annotated[str, TextCheck] = Field(
        None, description="filled into the task's template (its {input}); give this or `prompt`"
    )
    max_new_tokens: int | None = Field(None, ge=1, description="default: the task's, else 64")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=MAX_TOP_K, description="0 = off; above the vocabulary = every token")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Annotated[list[StopString] | StopString | None, TextCheck] = Field(
        None, description="stop strings; the text ends before the first match; default: the task's"
    )
    ignore_eos: bool = False
    stream: bool = Field(False, description="answer text/event-stream: a token event per token, then done")
    logprobs: NumTopLogprobs = Field(
        None,
        description="null: none; 0-20: each generated token's logprob and that many of the most likely "
        f"tokens at its step (0: the chosen token's only); {RAW_DISTRIBUTION}",
    )
    json_schema: dict[str, Any] | None = Field(
        None,
        description="structured output: the text is JSON valid against this JSON schema (written as "
        "json.dumps writes it; the schema's `x-guidance` key may change that); not with `regex`",
    )
    regex: Annotated[str, TextCheck] | None = Field(
        None, min_length=1, description="structured output: the whole text matches this regular expression"
    )

    @model_validator(mode="after")
    def _prompt_or_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.input is None):
            raise ValueError(
                "give exactly one of prompt (the text as the model sees it) and input (filled into the "
                "task's template)"
            )
        if self.json_schema is not None and self.regex is not None:
            raise ValueError("give at most one of json_schema and regex")
        return self

    @property
    def constraint(self) -> Constraint | None:
        if self.json_schema is not None:
            return json_schema_constraint(self.json_schema, "json_schema")
        return None if self.regex is None else Constraint("regex", self.regex, "regex")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class TopLogprob(BaseModel):
    token_id: int
    text: str = Field(description="the token alone, decoded ('\ufffd' for part of a character)")
    logprob: float = Field(description="natural log; -9999.0 stands for -inf")


class TokenLogprobInfo(TopLogprob):
    """A generated token's logprob, and the most likely tokens at its step, most likely first."""

    top: list[TopLogprob] = Field(description="as many as the request's logprobs asked for")


class GenerateResponse(BaseModel):
    request_id: str
    task_id: str | None
    prefix_version: int | None
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length", "abort", "error"]
    usage: Usage
    logprobs: list[TokenLogprobInfo] | None = Field(
        None, description="with the request's logprobs: one per generated token (token_ids), else null"
    )


class StreamEvent(BaseModel):
    """One server-sent event of a streamed /generate (`data: <this as JSON>`)."""

    type: Literal["token", "done", "error"]
    token_id: int | None = Field(None, description="token events")
    text: str | None = Field(None, description="token events: the text delta; done: the whole text")
    finish_reason: str | None = None
    usage: Usage | None = None
    error: ErrorDetail | None = None
    logprobs: list[TokenLogprobInfo] | None = Field(
        None, description="token events of a request with logprobs: the event's token; done: every token"
    )


class FrameFields(_Strict):
    """A task's prompt frame as an upload sets it (see server/registry/frame.py); each field optional."""

    template: Annotated[str | None, TextCheck] = Field(
        None,
        max_length=frame.MAX_TEMPLATE_CHARS,
        description="the prompt with {input} exactly once where the client's input goes",
    )
    description: Annotated[str | None, TextCheck] = Field(
        None, max_length=frame.MAX_DESCRIPTION_CHARS, description="what the task does"
    )
    max_new_tokens: int | None = Field(
        None, ge=1, le=frame.MAX_DEFAULT_NEW_TOKENS, description="default of requests that do not say"
    )
    stop: Annotated[list[FrameStop] | None, TextCheck] = Field(
        None,
        max_length=frame.MAX_STOP_STRINGS,
        description="default stop strings of requests that do not say",
    )


class FromTextRequest(FrameFields):
    task_id: str = TaskId
    text: Annotated[str, TextCheck] = Field(min_length=1)


class TaskScoresInfo(BaseModel):
    eval_before: float = Field(description="held-out exact match of the base model, in [0, 1]")
    eval_after: float = Field(description="held-out exact match with the prefix, in [0, 1]")
    num_eval: int | None = Field(None, description="held-out examples")


class FrameInfo(BaseModel):
    """How a task wants its prompts: `input` fills `template`; the defaults apply when a request is silent."""

    template: str | None
    description: str | None
    max_new_tokens: int | None
    stop: list[str] | None
    scores: TaskScoresInfo | None


class PrefixInfo(BaseModel):
    task_id: str
    version: int
    num_virtual_tokens: int
    bytes: int
    sha256: str
    created_at: float
    source: str
    frame: FrameInfo | None = Field(None, description="the task's prompt frame; null if it has none")


class PrefixStatus(PrefixInfo):
    resident: bool = Field(
        description="whether this version's K/V are in the engine's page pool now (a request for it starts "
        "without loading or writing its prefix); for routers that prefer a replica holding the task"
    )


class PrefixList(BaseModel):
    prefixes: list[PrefixInfo]


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    model: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
