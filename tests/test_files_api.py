"""Fine-tuning files: the line checks (server/finetune/training_file.py), the crash-safe store
(server/finetune/files.py) and the /v1/files routes, driven in process by the official `openai` client
(its AsyncOpenAI over an ASGI transport: the requests it sends are the ones it sends to OpenAI)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from conftest import app_client, chat_engine, tiny_app

from server.config import Settings
from server.errors import InsufficientStorage, TrainingDataError
from server.finetune import files as files_module
from server.finetune.files import SHARED_OWNER, FileStore
from server.finetune.training_file import CHAT, PROMPT_COMPLETION, parse_training_file
from server.training.data import Example

ADMIN, ACME, GLOBEX = "admin-key", "acme-key", "globex-key"


def jsonl(*rows: object) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def chat(user: object, assistant: object, *more: dict) -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}, *more]
    }


PC_FILE = jsonl(
    {"prompt": "Review: cold soup\nSentiment:", "completion": " negative"}, {"prompt": "", "completion": "x"}
)
CHAT_FILE = jsonl(chat("Hi", "Hello!"), chat("2+2?", "4"))
PARTS_FILE = jsonl(
    chat([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], [{"type": "text", "text": "c"}])
)


# ---- the lines ----
@pytest.mark.parametrize(
    ("data", "shape", "examples"),
    [
        (
            PC_FILE,
            PROMPT_COMPLETION,
            [Example("Review: cold soup\nSentiment:", " negative"), Example("", "x")],
        ),
        (CHAT_FILE, CHAT, [Example("Hi", "Hello!"), Example("2+2?", "4")]),
        (PARTS_FILE, CHAT, [Example("a\nb", "c")]),
        # a byte order mark, blank lines, CRLF, no final newline, extra keys (ignored, as read_jsonl does)
        (
            b'\xef\xbb\xbf\r\n{"prompt": "p", "completion": "c", "id": 7}\r\n\n  \n',
            PROMPT_COMPLETION,
            [Example("p", "c")],
        ),
        # U+2028 inside a string is not a line break (str.splitlines would split there)
        (
            json.dumps({"prompt": "a\u2028b", "completion": "c"}, ensure_ascii=False).encode(),
            PROMPT_COMPLETION,
            [Example("a\u2028b", "c")],
        ),
        (
            jsonl(
                {
                    "messages": [
                        {"role": "user", "content": "u", "name": "ann"},
                        {"role": "assistant", "content": "a"},
                    ]
                }
            ),
            CHAT,
            [Example("u", "a")],
        ),
    ],
)
def test_accepted_shapes(data, shape, examples):
    assert parse_training_file(data) == (examples, shape)


GOOD = {"prompt": "p", "completion": "c"}
BAD_FILES = {
    "not json": (jsonl(GOOD) + b"{oops\n", "line 2: not valid JSON"),
    "not an object": (jsonl(GOOD, GOOD, ["a", "b"]), "line 3: expected an object"),
    "unknown shape": (
        jsonl({"input": "a", "output": "b"}),
        'line 1: expected {"prompt": str, "completion": str} or {"messages"',
    ),
    "missing completion": (jsonl(GOOD, {"prompt": "a"}), 'line 2: no "completion" field'),
    "empty completion": (
        jsonl({"prompt": "a", "completion": " "}),
        "line 1: completion must be a non-empty string",
    ),
    "mixed: chat after prompt/completion": (
        jsonl(GOOD, chat("u", "a")),
        "line 2: a chat line, but line 1 is prompt_completion",
    ),
    "mixed: prompt/completion after chat": (
        jsonl(chat("u", "a"), GOOD),
        "line 2: a prompt_completion line, but line 1 is chat",
    ),
    "both shapes in a line": (jsonl({**GOOD, "messages": []}), "line 1: a line has either"),
    "multi-turn": (
        jsonl(
            chat("u", "a"),
            chat("u", "a", {"role": "user", "content": "more?"}, {"role": "assistant", "content": "no"}),
        ),
        "line 2: a conversation of 2 user and 2 assistant messages: multi-turn",
    ),
    "system message": (
        jsonl({"messages": [{"role": "system", "content": "Be brief."}, *chat("u", "a")["messages"]]}),
        "line 1: messages[0] is a system message: not supported",
    ),
    "no answer": (
        jsonl({"messages": [{"role": "user", "content": "u"}]}),
        "line 1: expected a user message, then the assistant's answer; got user",
    ),
    "answer first": (
        jsonl({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]}),
        "got assistant, user",
    ),
    "tool role": (
        jsonl({"messages": [{"role": "tool", "content": "x"}]}),
        "line 1: messages[0].role must be 'user' or 'assistant', got 'tool'",
    ),
    "tool calls": (
        jsonl(
            {
                "messages": [
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": None, "tool_calls": []},
                ]
            }
        ),
        "messages[1] has 'tool_calls'",
    ),
    "null content": (
        jsonl(chat("u", None)),
        "line 1: messages[1].content must be a string or a list of text parts, got null",
    ),
    "image part": (
        jsonl(chat([{"type": "image_url", "image_url": {"url": "x"}}], "a")),
        "only text parts are supported, got 'image_url'",
    ),
    "empty answer": (jsonl(chat("u", [])), "messages[1].content (the answer) must be non-empty"),
    "messages not a list": (jsonl({"messages": "hi"}), "line 1: messages must be a list of objects"),
    "empty": (b"", "no examples"),
    "blank lines only": (b"\n  \n\r\n", "no examples"),
    "not UTF-8": (
        jsonl(GOOD) + b'{"prompt": "caf\xe9", "completion": "c"}\n',
        "line 2: expected UTF-8 text, got byte 0xe9",
    ),
    "nested too deeply": (jsonl(GOOD) + b"[" * 100_000 + b"\n", "line 2: JSON nested too deeply"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_refused_files_name_the_line(name):
    data, message = BAD_FILES[name]
    with pytest.raises(TrainingDataError) as e:
        parse_training_file(data)
    assert message in str(e.value)
    assert (e.value.param, e.value.code) == ("file", "invalid_training_data")


def test_at_most_max_examples():
    assert len(parse_training_file(jsonl(GOOD, GOOD), max_examples=2)[0]) == 2
    with pytest.raises(TrainingDataError, match="line 3: a file may hold at most 2 examples"):
        parse_training_file(jsonl(GOOD, GOOD, GOOD), max_examples=2)


# ---- the store ----
def store_at(root: Path, **limits) -> FileStore:
    return FileStore(root, **{"max_file_bytes": 10_000, "max_bytes_per_owner": 0, **limits})


def test_a_failed_write_stores_nothing(tmp_path, monkeypatch):
    store = store_at(tmp_path)
    kept = store.create("acme", "a.jsonl", "fine-tune", PC_FILE)

    def fail(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "rename", fail)
    with pytest.raises(OSError):
        store.create("acme", "b.jsonl", "fine-tune", CHAT_FILE)
    monkeypatch.undo()
    assert [r.id for r in store.list("acme")[0]] == [kept.id]
    assert sorted(p.name for p in (tmp_path / "acme").iterdir()) == [kept.id]  # no temp folder left


def test_a_full_disk_is_a_507_and_stores_nothing(tmp_path, monkeypatch):
    store = store_at(tmp_path)

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files_module, "_write", full)
    with pytest.raises(InsufficientStorage, match="out of space"):
        store.create("acme", "a.jsonl", "fine-tune", PC_FILE)
    assert list((tmp_path / "acme").iterdir()) == []


KILLED_UPLOAD = """
import os, signal, sys
from server.finetune import files
files.os.rename = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # killed just before the commit
store = files.FileStore(sys.argv[1], max_file_bytes=10_000, max_bytes_per_owner=0)
store.create("acme", "a.jsonl", "fine-tune", sys.stdin.buffer.read())
"""


def test_a_process_killed_mid_upload_leaves_nothing_trusted(tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", KILLED_UPLOAD, str(tmp_path)],
        input=PC_FILE,
        capture_output=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr
    (temp,) = (tmp_path / "acme").iterdir()  # its whole data and meta, in a temporary folder
    assert sorted(p.name for p in temp.iterdir()) == ["data.jsonl", "meta.json"]
    store = store_at(tmp_path)
    assert store.list("acme") == ([], False) and store.bytes_used("acme") == 0
    assert "removed" in store.recover()[0] and list((tmp_path / "acme").iterdir()) == []


def test_recover_removes_what_killed_uploads_and_deletes_left(tmp_path):
    store = store_at(tmp_path)
    kept = store.create("acme", "a.jsonl", "fine-tune", PC_FILE)
    # a process killed mid-upload: a temp folder with a whole data file and no meta, or both
    (tmp_path / "acme" / ".upload-x1.tmp").mkdir()
    (tmp_path / "acme" / ".upload-x1.tmp" / "data.jsonl").write_bytes(PC_FILE)
    half = tmp_path / "acme" / ".delete-file-000000000000000000000000.tmp"
    half.mkdir()
    (half / "meta.json").write_text("{}")
    broken = tmp_path / "acme" / "file-111111111111111111111111"  # a folder no upload of ours writes
    broken.mkdir()
    assert [r.id for r in store.list("acme")[0]] == [kept.id]  # ignored before any recovery
    notes = store.recover()
    assert sorted(p.name for p in (tmp_path / "acme").iterdir()) == sorted([kept.id, broken.name])
    assert sum("removed" in n for n in notes) == 2 and any(broken.name in n and "ignored" in n for n in notes)


def test_examples_and_bytes_used(tmp_path):
    store = store_at(tmp_path)
    record = store.create(SHARED_OWNER, "c.jsonl", "fine-tune", CHAT_FILE)
    assert store.examples(SHARED_OWNER, record.id) == [Example("Hi", "Hello!"), Example("2+2?", "4")]
    assert store.get(SHARED_OWNER, record.id).shape == CHAT
    assert store.bytes_used(SHARED_OWNER) == len(CHAT_FILE) and store.bytes_used("acme") == 0


def test_default_folder_is_beside_the_prefixes(tmp_path):
    assert Settings(prefix_dir=tmp_path).fine_tune_path == tmp_path / "fine-tune"
    assert Settings(prefix_dir=tmp_path, fine_tune_dir=tmp_path / "ft").fine_tune_path == tmp_path / "ft"
    env = {"PREFIX_SERVER_FINE_TUNE_DIR": str(tmp_path / "env"), "PREFIX_SERVER_MAX_FILE_BYTES": "123"}
    settings = Settings.from_env(environ=env)
    assert (settings.fine_tune_path, settings.max_file_bytes) == (tmp_path / "env", 123)


# ---- the routes, through the official client ----
@pytest.fixture(scope="module")
def engine():
    return chat_engine("llama-gqa")


def keys_file(tmp_path) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"admin": [ADMIN], "tenants": {"acme": [ACME], "globex": [GLOBEX]}}))
    return path


@pytest.fixture
async def make_server(tmp_path, engine):
    """make_server(**settings) -> (raw httpx client, client(key) -> AsyncOpenAI): an app in process, its
    prefixes and fine-tuning files under tmp_path (the same folders for every app: a restart)."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(**settings):
            app = tiny_app(engine, tmp_path / "prefixes", **settings)
            api = await stack.enter_async_context(app_client(app))

            def client(key: str = "unused") -> openai.AsyncOpenAI:
                transport = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
                return openai.AsyncOpenAI(
                    base_url="http://t/v1", api_key=key, http_client=transport, max_retries=0
                )

            return api, client

        yield make


