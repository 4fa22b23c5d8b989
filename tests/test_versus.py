"""`python -m loadtest --peer`: the comparison with an OpenAI-compatible peer, both sides our real app
in-process on tiny models (byte-level tokenizer: one token per character), a fake peer that refuses
`ignore_eos`, and the errors for an unreachable or refusing peer."""

from __future__ import annotations

import contextlib
import json
import statistics

import httpx
import pytest
from conftest import byte_tokenizer, make_tiny_model, tiny_app
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from loadtest import serverproc
from loadtest.__main__ import main
from loadtest.versus import VersusConfig, format_versus, load_tokenizer, make_texts, run_versus
from server.engine.engine import Engine


def seeded_app(tmp_path, name: str, seed: int) -> FastAPI:
    """Our real app on a tiny random model called `name` (its base model id in /v1/models)."""
    engine = Engine(make_tiny_model("llama-gqa", seed=seed), byte_tokenizer())
    return tiny_app(engine, tmp_path / name, model_name=name, max_batch_size=8, max_batch_wait_ms=2.0)


class Hosts(httpx.AsyncBaseTransport):
    """Routes by host to in-process apps (each app's lifespan starts on its first request, in the loop of
    the caller, and ends at aclose); any other host goes to the real network."""

    def __init__(self, apps: dict[str, FastAPI]):
        self.apps, self.started = apps, set()
        self.stack = contextlib.AsyncExitStack()
        self.network = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        app = self.apps.get(request.url.host)
        if app is None:
            return await self.network.handle_async_request(request)
        if request.url.host not in self.started:
            self.started.add(request.url.host)
            await self.stack.enter_async_context(app.router.lifespan_context(app))
        return await httpx.ASGITransport(app=app).handle_async_request(request)

    async def aclose(self) -> None:  # both clients close it: the second time there is nothing left
        await self.stack.aclose()
        await self.network.aclose()


@pytest.fixture
def tokenizer_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    byte_tokenizer().backend_tokenizer.save(str(path))
    return str(path)


SMALL = ["--requests", "4", "--model-tasks", "4", "--prompt-tokens", "6", "--new-tokens", "4"]
SMALL += ["--prefix-tokens", "5", "--repeats", "2", "--no-progress"]


def test_versus_between_two_real_apps(tmp_path, capsys, tokenizer_json):
    apps = {"ours": seeded_app(tmp_path, "tiny", 0), "peer": seeded_app(tmp_path, "peer-tiny", 1)}
    out = tmp_path / "res" / "versus.json"
    argv = ["--url", "http://ours", "--peer", "http://peer", "--tokenizer", tokenizer_json, *SMALL]
    assert main([*argv, "--json", str(out)], transport=Hosts(apps)) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0] == "4 requests, 6-token prompts, 4 new tokens, greedy; median of 2 runs each"
    registry = apps["ours"].state.server.components.registry
    assert [r.task_id for r in registry.list()] == []  # the tasks it created are deleted at the end
    assert lines[2] == "| server | model | one at a time, tok/s | 4 concurrent, tok/s |"
    assert lines[4].startswith("| ours http://ours | 4 tasks lt-0..lt-3, 5-token prefixes | ")
    assert lines[5].startswith("| peer http://peer | peer-tiny | ")
    assert lines[6].startswith("| ours / peer | | ")
    assert "usage.prompt_tokens: ours [6], peer [6]" in printed and "note:" not in printed
    assert f"wrote {out}" in printed

    result = json.loads(out.read_text())
    assert result["config"]["peer_model"] == "peer-tiny" and result["notes"] == []
    assert [len(p) for p in result["prompts"]] == [6] * 4  # one token per character
    assert len(set(result["prompts"])) == 4
    assert [(p["task_id"], p["num_virtual_tokens"]) for p in result["prefixes"]] == [
        (f"lt-{i}", 5) for i in range(4)
    ]
    for name in ("ours", "peer"):
        server = result["servers"][name]
        assert server["prompt_tokens"] == [6]
        for mode in ("one_at_a_time", "concurrent"):
            runs = server["runs"][mode]
            assert len(runs) == 2
            assert all(r["completion_tokens_each"] == [4] * 4 and r["completion_tokens"] == 16 for r in runs)
            assert all(r["tok_s"] == pytest.approx(16 / r["seconds"], rel=0.01) for r in runs)
            assert server["tok_s"][mode] == pytest.approx(
                statistics.median(r["tok_s"] for r in runs), abs=0.01
            )
    ours, peer = result["servers"]["ours"]["tok_s"], result["servers"]["peer"]["tok_s"]
    for mode in ("one_at_a_time", "concurrent"):
        assert result["ratio_ours_over_peer"][mode] == pytest.approx(ours[mode] / peer[mode], abs=1e-3)
    ratio_cells = [c.strip() for c in lines[6].split("|")[1:-1]]
    assert ratio_cells[2:] == [
        f"{result['ratio_ours_over_peer'][m]:.2f}" for m in ("one_at_a_time", "concurrent")
    ]


