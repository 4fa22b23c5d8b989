"""A fine-tuning file's bytes -> training examples. One JSON object per line, every line of one shape:

    prompt_completion   {"prompt": "Review: ...\\nSentiment:", "completion": " positive"}
                        (`prefix-server train --data` and OpenAI's legacy shape; other keys are ignored)
    chat                {"messages": [{"role": "user", "content": "..."},
                                      {"role": "assistant", "content": "..."}]}
                        (OpenAI's chat shape: one user turn, then the assistant's answer; content a
                        string or a list of {"type": "text", "text": ...} parts, joined by newlines as
                        /v1/chat/completions joins them)

A chat line's prompt is its user message and its completion the assistant's. System (and developer)
messages are refused for now: a prefix is trained on the user message alone, and a system prompt would
have to be part of every prompt at serving time as well. So are multi-turn conversations and tool calls.
Every error is a TrainingDataError naming the line, what was expected and what arrived.
"""

from __future__ import annotations

from server.errors import TrainingDataError, shown
from server.training.data import Example, json_lines, prompt_completion

PROMPT_COMPLETION, CHAT = "prompt_completion", "chat"
# Examples are held in memory while a file is checked and while a job trains on it; 100,000 is far more
# than a prefix needs (the shipped tasks use a few hundred) and bounds a file of tiny lines.
MAX_EXAMPLES = 100_000
_MESSAGE_KEYS = {"role", "content", "name"}
_CHAT_SHAPE = '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}'


def parse_training_file(data: bytes, max_examples: int = MAX_EXAMPLES) -> tuple[list[Example], str]:
    """(examples, shape) of a JSONL file's bytes: shape is PROMPT_COMPLETION or CHAT, the first line's;
    TrainingDataError (param "file") naming the first bad line."""
    try:
        return _parse(data, max_examples)
    except TrainingDataError as e:
        e.param = "file"  # the upload's form field, as OpenAI's errors name it
        raise


def _parse(data: bytes, max_examples: int) -> tuple[list[Example], str]:
    try:
        text = data.decode("utf-8-sig")  # a leading byte order mark (some editors write one) is dropped
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TrainingDataError(
            f"line {line}: expected UTF-8 text, got byte 0x{data[e.start]:02x} at offset {e.start} "
            f"({e.reason})"
        ) from e
    examples: list[Example] = []
    shape, first = None, 0
    for number, row in json_lines(text, "line {}".format):
        where = f"line {number}"
        this = _shape_of(row, where)
        if shape is None:
            shape, first = this, number
        elif this != shape:
            raise TrainingDataError(
                f"{where}: a {this} line, but line {first} is {shape}: every line of a file must have one "
                f"shape (prompt_completion: {{prompt, completion}}; chat: {{messages}})"
            )
        if len(examples) == max_examples:
            raise TrainingDataError(f"{where}: a file may hold at most {max_examples} examples")
        examples.append(_chat(row, where) if shape == CHAT else prompt_completion(row, where))
    if not examples:
        raise TrainingDataError(
            "no examples: expected one JSON object per line, "
            f'{{"prompt": str, "completion": str}} or {_CHAT_SHAPE}'
        )
    return examples, shape


def _shape_of(row: object, where: str) -> str:
    """A line's shape: chat if it has "messages", else prompt_completion (whose check says what is missing)."""
    if isinstance(row, dict) and not {"messages", "prompt", "completion"} & set(row):
        keys = ", ".join(shown(k) for k in list(row)[:8]) or "none"
        raise TrainingDataError(
            f'{where}: expected {{"prompt": str, "completion": str}} or {_CHAT_SHAPE}; this line has {keys}'
        )
    if not isinstance(row, dict) or "messages" not in row:
        return PROMPT_COMPLETION
    if "prompt" in row or "completion" in row:
        raise TrainingDataError(
            f'{where}: a line has either "messages" (chat) or "prompt" and "completion", this one has both'
        )
    return CHAT


def _chat(row: dict, where: str) -> Example:
    """One chat line: [user, assistant] -> Example(user's text, assistant's text)."""
    messages = row["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise TrainingDataError(
            f"{where}: messages must be a list of objects {{role, content}}, got {_kind(messages)}"
        )
    roles = []
    for index, message in enumerate(messages):
        extra = sorted(set(message) - _MESSAGE_KEYS)
        if extra:
            names = ", ".join(shown(k) for k in extra[:4])
            raise TrainingDataError(
                f"{where}: messages[{index}] has {names}: a message is {{role, content}} (tool calls and "
                "weights are not supported)"
            )
        role = message.get("role")
        if role in ("system", "developer"):
            raise TrainingDataError(
                f"{where}: messages[{index}] is a {role} message: not supported yet (a prefix learns from "
                "the user message alone; drop it, the prefix learns the behaviour it asked for)"
            )
        if role not in ("user", "assistant"):
            raise TrainingDataError(
                f"{where}: messages[{index}].role must be 'user' or 'assistant', got {shown(role)}"
            )
        roles.append(role)
    if roles.count("user") > 1 or roles.count("assistant") > 1:
        raise TrainingDataError(
            f"{where}: a conversation of {roles.count('user')} user and {roles.count('assistant')} "
            "assistant messages: multi-turn conversations are not supported (expected one user message, "
            "then the assistant's answer)"
        )
    if roles != ["user", "assistant"]:
        got = ", ".join(roles) or "no messages"
        raise TrainingDataError(
            f"{where}: expected a user message, then the assistant's answer; got {got} (shape {_CHAT_SHAPE})"
        )
    prompt = _text(messages[0].get("content"), f"{where}: messages[0].content")
    completion = _text(messages[1].get("content"), f"{where}: messages[1].content")
    if not completion.strip():
        raise TrainingDataError(f"{where}: messages[1].content (the answer) must be non-empty text")
    return Example(prompt, completion)


def _text(content: object, where: str) -> str:
    """A message's content: a string, or text parts joined by newlines (as ChatMessage joins them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise TrainingDataError(f"{where} must be a string or a list of text parts, got {_kind(content)}")
    texts = []
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text"):
            kind = part.get("type") if isinstance(part, dict) else _kind(part)
            raise TrainingDataError(f"{where}: only text parts are supported, got {shown(kind)}")
        if set(part) != {"type", "text"} or not isinstance(part["text"], str):
            raise TrainingDataError(
                f"{where}: a text part is {{type: 'text', text: <string>}}, got {shown(part)}"
            )
        texts.append(part["text"])
    return "\n".join(texts)


_KINDS = {
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "true/false",
}


def _kind(value: object) -> str:
    """A JSON value's kind, as a message names it."""
    return "null" if value is None else _KINDS.get(type(value), type(value).__name__)
