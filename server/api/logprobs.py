"""Logprobs on the wire: the engine's `TokenLogprob` entries (token ids and floats) as /generate,
/v1/completions and /v1/chat/completions show them. Token ids become text here, outside the engine.

Every logprob is the model's raw next-token distribution (log_softmax of the logits in float32 over the
whole vocabulary), before temperature, top-k and top-p: what OpenAI and vLLM report by default.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Annotated

from pydantic import Field, PlainValidator

from server.request import MAX_TOP_LOGPROBS, TokenLogprob

# JSON has no infinities or NaN: a logprob of -inf (a probability of 0) or NaN (a broken prefix) is
# reported as vLLM reports it.
FLOOR = -9999.0
_MEANING = "how many of the most likely tokens to list for each generated token"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens


RAW_DISTRIBUTION = (
    "logprobs are the model's raw next-token distribution (log_softmax of the logits in float32 over "
    "the whole vocabulary), before temperature, top_k and top_p, as OpenAI and vLLM report them"
)


def check_num_top(value: object) -> int | None:
    """A request's count of top alternatives per token: null or 0-MAX_TOP_LOGPROBS (a pydantic plain
    validator: JSON's true is not 1)."""
    if value is None or (type(value) is int and 0 <= value <= MAX_TOP_LOGPROBS):
        return value
    if type(value) is not int:  # pydantic's words for a wrong type, as every other integer field has them
        raise ValueError(f"Input should be a valid integer (null or 0-{MAX_TOP_LOGPROBS}: {_MEANING})")
    raise ValueError(f"Input should be null or an integer 0-{MAX_TOP_LOGPROBS} ({_MEANING})")


# A request field: null (no logprobs) or how many alternatives to list per token; its range in the schema.
NumTopLogprobs = Annotated[
    int | None,
    PlainValidator(
        check_num_top, json_schema_input_type=Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None
    ),
]


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR


@functools.lru_cache(maxsize=65536)
def token_text(tokenizer, token_id: int) -> str:
    """One token's text, special tokens included ("\ufffd" where it holds part of a UTF-8 character)."""
    return tokenizer.decode([token_id])


@functools.lru_cache(maxsize=65536)
def token_bytes(tokenizer, token_id: int) -> bytes:
    """One token's UTF-8 bytes; for a token holding part of a character, the raw bytes of that part
    (byte-level BPE symbols and SentencePiece byte tokens), else the bytes of its text."""
    text = token_text(tokenizer, token_id)
    if "\ufffd" not in text:
        return text.encode()
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        if match := _BYTE_FALLBACK.fullmatch(piece):
            return bytes([int(match[1], 16)])
        table = _byte_level_table()
        if piece and all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
    return text.encode()


def shown_token(tokenizer, token_id: int) -> str:
    """A token as OpenAI lists it: its text, or "bytes:\\xe2\\x80" when it is part of a character."""
    text = token_text(tokenizer, token_id)
    if "\ufffd" in text:
        raw = token_bytes(tokenizer, token_id)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return text


# ---- /generate ----
def generate_entries(tokenizer, entries: Sequence[TokenLogprob]) -> list[dict]:
    """[{token_id, text, logprob, top: [{token_id, text, logprob}]}], one per generated token."""
    return [
        {
            "token_id": e.token_id,
            "text": token_text(tokenizer, e.token_id),
            "logprob": finite(e.logprob),
            "top": [
                {"token_id": t, "text": token_text(tokenizer, t), "logprob": finite(lp)} for t, lp in e.top
            ],
        }
        for e in entries
    ]


# ---- /v1/completions ----
def completion_logprobs(
    tokenizer, entries: Sequence[TokenLogprob], token_ids: Sequence[int], start: int, text: str
) -> dict:
    """OpenAI's legacy shape for the tokens token_ids[start : start + len(entries)]:
    {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}. top_logprobs hold the
    asked-for most likely tokens and the chosen one (up to logprobs + 1, as OpenAI says); text_offset is
    where each token starts in the choice's text."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for i, e in enumerate(entries):
        tokens.append(shown_token(tokenizer, e.token_id))
        token_logprobs.append(finite(e.logprob))
        top = {shown_token(tokenizer, t): finite(lp) for t, lp in e.top}
        top.setdefault(tokens[-1], token_logprobs[-1])
        top_logprobs.append(top)
        before = tokenizer.decode(token_ids[: start + i], skip_special_tokens=True)
        text_offset.append(min(len(before), len(text)))
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


# ---- /v1/chat/completions ----
def chat_logprobs(tokenizer, entries: Sequence[TokenLogprob]) -> dict:
    """OpenAI's chat shape: {content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""

    def item(token_id: int, logprob: float) -> dict:
        raw = list(token_bytes(tokenizer, token_id))
        return {"token": shown_token(tokenizer, token_id), "logprob": finite(logprob), "bytes": raw}

    return {
        "content": [
            {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries
        ],
        "refusal": None,
    }


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, symbol -> byte (printable bytes stand for themselves, the others
    are shifted past 255)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    shifted = [b for b in range(256) if b not in table.values()]
    for n, b in enumerate(shifted):
        table[chr(256 + n)] = b
    return table