def files_root(tmp_path) -> Path:
    return tmp_path / "prefixes" / "fine-tune" / "files"


def stored(tmp_path) -> list[str]:
    """Every path under the files folder (owner folders, file folders and their files)."""
    root = files_root(tmp_path)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.mark.parametrize(
    ("data", "shape", "num_examples"),
    [(PC_FILE, PROMPT_COMPLETION, 2), (CHAT_FILE, CHAT, 2), (PARTS_FILE, CHAT, 1)],
)
async def test_upload_retrieve_list_content_delete(make_server, data, shape, num_examples):
    _, client = await make_server()
    files = client().files
    created = await files.create(file=("train.jsonl", data), purpose="fine-tune")
    assert created.id.startswith("file-") and len(created.id) == 29
    assert (created.object, created.purpose, created.status, created.filename) == (
        "file",
        "fine-tune",
        "processed",
        "train.jsonl",
    )
    assert created.bytes == len(data) and isinstance(created.created_at, int)
    assert created.model_extra["prefix_server"] == {"shape": shape, "num_examples": num_examples}
    assert await files.retrieve(created.id) == created
    assert [f.id async for f in files.list()] == [created.id]
    assert (await files.content(created.id)).content == data
    deleted = await files.delete(created.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (created.id, True, "file")
    for call in (files.retrieve, files.content, files.delete):
        with pytest.raises(openai.NotFoundError) as e:
            await call(created.id)
        assert (e.value.code, e.value.param) == ("file_not_found", "file_id")
    assert [f async for f in files.list()] == []


async def test_list_order_after_limit_and_purpose(make_server):
    api, client = await make_server()
    files = client().files
    ids = [(await files.create(file=(f"{i}.jsonl", PC_FILE), purpose="fine-tune")).id for i in range(4)]
    assert [f.id async for f in files.list()] == ids[::-1]  # newest first, as OpenAI
    assert [f.id async for f in files.list(order="asc")] == ids
    page = await files.list(limit=3, order="asc")
    assert [f.id for f in page.data] == ids[:3] and page.has_more
    assert [f.id for f in (await files.list(after=ids[1], order="asc")).data] == ids[2:]
    assert [f.id async for f in files.list(limit=1)] == ids[::-1]  # the client follows `after` page by page
    assert [f.id async for f in files.list(purpose="fine-tune", order="asc")] == ids
    assert [f async for f in files.list(purpose="batch")] == []
    raw = (await api.get("/v1/files", params={"limit": 2})).json()
    assert (raw["object"], raw["first_id"], raw["last_id"], raw["has_more"]) == ("list", ids[3], ids[2], True)
    for params, param in (
        ({"limit": 0}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"order": "up"}, "order"),
        ({"after": "file-nope"}, "after"),
        ({"sort": "x"}, "sort"),
    ):
        resp = await api.get("/v1/files", params=params)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


