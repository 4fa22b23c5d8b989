"""Request bodies and the error body of the OpenAI-compatible routes (`openai.py`), as OpenAI has them.

Fields these routes act on are declared; any other field lands in `model_extra` and is sorted by
`refused_extras`: harmless ones (`user`, a penalty of 0, ...) are ignored, features the server lacks
(`tools`, `echo`, ...) are refused as unsupported, and names OpenAI does not define as unknown.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from server.api.logprobs import RAW_DISTRIBUTION, NumTopLogprobs
from server.api.schemas import StopString, TextCheck, check_text
from server.engine.grammar import json_schema_constraint
from server.errors import shown
from server.request import MAX_TOP_K, Constraint

# Fields that change nothing at these values (compared by type and value: `0` is not `False`).
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "user": (),  # any value: a client-side label
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (),  # any value: without tools it has nothing to act on
}
COMPLETION_FIELDS = {
    *("user", "best_of", "echo", "suffix", "logit_bias", "presence_penalty", "frequency_penalty")
}
CHAT_FIELDS = set(NEUTRAL_VALUES) - {"best_of", "echo", "suffix"}


def refused_extras(extra: dict[str, Any], known: set[str]) -> tuple[str, str, str] | None:
    """The first extra field to refuse, as (param, code, message); None if every one is harmless."""
    for name, value in extra.items():
        if name not in known:  # the name is the client's: shown capped, as any value is
            name = shown(name, quoted=False)
            return name, "unknown_parameter", f"unrecognized request argument: {name}"
        neutral = NEUTRAL_VALUES[name]
        if neutral and not any(type(value) is type(v) and value == v for v in neutral):
            return name, "unsupported_parameter", f"{name}={shown(value)} is not supported by this server"
    return None


class _OpenAIBody(BaseModel):
    # strict: no coercion ("5" is not 5); extra: sorted by refused_extras, never silently dropped
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    include_usage: bool = False
    include_obfuscation: bool | None = None  # ignored: there is nothing to obfuscate


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema, as OpenAI has it. The schema is always enforced (`strict` or not)."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="1-64 of A-Za-z0-9_-")
    description: str | None = None
    schema_: dict[str, Any] = Field(
        default_factory=dict, alias="schema", description="the JSON schema; absent: any JSON value"
    )
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """Structured output: `text` (none), `json_object` (any JSON object) or `json_schema`."""

    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only with it")
        return self

    @property
    def constraint(self) -> Constraint | None:
        if self.type == "json_object":
            return json_schema_constraint({"type": "object"}, "response_format")
        if self.type == "json_schema":
            return json_schema_constraint(self.json_schema.schema_, "response_format")
        return None


class SamplingFields(_OpenAIBody):
    model: Annotated[str, TextCheck] = Field(
        min_length=1, description="a task id, or the base model's name for no prefix"
    )
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    seed: int | None = Field(None, ge=0, lt=2**63)  # choice i uses seed + i
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Extensions (as vLLM accepts them): the same knobs /generate has.
    top_k: int = Field(0, ge=0, le=MAX_TOP_K, description="0 = off; above the vocabulary = every token")
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None

    @property
    def constraint(self) -> Constraint | None:
        return None if self.response_format is None else self.response_format.constraint

    @field_validator("stop", mode="plain", json_schema_input_type=StopString | list[StopString] | None)
    @classmethod
    def _stop(cls, value: object) -> str | list[str] | None:
        check_text(value)
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return value
        raise ValueError(f"expected a string or a list of strings, got {shown(value)}")

    @property
    def num_top_logprobs(self) -> int | None:
        """SamplingParams.logprobs: None for none, else how many alternatives per token."""
        return None


_TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
# The prompt as the schema describes it (the validator below checks the same, with clearer messages).
_PROMPT_SCHEMA = (
    str
    | Annotated[list[str], Field(min_length=1)]
    | _TokenIds
    | Annotated[list[_TokenIds], Field(min_length=1)]
)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, a list of token ids, or a list of such lists"
    )

    @field_validator("prompt", mode="plain", json_schema_input_type=_PROMPT_SCHEMA)
    @classmethod
    def _prompt(cls, value: object) -> str | list[str] | list[int] | list[list[int]]:
        check_text(value)
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value:
            if all(isinstance(p, str) for p in value) or all(type(t) is int for t in value):
                return value
            if all(isinstance(p, list) and all(type(t) is int for t in p) for p in value):
                return value
        raise ValueError(
            "expected a string, a non-empty list of strings, a list of token ids, or a list of "
            f"token id lists; got {shown(value)}"
        )

    logprobs: NumTopLogprobs = Field(
        None,
        description="null: none; 0-20: choices[].logprobs lists each token's logprob and the most likely "
        f"tokens at its step (that many, and the chosen one); {RAW_DISTRIBUTION}",
    )

    @property
    def num_top_logprobs(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    """One part of a message's content; the only kind these routes take."""

    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    role: Annotated[Literal["system", "developer", "user", "assistant"], TextCheck]
    content: str = Field(description="a string, or a list of text parts {type: text, text}")
    name: Annotated[str | None, TextCheck] = None

    @field_validator("content", mode="plain", json_schema_input_type=str | list[TextPart])
    @classmethod
    def _content(cls, value: object) -> str:
        """Text parts are joined with newlines, as vLLM does; other part types are refused."""
        if isinstance(value, str):
            return check_text(value)
        if not isinstance(value, list):
            raise ValueError(f"expected a string or a list of text parts, got {shown(value)}")
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"only text content parts are supported, got {shown(kind)}")
            if set(part) != {"type", "text"} or not isinstance(part["text"], str):
                raise ValueError(f"a text part is {{type: 'text', text: <string>}}, got {shown(part)}")
            texts.append(part["text"])
        return check_text("\n".join(texts))


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    logprobs: bool | None = Field(
        None, description=f"true: choices[].logprobs.content lists each token's logprob; {RAW_DISTRIBUTION}"
    )
    top_logprobs: NumTopLogprobs = Field(
        None, description="0-20: how many of the most likely tokens at each step to list (needs logprobs)"
    )

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @property
    def num_top_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def body_schema(model: type[BaseModel]) -> dict:
    """`model`'s JSON schema with its $defs written in place: the OpenAPI requestBody of a route that
    reads its body itself (FastAPI then puts no model of it in the schema's components)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:  # "#/$defs/Name"; these models do not refer to themselves
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {key: inline(value) for key, value in node.items()}
        return [inline(value) for value in node] if isinstance(node, list) else node

    return inline(schema)


class ErrorInfo(BaseModel):
    message: str
    type: str = Field(
        description="invalid_request_error, authentication_error, rate_limit_error, server_error"
    )
    param: str | None = Field(description="the request field at fault, if one is")
    code: str | None = Field(description="e.g. model_not_found, unknown_parameter, unsupported_parameter")


class ErrorBody(BaseModel):
    """OpenAI's error shape."""

    error: ErrorInfo
