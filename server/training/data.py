"""Training data: JSONL lines {"prompt": ..., "completion": ...}, tokenized as the server tokenizes prompts.

The completion's tokens (then EOS) follow the prompt's tokens; the loss covers only the completion.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from server.errors import TrainingDataError

if TYPE_CHECKING:
    import torch

# torch is imported where tensors are made: reading and checking a data file must not wait for it.
IGNORE_INDEX = -100  # label of a token that carries no loss (prompt, padding)


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


@dataclass(frozen=True)
class EncodedExample:
    """token_ids = prompt ids + completion ids + EOS; the first num_prompt_tokens carry no loss."""

    token_ids: list[int]
    num_prompt_tokens: int


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [batch, seq] right-padded
    attention_mask: torch.Tensor  # [batch, seq] 1 on real tokens
    labels: torch.Tensor  # [batch, seq] token id on completion tokens, IGNORE_INDEX elsewhere


def read_jsonl(path: Path) -> list[Example]:
    """Examples from a JSONL file; TrainingDataError naming the first bad line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TrainingDataError(f"cannot read training data {path}: {e}") from e

    def where(number: int) -> str:
        return f"{path}:{number}"

    examples = [prompt_completion(row, where(number)) for number, row in json_lines(text, where)]
    if not examples:
        raise TrainingDataError(f"{path}: no examples (expected one JSON object per line)")
    return examples


def json_lines(text: str, where: Callable[[int], str]) -> Iterator[tuple[int, object]]:
    """(line number from 1, the parsed JSON value) of each non-blank line; TrainingDataError starting with
    where(line number) for one that is not JSON. Lines end at "\n" only (JSONL's rule): a string may hold
    U+2028 or other characters that str.splitlines() would split at."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise TrainingDataError(f"{where(number)}: not valid JSON ({e})") from e
        except RecursionError as e:  # [[[[... thousands deep
            raise TrainingDataError(f"{where(number)}: JSON nested too deeply to parse") from e
        yield number, row


def prompt_completion(row: object, where: str) -> Example:
    """One line {"prompt": str, "completion": str} (other keys ignored) as an Example; `where` starts
    each error message (file:line)."""
    if not isinstance(row, dict):
        raise TrainingDataError(
            f'{where}: expected an object {{"prompt": str, "completion": str}}, got a JSON '
            f"{type(row).__name__}"
        )
    for key in ("prompt", "completion"):
        if key not in row:
            raise TrainingDataError(f"{where}: {_missing(key, row)}")
    if not isinstance(row["prompt"], str):
        raise TrainingDataError(f"{where}: prompt must be a string, got {type(row['prompt']).__name__}")
    if not isinstance(row["completion"], str) or not row["completion"].strip():
        raise TrainingDataError(f"{where}: completion must be a non-empty string")
    return Example(row["prompt"], row["completion"])


_OTHER_NAMES = {
    "prompt": ("input", "question", "instruction", "text", "source"),
    "completion": ("output", "answer", "response", "target", "label"),
}


def _missing(key: str, row: dict) -> str:
    """A missing field, the keys the line has, and the likely rename."""
    found = [k for k in _OTHER_NAMES[key] if k in row]
    hint = f"; rename {found[0]!r} to {key!r}" if found else ""
    keys = ", ".join(repr(k) for k in list(row)[:8]) or "none"
    return f'no "{key}" field (expected {{"prompt": str, "completion": str}}; this line has {keys}){hint}'


def split_examples(
    examples: Sequence[Example], eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, held-out): a seeded shuffle, then the last ceil(fraction * n) examples are held out."""
    import torch

    if not 0 < eval_fraction < 1:
        raise TrainingDataError(f"eval fraction must be in (0, 1), got {eval_fraction}")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    num_eval = max(1, round(eval_fraction * len(examples)))
    if num_eval >= len(examples):
        raise TrainingDataError(
            f"{len(examples)} examples leave none for training after holding out {num_eval}"
        )
    shuffled = [examples[i] for i in order]
    return shuffled[:-num_eval], shuffled[-num_eval:]


def format_prompt(prompt: str, tokenizer, chat_template: bool) -> str:
    """The prompt as a client must send it: raw, or wrapped as one user turn of the chat template."""
    if not chat_template:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise TrainingDataError("--chat-template given, but the model's tokenizer has no chat template")
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_token_ids(prompt: str, tokenizer, chat_template: bool) -> list[int]:
    """Token ids of a prompt exactly as /generate makes them: tokenizer(prompt) with its defaults."""
    return list(tokenizer(format_prompt(prompt, tokenizer, chat_template))["input_ids"])


def encode(examples: Sequence[Example], tokenizer, chat_template: bool, eos_id: int) -> list[EncodedExample]:
    """Tokenize prompt and completion separately (as at serving time) and end the completion with EOS."""
    encoded = []
    for ex in examples:
        prompt = prompt_token_ids(ex.prompt, tokenizer, chat_template)
        completion = list(tokenizer(ex.completion, add_special_tokens=False)["input_ids"])
        encoded.append(EncodedExample(prompt + completion + [eos_id], len(prompt)))
    return encoded


def collate(examples: Sequence[EncodedExample], pad_id: int) -> Batch:
    """Right-pad a batch: padding only follows the real tokens, so their positions are unchanged."""
    import torch

    seq = max(len(e.token_ids) for e in examples)
    input_ids = torch.full((len(examples), seq), pad_id, dtype=torch.long)  # [batch, seq]
    attention_mask = torch.zeros((len(examples), seq), dtype=torch.long)  # [batch, seq]
    labels = torch.full((len(examples), seq), IGNORE_INDEX, dtype=torch.long)  # [batch, seq]
    for row, e in enumerate(examples):
        n = len(e.token_ids)
        input_ids[row, :n] = torch.tensor(e.token_ids)
        attention_mask[row, :n] = 1
        labels[row, e.num_prompt_tokens : n] = input_ids[row, e.num_prompt_tokens : n]
    return Batch(input_ids, attention_mask, labels)


def answer(text: str) -> str:
    """What exact match compares: the first line of the stripped text, stripped."""
    return text.strip().split("\n", 1)[0].strip()