@pytest.mark.parametrize(
    "name",
    ["not json", "mixed: chat after prompt/completion", "multi-turn", "empty", "not UTF-8", "unknown shape"],
)
async def test_a_refused_file_is_a_400_naming_the_line_and_stores_nothing(make_server, tmp_path, name):
    data, message = BAD_FILES[name]
    _, client = await make_server()
    files = client().files
    kept = await files.create(file=("ok.jsonl", PC_FILE), purpose="fine-tune")
    before = stored(tmp_path)
    with pytest.raises(openai.BadRequestError) as e:
        await files.create(file=("bad.jsonl", data), purpose="fine-tune")
    assert (e.value.code, e.value.param) == ("invalid_training_data", "file")
    assert message in e.value.message
    assert [f.id async for f in files.list()] == [kept.id] and stored(tmp_path) == before


async def test_form_errors(make_server, tmp_path):
    api, client = await make_server()
    for purpose in ("batch", "assistants"):
        with pytest.raises(openai.BadRequestError) as e:
            await client().files.create(file=("a.jsonl", PC_FILE), purpose=purpose)
        assert (
            e.value.param == "purpose" and f"purpose must be 'fine-tune', got '{purpose}'" in e.value.message
        )
    with pytest.raises(openai.BadRequestError) as e:
        await client().files.create(
            file=("a.jsonl", PC_FILE),
            purpose="fine-tune",
            expires_after={"anchor": "created_at", "seconds": 3600},
        )
    assert (e.value.code, e.value.param) == ("unsupported_parameter", "expires_after[anchor]")
    cases = [
        (
            {"files": {"purpose": (None, "fine-tune")}},
            "file",
            "expected a file part (with a filename), got none",
        ),
        ({"files": {"purpose": (None, "fine-tune"), "file": (None, "text")}}, "file", "got a text field"),
        ({"data": {"purpose": "fine-tune"}}, None, "got content-type 'application/x-www-form-urlencoded'"),
        ({"files": {"file": ("a.jsonl", PC_FILE)}}, "purpose", "got none"),
        ({"json": {"purpose": "fine-tune"}}, None, "expected a multipart/form-data body"),
        (
            {"files": {"file": ("a" * 300, PC_FILE)}, "data": {"purpose": "fine-tune"}},
            "file",
            "300 characters",
        ),
        (
            {"files": [("file", ("a", PC_FILE)), ("file", ("b", PC_FILE))], "data": {"purpose": "fine-tune"}},
            None,
            "Too many files",
        ),
    ]
    for kwargs, param, message in cases:
        resp = await api.post("/v1/files", **kwargs)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == param and message in error["message"], error
    assert stored(tmp_path) == []


