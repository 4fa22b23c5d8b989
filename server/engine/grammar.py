"""Structured output: a row constrained by a JSON schema or a regex samples only tokens that keep its text a
prefix of something the grammar accepts, and stops when the grammar is complete.

The grammar library is llguidance (picked by measurement, loadtest/bench_grammar.py: 0.19 ms for the masks
of a 16-row step, each row its own schema; no dependencies; it refuses the JSON-schema keywords it cannot
enforce rather than ignoring them). Per model: one llguidance tokenizer and an LRU of compiled grammars,
one prototype matcher each (compiled once, ~0.4 ms for a small schema); a row gets a deep copy of it.

Per step, for the constrained rows only: each row's matcher writes its allowed-token bitmask (one bit per
token), the bits are unpacked to a [rows, vocab] mask and the other tokens' logits become -inf before the
sampler sees them; the sampled token then advances the row's matcher. Unconstrained rows are untouched,
so they give exactly the tokens they give alone. Logprobs stay the raw distribution's (engine/logprobs.py).

JSON comes out as Python's json.dumps writes it by default (", " and ": ", no other whitespace): bounded,
and what the shipped example tasks were trained on; one whitespace character may come first (a model
trained on "JSON: {...}" writes " {" as one token). A schema may change the format with llguidance's own
`x-guidance` key, e.g. {"x-guidance": {"whitespace_flexible": true}}.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import torch

from server.errors import InvalidRequest, shown
from server.request import Constraint

if TYPE_CHECKING:
    from llguidance import LLMatcher

# Defaults for a JSON schema's grammar (a schema's "x-guidance" key overrides them).
JSON_FORMAT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
# A JSON value after at most one whitespace character, in llguidance's Lark (%json embeds a JSON schema).
JSON_GRAMMAR = "start: WS? value\nWS: /[ \\t\\n]/\nvalue: %json "
MAX_GRAMMARS = 256  # compiled grammars kept per model (each ~ tens of KB)


class Grammars:
    """One model's llguidance tokenizer and its compiled grammars. Thread-safe: the HTTP thread checks a
    request's constraint (compiling it), the engine thread takes matchers."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        import llguidance.hf  # here, not at import: the engine runs without it until a request asks

        try:
            self.tokenizer = llguidance.hf.from_tokenizer(
                tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_token_ids)
            )
        except Exception as e:  # a slow (Python) tokenizer, or one llguidance cannot read
            raise InvalidRequest(
                f"structured output needs a fast (Rust) tokenizer; this model's cannot be used: {e}"
            ) from e
        self.vocab_size = vocab_size
        self._compiled: OrderedDict[Constraint, LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, constraint: Constraint) -> None:
        """InvalidRequest (naming the field) if the constraint does not compile."""
        self.matcher(constraint)

    def matcher(self, constraint: Constraint) -> LLMatcher:
        """A fresh matcher for one row, at the grammar's start."""
        with self._lock:
            prototype = self._compiled.get(constraint)
            if prototype is None:
                prototype = self._compile(constraint)
                self._compiled[constraint] = prototype
                if len(self._compiled) > MAX_GRAMMARS:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(constraint)
            return prototype.deep_copy()

    def _compile(self, constraint: Constraint) -> LLMatcher:
        from llguidance import LLMatcher

        if constraint.kind == "json_schema":
            schema = json.loads(constraint.source)  # a JSON object: json_schema_constraint made it
            options = schema.get("x-guidance", {})
            if not isinstance(options, dict):
                raise InvalidRequest(
                    f"{constraint.param}'s x-guidance must be an object of llguidance's JSON options, got "
                    f"{shown(options)}",
                    param=constraint.param,
                )
            schema["x-guidance"] = {**JSON_FORMAT, **options}
            grammar = LLMatcher.grammar_from_lark(JSON_GRAMMAR + json.dumps(schema))
        else:
            grammar = LLMatcher.grammar_from_regex(constraint.source)
        error = LLMatcher.validate_grammar(grammar, self.tokenizer)
        matcher = None if error else LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher is None or matcher.is_error():
            reason = shown(_reason(error or matcher.get_error()), 400, quoted=False)
            raise InvalidRequest(f"{constraint.param} cannot be enforced: {reason}", param=constraint.param)
        return matcher


def _reason(error: str) -> str:
    """llguidance's error without the grammar text it quotes (ours, not the client's): one line."""
    lines = []
    for line in error.splitlines():
        if re.match(r"\s*\d+ \| ", line):  # "   3 | value: %json {...}": our grammar's source from here on
            break
        lines.append(line.strip())
    text = re.sub(r"^at \d+\(\d+\): ", "", " ".join(s for s in lines if s))
    return text.replace("failed to compile JSON schema: ", "")


def json_schema_constraint(schema: object, param: str) -> Constraint:
    """A JSON-schema constraint from a request field's value (a JSON object), keeping its key order (the
    order the properties come out in)."""
    if not isinstance(schema, dict):
        raise InvalidRequest(
            f"{param} must be a JSON object (a JSON schema), got {shown(schema)}", param=param
        )
    return Constraint("json_schema", json.dumps(schema, ensure_ascii=False), param)


def allowed_tokens(matchers: list[LLMatcher], vocab: int) -> torch.Tensor:
    """Each matcher's allowed next tokens: [len(matchers), vocab] bool."""
    from llguidance.numpy import fill_next_token_bitmask

    words = (vocab + 31) // 32
    bits = np.zeros((len(matchers), words), dtype=np.int32)  # [m, words]: bit j of word w = token 32 w + j
    for i, matcher in enumerate(matchers):
        fill_next_token_bitmask(matcher, bits, i)
    unpacked = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :vocab]  # [m, vocab] 0/1
    return torch.from_numpy(unpacked).bool()


def constrain(logits: torch.Tensor, matchers: list[LLMatcher | None]) -> torch.Tensor:
    """logits [n, vocab] with the tokens each constrained row's grammar forbids at -inf (a new tensor;
    `logits` itself is left as the model gave it); the same tensor when no row is constrained."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    allowed = allowed_tokens([matchers[i] for i in rows], logits.shape[-1]).to(logits.device)  # [c, vocab]
    index = torch.tensor(rows, device=logits.device)  # [c]
    masked = logits.clone()
    masked[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return masked


def advance(matcher: LLMatcher, token: int) -> str | None:
    """Feed a row's sampled token to its matcher. Returns None while the row may go on, "stop" once the
    grammar is complete (it allows nothing more), or an error message if the token was refused."""
    if not matcher.consume_token(token):
        return f"the grammar refused token {token}: {matcher.get_error()}"
    return "stop" if matcher.is_stopped() else None
