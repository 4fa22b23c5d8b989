"""The OpenAI objects a set of choices makes: one reply, or its server-sent chunks; and model cards."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator

from server.api.auth import Caller
from server.api.logprobs import chat_logprobs, completion_logprobs
from server.api.openai_errors import as_openai
from server.api.service import GenerationService, sse
from server.registry.store import PrefixRecord
from server.request import FinishReason
from server.request import Request as GenRequest


# ---- reply side ----
class Reply:
    """The OpenAI objects for a set of choices: one reply, or its SSE chunks."""

    def __init__(
        self,
        model: str,
        chat: bool,
        requests: list[GenRequest],
        num_prompt_tokens: int,
        caller: Caller,
        tokenizer=None,  # names the tokens of logprobs
    ):
        self.model, self.chat, self.requests = model, chat, requests
        self.num_prompt_tokens, self.caller, self.tokenizer = num_prompt_tokens, caller, tokenizer
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def usage(self) -> dict:
        completion = sum(len(r.output_token_ids) for r in self.requests)
        return {
            "prompt_tokens": self.num_prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.num_prompt_tokens + completion,
        }

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def full(self) -> dict:
        choices = []
        for index, req in enumerate(self.requests):
            choice: dict = {"index": index}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": req.text}
            else:
                choice["text"] = req.text
            logprobs = self._logprobs(req, 0, len(req.output_logprobs))
            choices.append({**choice, "logprobs": logprobs, "finish_reason": openai_finish_reason(req)})
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._head(kind), "choices": choices, "usage": self.usage()}

    def _logprobs(self, req: GenRequest, start: int, end: int) -> dict | None:
        """A choice's `logprobs` for its tokens start..end-1; None if it asked for none or there are none."""
        if req.sampling.logprobs is None or start >= end:
            return None
        entries = req.output_logprobs[start:end]
        if self.chat:
            return chat_logprobs(self.tokenizer, entries)
        return completion_logprobs(self.tokenizer, entries, req.output_token_ids, start, req.text)

    def _chunk(
        self,
        index: int,
        text: str | None,
        finish_reason: str | None,
        usage: bool,
        logprobs: dict | None = None,
    ) -> str:
        choice: dict = {"index": index}
        if self.chat:  # the first chunk (text None) carries the role, the last ("") an empty delta
            if text is None:
                choice["delta"] = {"role": "assistant", "content": ""}
            else:
                choice["delta"] = {"content": text} if text else {}
        else:
            choice["text"] = text or ""
        choice.update(logprobs=logprobs, finish_reason=finish_reason)
        chunk = {
            **self._head("chat.completion.chunk" if self.chat else "text_completion"),
            "choices": [choice],
        }
        return sse({**chunk, "usage": None} if usage else chunk)

    async def stream(self, service: GenerationService, include_usage: bool) -> AsyncIterator[str]:
        """Role chunks (chat), a chunk per text delta, a finish_reason chunk per choice, the usage chunk
        when asked for, then `data: [DONE]`. An error after the first byte is an `error` event.
        A chunk carries the logprobs of its tokens; tokens whose text is held back (part of a character,
        maybe a stop string) go with the next chunk. The service finishes the choices at the end."""
        num_seen = [0] * len(self.requests)  # tokens the events announced, per choice
        num_sent = [0] * len(self.requests)  # ... and those whose logprobs went out
        try:
            if self.chat:
                for index in range(len(self.requests)):
                    yield self._chunk(index, None, None, include_usage)
            async with contextlib.aclosing(service.events(self.requests)) as events:
                async for index, event in events:
                    req = self.requests[index]
                    if event.kind == "token":
                        num_seen[index] += len(event.token_ids or [])
                        if event.text:
                            logprobs = self._logprobs(req, num_sent[index], num_seen[index])
                            num_sent[index] = num_seen[index]
                            yield self._chunk(index, event.text, None, include_usage, logprobs)
                    elif event.kind == "done":
                        logprobs = self._logprobs(req, num_sent[index], len(req.output_logprobs))
                        yield self._chunk(index, "", openai_finish_reason(req), include_usage, logprobs)
                    elif event.kind == "error":
                        raise event.error
            if include_usage:
                kind = "chat.completion.chunk" if self.chat else "text_completion"
                yield sse({**self._head(kind), "choices": [], "usage": self.usage()})
        except Exception as e:
            yield sse(as_openai(e, self.caller).body())
        finally:
            service.finish(self.caller, self.requests)
        yield "data: [DONE]\n\n"


def openai_finish_reason(req: GenRequest) -> str:
    return "length" if req.finish_reason is FinishReason.LENGTH else "stop"


def model_card(name: str, created: float, record: PrefixRecord | None = None) -> dict:
    """OpenAI's model object, plus `prefix_server`: what this model is and how it takes prompts."""
    if record is None:
        extra = {"kind": "base_model", "chat": "chat_template"}
    else:
        frame = record.frame
        templated = frame is not None and frame.template is not None
        extra = {
            "kind": "task",
            "version": record.version,
            "num_virtual_tokens": record.num_virtual_tokens,
            "chat": "template" if templated else "chat_template",  # how /v1/chat/completions prompts it
            "frame": None if frame is None else frame.to_dict(),
        }
    card = {"id": name, "object": "model", "created": int(created), "owned_by": "prefix-server"}
    return {**card, "prefix_server": extra}