async def test_tenants_see_only_their_own_files(make_server, tmp_path):
    _, client = await make_server(api_keys_file=keys_file(tmp_path))
    acme, globex, admin = client(ACME).files, client(GLOBEX).files, client(ADMIN).files
    mine = await acme.create(file=("a.jsonl", PC_FILE), purpose="fine-tune")
    theirs = await globex.create(file=("g.jsonl", CHAT_FILE), purpose="fine-tune")
    shared = await admin.create(file=("s.jsonl", CHAT_FILE), purpose="fine-tune")
    assert [f.id async for f in acme.list()] == [mine.id]
    assert [f.id async for f in globex.list()] == [theirs.id]
    assert [f.id async for f in admin.list()] == [shared.id]  # an admin's own files: the shared ones
    for other in (globex, admin):
        for call in (other.retrieve, other.content, other.delete):
            with pytest.raises(openai.NotFoundError):  # 404, never 403: another's file does not exist
                await call(mine.id)
    assert (await acme.content(mine.id)).content == PC_FILE  # still there
    with pytest.raises(openai.AuthenticationError):
        await client("wrong-key").files.list()
    with pytest.raises(openai.AuthenticationError):
        await client("wrong-key").files.create(file=("a.jsonl", PC_FILE), purpose="fine-tune")
    assert sorted(p.name for p in files_root(tmp_path).iterdir()) == [SHARED_OWNER, "acme", "globex"]


