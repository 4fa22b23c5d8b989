"""A task's prompt frame: how a client's input becomes the prompt its prefix was trained on, and the
defaults of its answers. No torch, no HTTP.

Stored as string metadata of the native prefix file (safetensors metadata maps str to str):
"template" (text with "{input}" exactly once), "description", "max_new_tokens" (a decimal integer),
"stop" (a JSON list of strings), and the held-out scores `prefix-server train` writes: "eval_before",
"eval_after" (exact-match fractions in [0, 1]) and "num_eval". Every key is optional; a file with none
of them has no frame and is served exactly as before frames existed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace

from server.errors import InvalidRequest, PrefixFormatError, shown

INPUT_SLOT = "{input}"
MAX_TEMPLATE_CHARS = 4096
MAX_DESCRIPTION_CHARS = 1024
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256
MAX_DEFAULT_NEW_TOKENS = 1 << 16
FRAME_KEYS = ("template", "description", "max_new_tokens", "stop")
SCORE_KEYS = ("eval_before", "eval_after", "num_eval")


def _check_unicode(name: str, text: str) -> None:
    """Refuse a lone UTF-16 surrogate (a JSON "\\ud800" that pairs with nothing): no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(
            f"{name} has a lone UTF-16 surrogate \\u{ord(text[e.start]):04x} at character {e.start}; "
            "expected Unicode text"
        ) from None


@dataclass(frozen=True)
class TaskScores:
    """Held-out exact match of the base model and of the prefix, from `prefix-server train`."""

    eval_before: float
    eval_after: float
    num_eval: int | None = None  # how many held-out examples

    def __post_init__(self) -> None:
        for name in ("eval_before", "eval_after"):
            value = getattr(self, name)
            if not (isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0):
                raise InvalidRequest(f"{name} must be a number in [0, 1], got {shown(value)}")
        if self.num_eval is not None and not (isinstance(self.num_eval, int) and self.num_eval >= 1):
            raise InvalidRequest(f"num_eval must be an integer >= 1, got {shown(self.num_eval)}")