async def test_base_model_and_a_peer_that_refuses_ignore_eos(tmp_path, tokenizer_json):
    """--model-tasks 0 sends our base model's name; a peer that refuses ignore_eos is asked without it,
    and the tokens it really produced (usage) are what count."""
    peer = FastAPI()
    seen = []

    @peer.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "m1"}, {"id": "m2"}]}

    @peer.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        seen.append(body)
        if "ignore_eos" in body:
            detail = {"detail": [{"loc": ["body", "ignore_eos"], "msg": "Extra inputs are not permitted"}]}
            return JSONResponse(detail, status_code=422)
        return {"choices": [{"text": "x"}], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}

    transport = Hosts({"ours": seeded_app(tmp_path, "tiny", 0), "peer": peer})
    config = VersusConfig(
        url="http://ours",
        peer_url="http://peer",
        model_tasks=0,
        requests=2,
        prompt_tokens=5,
        new_tokens=3,
        repeats=1,
        tokenizer=tokenizer_json,
    )
    async with (
        httpx.AsyncClient(transport=transport, base_url=config.url) as ours_client,
        httpx.AsyncClient(transport=transport, base_url=config.peer_url) as peer_client,
    ):
        result = await run_versus(config, ours_client, peer_client, verbose=False)
    assert result["config"]["peer_model"] == "m1" and result["prefixes"] == []
    assert {b["model"] for b in seen} == {"m1"} and all(
        b["temperature"] == 0 and b["max_tokens"] == 3 for b in seen
    )
    assert result["servers"]["ours"]["model"] == "tiny"
    assert all(r["completion_tokens"] == 6 for r in result["servers"]["ours"]["runs"]["concurrent"])
    assert all(r["completion_tokens"] == 4 for r in result["servers"]["peer"]["runs"]["concurrent"])
    notes = result["notes"]
    assert notes[0].startswith("peer refused ignore_eos")
    assert notes[1] == "peer: expected 6 completion tokens a run (2 x 3), usage said [4]"
    table = format_versus(result)
    assert "note: peer refused ignore_eos" in table and "usage.prompt_tokens: ours [5], peer [7]" in table


def test_unreachable_peer_is_a_clear_error(tmp_path, capsys, tokenizer_json):
    url = f"http://127.0.0.1:{serverproc.free_port()}"
    argv = ["--url", "http://ours", "--peer", url, "--tokenizer", tokenizer_json, *SMALL]
    assert main(argv, transport=Hosts({"ours": seeded_app(tmp_path, "tiny", 0)})) == 2
    err = capsys.readouterr().err
    assert f"loadtest: peer: GET {url}/v1/models got no reply (ConnectError" in err
    assert "is it running?" in err and "Traceback" not in err


def test_peer_that_answers_non_2xx_is_a_clear_error(tmp_path, capsys, tokenizer_json):
    apps = {"ours": seeded_app(tmp_path, "tiny", 0), "peer": seeded_app(tmp_path, "peer-tiny", 1)}
    argv = [
        "--url",
        "http://ours",
        "--peer",
        "http://peer",
        "--peer-model",
        "nope",
        "--tokenizer",
        tokenizer_json,
    ]
    assert main([*argv, *SMALL], transport=Hosts(apps)) == 2
    err = capsys.readouterr().err
    assert (
        "loadtest: peer: POST http://peer/v1/completions (model 'nope'): expected 200, got HTTP 404: " in err
    )
    assert "model_not_found" in err and "Traceback" not in err


def test_versus_flags_need_peer(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--url", "http://x", "--json", "out.json"])
    assert exc.value.code == 2
    assert "--json goes with --peer URL" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--url", "http://x", "--peer", "http://y", "--requests", "0"])
    assert "requests must be >= 1, got 0" in capsys.readouterr().err


def test_texts_are_exact_token_counts_or_word_lists(tokenizer_json):
    tok, desc = load_tokenizer(tokenizer_json)
    assert desc == f"tokenizer {tokenizer_json}"
    texts = make_texts(tok, 3, 30, 5, 1, "s")
    assert [len(tok.encode(t, add_special_tokens=False).ids) for t in texts] == [30] * 3
    assert len(set(texts)) == 3
    words, desc = load_tokenizer("words")
    assert words is None and desc.startswith("fixed word list")
    assert make_texts(None, 2, 30, 5, 1, "s") == make_texts(None, 2, 30, 5, 1, "s")
    assert [len(t.split()) for t in make_texts(None, 2, 30, 5, 1, "s")] == [30, 30]
