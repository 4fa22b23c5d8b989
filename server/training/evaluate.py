"""Held-out scoring through the serving Engine: greedy decoding, exact match of the first line.

Not `PeftModel.generate` (it ignores the prefix under transformers 5): a prefix is scored exactly as
the server will serve it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from server.engine.engine import Engine
from server.output import finish_texts
from server.registry.format import PrefixKV
from server.request import Constraint, Request, SamplingParams
from server.training.data import Example, answer, prompt_token_ids


@dataclass
class EvalResult:
    score: float  # exact match of the first line, in [0, 1]
    outputs: list[str]  # generated text per held-out example


def evaluate(
    engine: Engine,
    examples: Sequence[Example],
    prefix: PrefixKV | None,
    *,
    chat_template: bool,
    batch_size: int = 32,
    constraint: Constraint | None = None,
) -> EvalResult:
    """Greedy generation for every example (batched, with or without a prefix, within `constraint`'s grammar
    where given: structured output); exact first-line match."""
    tokenizer = engine.tokenizer
    longest = max(len(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) for ex in examples)
    sampling = SamplingParams(max_new_tokens=longest + 2, constraint=constraint)  # room to see it not stop
    outputs: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        requests = [
            Request(prompt_token_ids(ex.prompt, tokenizer, chat_template), sampling, prefix=prefix)
            for ex in chunk
        ]
        for request in requests:
            engine.validate(request)
        outputs += [r.text for r in finish_texts(engine.generate(requests), engine.tokenizer)]
    hits = sum(answer(out) == answer(ex.completion) for out, ex in zip(outputs, examples, strict=True))
    return EvalResult(hits / len(examples), outputs)