@dataclass(frozen=True)
class TaskFrame:
    """A task's prompt template and answer defaults; each field None when the task does not set it.

    Validated on construction: InvalidRequest names the field, what it must be and what arrived.
    """

    template: str | None = None  # contains INPUT_SLOT exactly once; every other brace is literal text
    description: str | None = None
    max_new_tokens: int | None = None  # default of requests that do not say
    stop: tuple[str, ...] | None = None  # default stop strings of requests that do not say
    scores: TaskScores | None = None

    def __post_init__(self) -> None:
        if self.template is not None:
            _check_text("template", self.template, MAX_TEMPLATE_CHARS)
            if self.template.count(INPUT_SLOT) != 1:
                raise InvalidRequest(
                    f"template must contain {INPUT_SLOT} exactly once (where the input goes), "
                    f"it has it {self.template.count(INPUT_SLOT)} times: {shown(self.template)}"
                )
        if self.description is not None:
            _check_text("description", self.description, MAX_DESCRIPTION_CHARS)
        n = self.max_new_tokens
        if n is not None and not (type(n) is int and 1 <= n <= MAX_DEFAULT_NEW_TOKENS):
            raise InvalidRequest(
                f"max_new_tokens must be an integer in [1, {MAX_DEFAULT_NEW_TOKENS}], got {shown(n)}"
            )
        if self.stop is not None:
            if not isinstance(self.stop, tuple) or len(self.stop) > MAX_STOP_STRINGS:
                raise InvalidRequest(
                    f"stop must be at most {MAX_STOP_STRINGS} strings, got {shown(self.stop)}"
                )
            for i, s in enumerate(self.stop):
                if not isinstance(s, str) or not s:
                    raise InvalidRequest(f"stop[{i}] must be a non-empty string, got {shown(s)}")
                _check_text(f"stop[{i}]", s, MAX_STOP_CHARS)

    @property
    def empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    def fill(self, text: str) -> str:
        """The template with `text` in place of {input} (plain replacement: no format(), no escapes)."""
        if self.template is None:
            raise InvalidRequest("this task has no template to fill")
        head, _, tail = self.template.partition(INPUT_SLOT)
        return head + text + tail

    def merged(self, overrides: TaskFrame | None) -> TaskFrame:
        """This frame with every field `overrides` sets replaced."""
        if overrides is None:
            return self
        return replace(
            self, **{f.name: v for f in fields(overrides) if (v := getattr(overrides, f.name)) is not None}
        )

    def to_dict(self) -> dict:
        """JSON-ready: {template, description, max_new_tokens, stop: list | null, scores: {...} | null}."""
        scores = self.scores
        return {
            "template": self.template,
            "description": self.description,
            "max_new_tokens": self.max_new_tokens,
            "stop": None if self.stop is None else list(self.stop),
            "scores": None if scores is None else {f.name: getattr(scores, f.name) for f in fields(scores)},
        }

    def to_metadata(self) -> dict[str, str]:
        """The frame as safetensors metadata (str -> str); keys it does not set are absent."""
        md = {}
        if self.template is not None:
            md["template"] = self.template
        if self.description is not None:
            md["description"] = self.description
        if self.max_new_tokens is not None:
            md["max_new_tokens"] = str(self.max_new_tokens)
        if self.stop is not None:
            md["stop"] = json.dumps(list(self.stop), ensure_ascii=False)
        if self.scores is not None:
            md["eval_before"], md["eval_after"] = str(self.scores.eval_before), str(self.scores.eval_after)
            if self.scores.num_eval is not None:
                md["num_eval"] = str(self.scores.num_eval)
        return md

    @classmethod
    def from_metadata(cls, md: dict[str, str]) -> TaskFrame | None:
        """Read `to_metadata` output (None if it sets nothing); PrefixFormatError naming the bad key."""
        try:
            return _from_metadata(cls, md)
        except InvalidRequest as e:
            raise PrefixFormatError(f"prefix metadata: {e}") from e


def _check_text(name: str, text: object, limit: int) -> None:
    if not isinstance(text, str):
        raise InvalidRequest(f"{name} must be a string, got {shown(text)}")
    if len(text) > limit:
        raise InvalidRequest(f"{name} has {len(text)} characters, the limit is {limit}")
    _check_unicode(name, text)


def _number(md: dict[str, str], key: str, kind: type) -> int | float | None:
    """md[key] as a number of `kind`, None if absent; InvalidRequest if it is not one."""
    text = md.get(key)
    if text is None:
        return None
    try:
        if kind is int and not (text.isdecimal() and len(text) <= 18):  # int() takes "+1", " 1", "1_0"
            raise ValueError
        return kind(text)
    except ValueError:
        raise InvalidRequest(
            f"{key} must be {'an integer' if kind is int else 'a number'}, got {shown(text)}"
        ) from None


def _from_metadata(cls: type[TaskFrame], md: dict[str, str]) -> TaskFrame | None:
    stop = md.get("stop")
    if stop is not None:
        try:
            stop = json.loads(stop)
        except (ValueError, RecursionError):
            raise InvalidRequest(f"stop must be a JSON list of strings, got {shown(stop)}") from None
        if not isinstance(stop, list):
            raise InvalidRequest(f"stop must be a JSON list of strings, got {shown(stop)}")
        stop = tuple(stop)
    scores = None
    before, after = _number(md, "eval_before", float), _number(md, "eval_after", float)
    if before is not None and after is not None:  # both, or no scores
        scores = TaskScores(before, after, _number(md, "num_eval", int))
    frame = cls(
        template=md.get("template"),
        description=md.get("description"),
        max_new_tokens=_number(md, "max_new_tokens", int),
        stop=stop,
        scores=scores,
    )
    return None if frame.empty else frame