async def test_quota_of_stored_bytes_per_tenant(make_server, tmp_path):
    _, client = await make_server(
        api_keys_file=keys_file(tmp_path), max_file_bytes_per_tenant=2 * len(PC_FILE) + 1
    )
    acme = client(ACME).files
    first = await acme.create(file=("1.jsonl", PC_FILE), purpose="fine-tune")
    await acme.create(file=("2.jsonl", PC_FILE), purpose="fine-tune")
    before = stored(tmp_path)
    with pytest.raises(openai.RateLimitError) as e:
        await acme.create(file=("3.jsonl", PC_FILE), purpose="fine-tune")
    assert e.value.code == "quota_exceeded" and "tenant 'acme'" in e.value.message
    assert stored(tmp_path) == before
    await client(GLOBEX).files.create(file=("g.jsonl", PC_FILE), purpose="fine-tune")  # each tenant its own
    await acme.delete(first.id)
    await acme.create(file=("3.jsonl", PC_FILE), purpose="fine-tune")  # room again


async def test_concurrent_uploads_never_pass_the_quota_together(make_server, tmp_path):
    _, client = await make_server(max_file_bytes_per_tenant=3 * len(PC_FILE))
    files = client().files

    async def upload(i):
        try:
            return await files.create(file=(f"{i}.jsonl", PC_FILE), purpose="fine-tune")
        except openai.RateLimitError:
            return None

    results = await asyncio.gather(*(upload(i) for i in range(8)))
    assert sum(r is not None for r in results) == 3
    assert len([f async for f in files.list()]) == 3


async def test_a_file_over_the_size_limit_is_a_413(make_server, tmp_path):
    api, client = await make_server(max_file_bytes=len(PC_FILE) - 1, max_upload_bytes=10)
    with pytest.raises(openai.APIStatusError) as e:  # the file part is over --max-file-bytes
        await client().files.create(file=("a.jsonl", PC_FILE), purpose="fine-tune")
    assert e.value.status_code == 413 and e.value.code == "payload_too_large"
    assert "file is larger than the limit of" in e.value.message
    # the whole body is over --max-file-bytes + 1 MiB: refused while it streams in, as /prefixes uploads
    big = {"file": ("a.jsonl", b"x" * (len(PC_FILE) + (1 << 20)))}
    resp = await api.post("/v1/files", files=big, data={"purpose": "fine-tune"})
    assert resp.status_code == 413 and f"the limit of {len(PC_FILE) - 1 + (1 << 20)} bytes" in resp.text
    assert stored(tmp_path) == []


async def test_files_survive_a_restart_and_leftovers_are_cleaned(make_server, tmp_path):
    _, client = await make_server()
    kept = await client().files.create(file=("a.jsonl", CHAT_FILE), purpose="fine-tune")
    leftover = files_root(tmp_path) / SHARED_OWNER / ".upload-killed.tmp"  # an upload killed mid-write
    leftover.mkdir()
    (leftover / "data.jsonl").write_bytes(PC_FILE[:10])
    _, client = await make_server()  # a new app (and store) over the same folders
    assert [f async for f in client().files.list()] == [kept]
    assert (await client().files.content(kept.id)).content == CHAT_FILE
    assert not leftover.exists()


async def test_a_fine_tune_dir_setting(make_server, tmp_path):
    _, client = await make_server(fine_tune_dir=tmp_path / "elsewhere")
    kept = await client().files.create(file=("a.jsonl", PC_FILE), purpose="fine-tune")
    assert (tmp_path / "elsewhere" / "files" / SHARED_OWNER / kept.id / "data.jsonl").read_bytes() == PC_FILE
    assert stored(tmp_path) == []
