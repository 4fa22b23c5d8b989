"""The README's front page works as written: every command block runs against a real server on the
default model (as `make serve` starts it) and prints what the README shows under it.

Blocks: a ```sh block is run with bash, a ```python block with this Python; the ```json or ```text block
right after it is what it must print (JSON compared as data, `"..."` matching any value; text exactly).
The README's `localhost:8000` becomes the test server's address."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import serverproc

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)


def front_page_examples() -> list[tuple[str, str, str, str]]:
    """(language, code, expected language, expected output) for each runnable block and the one after it."""
    blocks = BLOCK.findall(README.read_text(encoding="utf-8"))
    examples = []
    for (lang, code), (out_lang, out) in zip(blocks, [*blocks[1:], ("", "")], strict=True):
        if lang in ("sh", "python") and "localhost:8000" in code:
            assert out_lang in ("json", "text"), f"no output shown after:\n{code}"
            examples.append((lang, code, out_lang, out))
    return examples


def matches(expected, actual) -> bool:
    if expected == "...":
        return True
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and expected.keys() == actual.keys()
            and all(matches(v, actual[k]) for k, v in expected.items())
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(expected) == len(actual)
            and all(matches(e, a) for e, a in zip(expected, actual, strict=True))
        )
    return expected == actual


def test_the_front_page_has_examples():
    langs = [lang for lang, *_ in front_page_examples()]
    assert langs.count("sh") >= 2 and "python" in langs


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("readme")
    args = ["--prefix-dir", str(work / "prefixes"), "--compile", "off", "--examples", "on"]  # as make serve
    # Except that the fine-tuning block's job may use both cores (nothing else runs meanwhile): the same
    # output as the default niced single thread (checked), in ~80 s instead of ~130 s.
    args += ["--fine-tune-threads", "2", "--fine-tune-nice", "0"]
    with open(work / "server.log", "w+") as log, serverproc.running(args, log=log) as (_, base):
        yield base


@pytest.mark.parametrize("index", range(len(front_page_examples())))
def test_a_front_page_block_prints_what_the_readme_shows(server, index):
    lang, code, out_lang, expected = front_page_examples()[index]
    port = server.rsplit(":", 1)[1]
    code = code.replace("localhost:8000", f"127.0.0.1:{port}")
    cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "sh" else [sys.executable, "-c", code]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    if out_lang == "json":
        shown = [json.loads(line) for line in expected.splitlines() if line.strip()]
        printed = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
        assert len(shown) == len(printed) and all(
            matches(e, a) for e, a in zip(shown, printed, strict=True)
        ), f"README shows:\n{expected}\nprinted:\n{run.stdout}"
    else:
        assert run.stdout == expected, f"README shows:\n{expected}\nprinted:\n{run.stdout}"
