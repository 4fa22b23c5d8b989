"""The one request object that travels route -> scheduler -> engine -> response: what the client asked
(RequestInput, immutable) inside the running request (Request)."""

from __future__ import annotations

import enum
import itertools
import math
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.errors import InvalidRequest, shown

if TYPE_CHECKING:
    import asyncio

    from server.registry.format import PrefixKV
    from server.registry.store import PrefixRecord
    from server.scheduler import Event

_ids = itertools.count()
MAX_TOP_LOGPROBS = 20  # most alternatives a request may ask for per token (as OpenAI and vLLM allow)
MAX_TOP_K = 2**31 - 1  # a top_k the sampler's int64 tensors hold (any above the vocabulary keeps every token)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_new_tokens reached
    ABORT = "abort"  # client went away / server shutting down
    ERROR = "error"


@dataclass(frozen=True)
class Constraint:
    """Structured output: the row's text must match a JSON schema (`source`: the schema as JSON text) or a
    regular expression (`source`: the pattern); engine/grammar.py enforces it token by token."""

    kind: str  # "json_schema" | "regex"
    source: str
    param: str = field(default="json_schema", compare=False)  # the request field it came from, for errors

    def __post_init__(self) -> None:
        if self.kind not in ("json_schema", "regex"):
            raise InvalidRequest(f"constraint kind must be json_schema or regex, got {self.kind!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # None: no logprobs; k >= 0: each generated token's logprob and its top k alternatives (0 = none).
    logprobs: int | None = None
    constraint: Constraint | None = None  # structured output: a JSON schema or a regex the text must match

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidRequest(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k <= MAX_TOP_K:
            raise InvalidRequest(
                f"top_k must be an integer in [0, {MAX_TOP_K}] (0 = off; above the vocabulary = all), "
                f"got {shown(self.top_k)}"
            )
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise InvalidRequest(f"seed must be in [0, 2**63), got {self.seed!r}")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must be non-empty")
        if self.logprobs is not None and (
            type(self.logprobs) is not int or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS
        ):
            raise InvalidRequest(f"logprobs must be null or 0-{MAX_TOP_LOGPROBS}, got {self.logprobs!r}")
        if self.constraint is not None and self.ignore_eos:
            raise InvalidRequest(
                f"ignore_eos cannot be combined with {self.constraint.param}: a constrained text ends "
                "where its grammar is complete",
                param="ignore_eos",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model's raw next-token distribution (log_softmax
    of the logits in float32 over the whole vocabulary, before temperature, top-k and top-p), and the
    most likely tokens of that distribution, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), as many as the request asked for


@dataclass(frozen=True)
class RequestInput:
    """What the client asked, fixed once the HTTP layer has built it; every layer reads it, none writes."""

    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    task_id: str | None  # the registry's (tenant-namespaced) id; None: the base model
    tenant: str | None
    stream: bool  # send a token event per step, not just the final reply
    request_id: str


class Request:
    """A request as it travels route -> scheduler -> engine -> output: its `input` (what the client
    asked) and the state each layer writes. The prefix (if any) is pinned by whoever set it (the
    scheduler, from the registry; or an engine-direct caller) and released when it finishes."""

    def __init__(
        self,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams | None = None,
        task_id: str | None = None,
        *,
        tenant: str | None = None,
        stream: bool = False,
        request_id: str | None = None,
        prefix: PrefixKV | None = None,
        prefix_key: Hashable | None = None,
    ) -> None:
        self.input = RequestInput(
            tuple(prompt_token_ids),
            sampling or SamplingParams(),
            task_id,
            tenant,
            stream,
            request_id or f"req-{next(_ids)}",
        )
        # The prefix, set when the scheduler pins the task's latest version (registry.acquire).
        self.prefix = prefix
        self.prefix_version: int | None = None
        self.prefix_record: PrefixRecord | None = None  # what the scheduler releases when it finishes
        # Names the prefix's content for the engine's page pool (rows with equal keys share its pages):
        # (task_id, version, sha256) from the registry; None = the PrefixKV object itself.
        self.prefix_key = prefix_key
        # The scheduler's: admission and the waiter's queue.
        self.status = RequestStatus.WAITING
        self.budget_tokens = 0  # prefix + prompt + max_new_tokens: its share of --max-batch-tokens
        self.sink: asyncio.Queue[Event] | None = None  # the events its waiter reads
        # The engine's: one token (and its logprob, if asked) per step.
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[TokenLogprob] = []
        self.finish_reason: FinishReason | None = None
        self.error: Exception | None = None
        # The output processor's: the text so far, and how much of it a stream has sent.
        self.text = ""
        self.num_streamed_tokens = 0
        self.num_streamed_chars = 0
        # time.monotonic() stamps, for latency metrics
        self.arrival_time = 0.0
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    def __repr__(self) -> str:
        return f"Request({self.request_id}, task={self.task_id!r}, {self.status.value})"

    # What the client asked, read through the request as every layer does.
    @property
    def prompt_token_ids(self) -> tuple[int, ...]:
        return self.input.prompt_token_ids

    @property
    def sampling(self) -> SamplingParams:
        return self.input.sampling

    @property
    def task_id(self) -> str | None:
        return self.input.task_id

    @property
    def tenant(self) -> str | None:
        return self.input.tenant

    @property
    def stream(self) -> bool:
        return self.input.stream

    @property
    def request_id(self) -> str:
        return self.input.request_id

    @property
    def fairness_key(self) -> str:
        """Admission round-robins across these: tenants when there are tenants, else tasks."""
        return self.tenant or self.task_id or ""

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix is None else self.prefix.num_virtual_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def finish(self, reason: FinishReason) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.finish_time = time.monotonic()

    def take_delta(self) -> tuple[list[int], str]:
        """New token ids and text since the last call, for streaming.

        While running, text that may still change is held back: a trailing partial UTF-8 character
        ("\ufffd") and a tail that could be the start of a stop string.
        """
        tokens = self.output_token_ids[self.num_streamed_tokens :]
        self.num_streamed_tokens = len(self.output_token_ids)
        safe = len(self.text)
        if not self.finished:
            safe = len(self.text.rstrip("\ufffd"))
            hold = max((len(s) - 1 for s in self.sampling.stop), default=0)
            safe = max(self.num_streamed_chars, safe - hold)
        delta = self.text[self.num_streamed_chars : safe]
        self.num_streamed_chars = max(self.num_streamed_chars, safe)
        return tokens, delta
