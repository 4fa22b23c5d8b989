"""Text out of tokens, off the engine thread: incremental detokenizing, stop strings, stream deltas.

The engine is token-in/token-out: it stops a row on EOS or max_new_tokens, nothing else. After every
engine step the scheduler (on the event loop) hands each running and finished request to `OutputProcessor`:
- a request whose text is needed while it runs (it streams, or has stop strings) gets its new tokens
  detokenized incrementally (a window of a few tokens per step, vLLM's prefix/read offsets: O(1) per
  token, not a decode of the whole output every step), and its new text searched for its stop strings;
  a match cuts the text there and finishes the request with reason stop (the scheduler then takes its
  row out of the engine before the next step, so no token past the stop is ever made);
- a finished request gets its final text from one decode of all its tokens (what a client that does not
  stream receives), cut at its first stop string.

`finish_text` does the last part for requests run on the engine directly (tests, training's evaluation).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from server.request import FinishReason, Request


@dataclass
class _Decoded:
    prefix_offset: int = 0  # output tokens before this one are in the text for good
    read_offset: int = 0  # tokens [prefix_offset, read_offset) made the text's tail


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._running: dict[Request, _Decoded] = {}
        self._stopped: set[Request] = set()  # finished here by a stop string, their rows not yet out

    def update(self, request: Request) -> bool:
        """Bring `request.text` up to its tokens. True when a stop string matched just now: the request is
        finished (reason stop, text cut before the string) and its row must leave the engine."""
        if request.finished:
            self._running.pop(request, None)
            if request in self._stopped:  # its text was cut here already
                return False
            if request.finish_reason in (FinishReason.LENGTH, FinishReason.STOP):
                finish_text(request, self.tokenizer)
            return False
        if not (request.stream or request.sampling.stop):
            return False  # its text is made once, when it finishes
        state = self._running.setdefault(request, _Decoded())
        before = len(request.text)
        request.text += self._delta(request.output_token_ids, state)
        cut = _find_stop(request.text, request.sampling.stop, since=before)
        if cut is None:
            return False
        request.text = request.text[:cut]
        request.finish(FinishReason.STOP)
        self._running.pop(request, None)
        self._stopped.add(request)
        return True

    def done(self, request: Request) -> None:
        """The request has left the engine and been answered: drop what is kept for it."""
        self._running.pop(request, None)
        self._stopped.discard(request)

    def _delta(self, ids: list[int], state: _Decoded) -> str:
        """The text the tokens past `state.read_offset` add, held back while it ends in a partial UTF-8
        character (which a later token completes)."""
        if len(ids) <= state.read_offset:
            return ""
        decode = self.tokenizer.decode
        before = decode(ids[state.prefix_offset : state.read_offset], skip_special_tokens=True)
        after = decode(ids[state.prefix_offset :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        state.prefix_offset, state.read_offset = state.read_offset, len(ids)
        return after[len(before) :]


def finish_text(request: Request, tokenizer) -> None:
    """A finished request's text: all its tokens decoded once, cut at its first stop string (reason stop)."""
    text = tokenizer.decode(request.output_token_ids, skip_special_tokens=True)
    cut = _find_stop(text, request.sampling.stop)
    if cut is not None:
        text = text[:cut]
        request.finish_reason = FinishReason.STOP
    request.text = text


def finish_texts(requests: Iterable[Request], tokenizer) -> list[Request]:
    """`finish_text` for each of `requests` (run on the engine directly); returns them."""
    requests = list(requests)
    for request in requests:
        finish_text(request, tokenizer)
    return requests


def _find_stop(text: str, stops: tuple[str, ...], since: int = 0) -> int | None:
    """Where the first stop string starts in `text`, looking only at matches that end past `since`."""
    if not stops:
        return None
    start = max(0, since - max(len(s) for s in stops) + 1)
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None
