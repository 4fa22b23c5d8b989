"""The prompt frame a trained prefix ships with, read off the data it was trained on.

- template: the text every training prompt starts with and the text every one ends with, around
  `{input}`. Each side is cut back to a whitespace character when it has one (else to a word
  boundary): a word or a full stop that opens (closes) every input is the input's, not the frame's, so
  `Review: X.\nSentiment:` gives `Review: {input}\nSentiment:`. No common text on either side, or
  fewer than two distinct prompts: no template (give --template).
- max_new_tokens: the longest training completion in tokens, plus EOS, plus a quarter (at least 4) of
  margin; the model learned to stop there with EOS.
- stop: ["\\n"] when every completion is one line ending in a newline (the model learned to end with
  one); otherwise none: EOS ends the answer, as training taught.
"""

from __future__ import annotations

from collections.abc import Sequence

from server.registry.frame import INPUT_SLOT, TaskFrame, TaskScores
from server.training.data import Example, format_prompt


def _common_head(texts: Sequence[str]) -> str:
    """The longest text all `texts` start with, cut back to end on whitespace (if it has any) or a
    non-word character."""
    first, last = min(texts), max(texts)  # what these two share, all the others between them share
    n = next((i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b), len(first))
    head = first[:n]
    if any(len(t) > len(head) and t[len(head)].isalnum() for t in texts):  # head stops inside a word
        while head and head[-1].isalnum():
            head = head[:-1]
    if head and not head[-1].isspace() and any(c.isspace() for c in head):  # "Review: X." -> "Review: "
        head = head[: max(i for i, c in enumerate(head) if c.isspace()) + 1]
    return head


def infer_template(prompts: Sequence[str]) -> str | None:
    """`head{input}tail` from what every prompt shares at its start and end; None if nothing is shared
    (only blanks), or if the shared text holds a literal "{input}" (it could not be told from the slot)."""
    distinct = sorted(set(prompts))
    if len(distinct) < 2:
        return None
    head = _common_head(distinct)
    # The tail is looked for after the head, so the two never overlap inside a short prompt.
    tail = _common_head([p[len(head) :][::-1] for p in distinct])[::-1]
    if not (head + tail).strip() or INPUT_SLOT in head + tail:
        return None
    return head + INPUT_SLOT + tail


def default_max_new_tokens(completions: Sequence[str], tokenizer) -> int:
    """Longest completion in tokens (as training tokenized it), + 1 for EOS, + max(4, a quarter)."""
    longest = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions)
    return longest + 1 + max(4, longest // 4)


def default_stop(completions: Sequence[str]) -> tuple[str, ...] | None:
    """("\\n",) when every completion is a single line ending in a newline, else None."""
    if all(c.endswith("\n") and "\n" not in c[:-1] for c in completions):
        return ("\n",)
    return None


def frame_from_data(
    examples: Sequence[Example],
    tokenizer,
    *,
    chat_template: bool = False,
    template: str | None = None,
    description: str | None = None,
    scores: TaskScores | None = None,
) -> TaskFrame:
    """The frame of a prefix trained on `examples`: `template` if given, else inferred (see above);
    with `chat_template`, wrapped as one user turn, as training wrapped the prompts."""
    if template is None:
        template = infer_template([e.prompt for e in examples])
    if template is not None:
        template = format_prompt(template, tokenizer, chat_template)
    return TaskFrame(
        template=template,
        description=description,
        max_new_tokens=default_max_new_tokens([e.completion for e in examples], tokenizer),
        stop=default_stop([e.completion for e in examples]),
        scores=scores,
    )
