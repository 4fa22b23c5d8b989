"""The load generator without a model: workload math, summaries, tables, and whole runs against a fake app."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import statistics
import tempfile
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loadtest.__main__ import main, output_paths
from loadtest.loadgen import LoadConfig, run_load
from loadtest.stats import RequestResult, compare_table, format_table, format_windows, percentile, summarize
from loadtest.workload import WORDS, make_plan, parse_dist, poisson_offsets, zipf_weights

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- workload ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "low", "high"),
    [
        ("const:32", 32, 32),
        ("uniform:4:128", 4, 128),
        ("uniform:7:7", 7, 7),
        ("lognormal:40:0.8:4:128", 4, 128),
        ("lognormal:40:0", 40, 40),
        ("choice:4,16,128", 4, 128),
    ],
)
def test_parse_dist_samples_within_bounds(spec, low, high):
    dist = parse_dist(spec)
    rng = random.Random(0)
    samples = [dist.sample(rng) for _ in range(2000)]
    assert dist.spec == spec
    assert all(isinstance(x, int) and low <= x <= high for x in samples)
    if low < high:
        assert len(set(samples)) > 1


def test_lognormal_mean_is_mean():
    dist = parse_dist("lognormal:50:0.5")
    rng = random.Random(1)
    assert statistics.fmean(dist.sample(rng) for _ in range(20000)) == pytest.approx(50, rel=0.03)


def test_choice_and_uniform_cover_their_values():
    rng = random.Random(2)
    assert {parse_dist("choice:4,128").sample(rng) for _ in range(200)} == {4, 128}
    assert {parse_dist("uniform:1:3").sample(rng) for _ in range(200)} == {1, 2, 3}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "unknown length distribution"),
        ("normal:3:1", "unknown length distribution 'normal:3:1': expected const:N"),
        ("const", "expected const:N, got 0 value(s)"),
        ("const:0", "N must be >= 1, got 0"),
        ("const:x", "expected an integer, got 'x'"),
        ("uniform:5", "expected uniform:LO:HI, got 1 value(s)"),
        ("uniform:9:3", "expected 1 <= LO <= HI, got LO=9 HI=3"),
        ("uniform:0:3", "expected 1 <= LO <= HI"),
        ("uniform:1.5:3", "expected an integer, got '1.5'"),
        ("lognormal:40", "got 1 value(s)"),
        ("lognormal:40:0.5:4", "got 3 value(s)"),
        ("lognormal:-1:0.5", "expected MEAN > 0 and SIGMA >= 0"),
        ("lognormal:nan:0.5", "expected MEAN > 0 and SIGMA >= 0"),
        ("lognormal:40:0.5:9:3", "expected 1 <= MIN <= MAX, got MIN=9 MAX=3"),
        ("choice:", "got no values"),
        ("choice:4,0", "every value must be >= 1"),
    ],
)
def test_parse_dist_refuses_bad_specs(spec, message):
    with pytest.raises(ValueError) as info:
        parse_dist(spec)
    assert message in str(info.value)


def test_bad_spec_on_the_command_line_names_it(capsys):
    with pytest.raises(SystemExit):
        main(["--url", "http://x", "--output-len", "uniform:9:3"])
    assert "expected 1 <= LO <= HI, got LO=9 HI=3" in capsys.readouterr().err


def test_zipf_weights():
    w = zipf_weights(4, 1.0)
    assert sum(w) == pytest.approx(1.0)
    assert w[0] / w[1] == pytest.approx(2.0) and w[0] / w[3] == pytest.approx(4.0)
    assert zipf_weights(3, 0.0) == pytest.approx([1 / 3] * 3)
    assert zipf_weights(1, 1.1) == [1.0]
    with pytest.raises(ValueError, match="at least 1 task"):
        zipf_weights(0, 1.0)
    with pytest.raises(ValueError, match="exponent must be >= 0"):
        zipf_weights(3, -1.0)


def test_poisson_schedule_statistics():
    rate = 20.0
    offsets = poisson_offsets(rate, random.Random(7), duration_s=500.0)
    gaps = [b - a for a, b in zip([0.0, *offsets], offsets, strict=False)]
    assert all(0 < t < 500 for t in offsets) and offsets == sorted(offsets)
    assert len(offsets) == pytest.approx(rate * 500, rel=0.05)  # count ~ Poisson(10000): sd 1%
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / rate, rel=0.05)  # exponential: sd == mean
    per_second = [0] * 500
    for t in offsets:
        per_second[int(t)] += 1
    assert statistics.variance(per_second) == pytest.approx(rate, rel=0.15)  # Poisson: variance == mean
    assert len(poisson_offsets(rate, random.Random(7), count=123)) == 123
    with pytest.raises(ValueError, match="rate must be > 0"):
        poisson_offsets(0.0, random.Random(0), count=3)
    with pytest.raises(ValueError, match="exactly one"):
        poisson_offsets(1.0, random.Random(0), count=3, duration_s=2.0)


def test_plan_is_seeded_and_content_does_not_depend_on_rate():
    args = dict(
        seed=3,
        tasks=["lt-0", "lt-1", "lt-2"],
        zipf_s=1.1,
        prompt_len=parse_dist("uniform:5:9"),
        output_len=parse_dist("uniform:4:128"),
    )
    slow, fast = make_plan(rate=1.0, count=300, **args), make_plan(rate=50.0, count=300, **args)
    assert make_plan(rate=1.0, count=300, **args) == slow
    assert [(p.task_id, p.prompt, p.max_new_tokens) for p in slow] == [
        (p.task_id, p.prompt, p.max_new_tokens) for p in fast
    ]
    assert slow[-1].offset_s > fast[-1].offset_s * 10
    p = slow[0]
    assert len(p.prompt.rstrip(".").split()) == p.prompt_words and 5 <= p.prompt_words <= 9
    assert {w.lower().rstrip(".") for w in p.prompt.split()} <= set(WORDS)
    counts = [sum(p.task_id == t for p in slow) for t in args["tasks"]]
    assert counts[0] > counts[1] > counts[2]  # Zipf: the first task is the most popular
    assert all(p.task_id is None for p in make_plan(rate=1.0, count=5, **args | {"tasks": []}))


# --- summaries and tables ------------------------------------------------------------------------------


def test_percentile_interpolates():
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(101)), 99) == 99
    assert percentile([10, 0, 20], 100) == 20 and percentile([10, 0, 20], 0) == 0
    assert percentile(list(range(1, 11)), 95) == pytest.approx(9.55)


def _result(i, start, status=200, latency=100.0, code=None, tokens=10, ttft=None):
    return RequestResult(i, "lt-0", 10, start, start, status, code, latency, ttft, tokens)


def test_summary_counts_rates_percentiles_and_windows():
    results = [_result(i, i * 1.0, latency=100.0 + i, ttft=5.0) for i in range(20)]  # 20 ok, 0..19 s
    results += [_result(20, 3.5, 429, 2.0, "queue_full", 0), _result(21, 4.5, 429, 4.0, "queue_full", 0)]
    results += [_result(22, 16.0, 500, 50.0, "internal", 0), _result(23, 17.0, 404, 1.0, "task_not_found", 0)]
    results += [_result(24, 18.0, None, 9.0, "ConnectError", 0), _result(25, 18.5, 200, 30.0, "boom", 1)]
    s = summarize(results, offered_rate=1.0, num_planned=26, arrival_span_s=20.0, window_s=15.0)
    assert s["counts"] == {
        "ok": 20,
        "rate_limited": 2,
        "client_error": 1,
        "server_error": 1,
        "transport": 1,
        "stream_error": 1,
    }
    assert s["error_codes"]["429 queue_full"] == 2 and s["error_codes"]["no-reply ConnectError"] == 1
    assert s["elapsed_s"] == pytest.approx(19.119)  # the last ok: sent at 19 s, 119 ms
    assert s["throughput_rps"] == pytest.approx(20 / 19.119, abs=1e-3)
    assert s["output_tokens_per_s"] == pytest.approx(200 / 19.119, abs=0.1)
    assert s["latency_ms"]["p50"] == pytest.approx(109.5) and s["latency_ms"]["max"] == 119
    assert s["ttft_ms"]["p99"] == 5.0
    assert s["time_to_429_ms"]["p50"] == pytest.approx(3.0)
    assert s["accepted"] == 24 and s["accepted_completed"] == 20
    w0, w1 = s["windows"]
    assert (w0["start_s"], w0["num_sent"], w0["num_ok"], w0["num_429"], w0["num_errors"]) == (0, 17, 15, 2, 0)
    assert w0["p99_ms"] == pytest.approx(percentile([100.0 + i for i in range(15)], 99), abs=0.01)
    assert (w1["num_sent"], w1["num_ok"], w1["num_errors"]) == (9, 5, 4)
    assert "0-15s 114" in format_windows(s) and "15-30s 119" in format_windows(s)
    table = format_table([s])
    assert (
        table.splitlines()[0].startswith("| rate/s |")
        and "|   1.00 |   26 | 20 |   2 |   1 |   2 |   1 |" in table
    )
    empty = summarize([], offered_rate=2.0, num_planned=0, arrival_span_s=1.0)
    assert empty["latency_ms"] is None and empty["windows"] == [] and empty["throughput_rps"] == 0.0
    assert "|   2.00 |    0 |" in format_table([empty])


def _fake_result(label, rates_and_values):
    runs = []
    for rate, tput, p99 in rates_and_values:
        ok = [_result(i, i * 0.1, latency=p99) for i in range(10)]
        s = summarize(ok, offered_rate=rate, num_planned=10, arrival_span_s=1.0)
        runs.append(s | {"throughput_rps": tput, "latency_ms": {"p50": p99 / 2, "p95": p99, "p99": p99}})
    return {"label": label, "runs": runs}


def test_compare_table_ratios():
    static = _fake_result("static", [(4.0, 2.0, 800.0), (8.0, 2.5, 3000.0)])
    cont = _fake_result("continuous", [(4.0, 3.0, 400.0), (16.0, 5.0, 900.0)])
    table = compare_table(static, cont)
    assert "offered rate 4 req/s" in table and "offered rate 8" not in table
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in table.splitlines()[2:]
    }
    assert rows["throughput req/s"] == ["2.00", "3.00", "1.50"]
    assert rows["latency p99 ms"] == ["800", "400", "0.50"]
    assert rows["TTFT p99 ms"] == ["-", "-", "-"]
    assert table.splitlines()[1].split("|")[2:4] == [" static ", " continuous "]
    with pytest.raises(ValueError, match=r"no offered rate in common: static has \[8.0\]"):
        compare_table(_fake_result("static", [(8.0, 1, 1)]), _fake_result("c", [(4.0, 1, 1), (2.0, 1, 1)]))
    single = compare_table(_fake_result("a", [(1.0, 1.0, 10.0)]), _fake_result("a", [(2.0, 2.0, 10.0)]))
    assert "offered rate 1 vs 2" in single and "A: a" in single


@pytest.mark.parametrize("out", ["r/x", "r/x.json", "r/x.png"])
def test_output_paths(out):
    assert output_paths(Path(out)) == (Path("r/x.json"), Path("r/x.png"))
    assert output_paths(Path("r/at-0.8")) == (Path("r/at-0.8.json"), Path("r/at-0.8.png"))


# --- whole runs against a fake server ------------------------------------------------------------------


def fake_app(num_tokens: int = 3) -> FastAPI:
    """/ready, /health, /prefixes/from-text and /generate (JSON or SSE); every 5th /generate gets a 429."""
    app = FastAPI()
    state = {"num_generate": 0, "versions": {}}
    app.state.fake = state

    @app.get("/ready")
    @app.get("/health")
    async def ready():
        return {"status": "ok"}

    @app.post("/prefixes/from-text", status_code=201)
    async def from_text(request: Request):
        body = await request.json()
        assert set(body) == {"task_id", "text"} and body["text"]
        version = state["versions"][body["task_id"]] = state["versions"].get(body["task_id"], 0) + 1
        return {"task_id": body["task_id"], "version": version}

    @app.get("/prefixes/{task_id}")
    async def get_prefix(task_id: str):
        if task_id not in state["versions"]:
            return JSONResponse({"error": {"code": "task_not_found", "message": "no"}}, status_code=404)
        return {"task_id": task_id, "version": state["versions"][task_id]}

    @app.delete("/prefixes/{task_id}", status_code=204)
    async def delete_prefix(task_id: str):
        state["versions"].pop(task_id)
        state.setdefault("deleted", []).append(task_id)

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        state["num_generate"] += 1
        if state["num_generate"] % 5 == 0:
            error = {"error": {"code": "queue_full", "message": "queue is full"}}
            return JSONResponse(error, status_code=429, headers={"Retry-After": "1"})
        if body["task_id"] not in state["versions"]:
            return JSONResponse({"error": {"code": "task_not_found", "message": "no"}}, status_code=404)
        assert body["ignore_eos"] is True and body["max_new_tokens"] >= 1
        usage = {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": body["max_new_tokens"]}
        await asyncio.sleep(0.002)
        if not body.get("stream"):
            return {
                "request_id": "r",
                "task_id": body["task_id"],
                "prefix_version": 1,
                "text": "x y z",
                "token_ids": [1, 2, 3],
                "finish_reason": "length",
                "usage": usage,
            }

        async def events():
            for i in range(num_tokens):
                yield f"data: {json.dumps({'type': 'token', 'token_id': i, 'text': ' w'})}\n\n"
                await asyncio.sleep(0.001)
            done = {
                "type": "done",
                "finish_reason": "length",
                "usage": usage,
                "prefix_version": 1,
                "task_id": body["task_id"],
                "request_id": "r",
            }
            yield f"data: {json.dumps(done)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.mark.parametrize("stream", [False, True])
def test_cli_run_against_fake_server(tmp_path, capsys, stream):
    out = tmp_path / "res" / "one"
    argv = ["--url", "http://fake", "--rates", "200", "--num-requests", "20", "--tasks", "3"]
    argv += ["--output-len", "uniform:4:16", "--seed", "1", "--label", "cont", "--out", str(out)]
    code = main([*argv, "--stream"] if stream else argv, transport=httpx.ASGITransport(app=fake_app()))
    assert code == 0
    printed = capsys.readouterr()
    assert "| rate/s |" in printed.out and "p99 ms per 15 s window" in printed.out
    assert "accepted 16, completed 16, 429s 4" in printed.out and "capacity ~" in printed.out
    assert "20/20 done" in printed.err  # not a terminal: plain progress lines
    result = json.loads((tmp_path / "res" / "one.json").read_text())
    assert result["label"] == "cont" and result["config"]["output_len"] == "uniform:4:16"
    (run,) = result["runs"]
    assert run["counts"] == {
        "ok": 16,
        "rate_limited": 4,
        "client_error": 0,
        "server_error": 0,
        "transport": 0,
        "stream_error": 0,
    }
    assert run["error_codes"] == {"429 queue_full": 4} and run["server_up_after"] is True
    assert run["time_to_429_ms"]["p99"] is not None and run["latency_ms"]["p99"] >= run["latency_ms"]["p50"]
    assert len(run["requests"]) == 20 and run["windows"][0]["num_sent"] == 20
    ok = [r for r in run["requests"] if r["status"] == 200]
    assert all(r["completion_tokens"] == r["max_new_tokens"] for r in ok)
    if stream:
        assert run["ttft_ms"]["p50"] is not None
        assert all(r["ttft_ms"] is not None and r["ttft_ms"] <= r["latency_ms"] for r in ok)
    else:
        assert run["ttft_ms"] is None
    assert (tmp_path / "res" / "one.png").read_bytes()[:8] == PNG_SIGNATURE


def test_sweep_then_compare(tmp_path, capsys):
    paths = []
    for label in ("static", "continuous"):
        out = tmp_path / label
        argv = ["--url", "http://fake", "--rates", "100,300", "--num-requests", "10", "--label", label]
        argv += ["--out", str(out), "--stream", "--no-progress", "--warmup", "2"]
        assert main(argv, transport=httpx.ASGITransport(app=fake_app())) == 0
        assert out.with_suffix(".png").read_bytes()[:8] == PNG_SIGNATURE  # latency vs offered load
        paths.append(str(out.with_suffix(".json")))
    assert [r["offered_rate"] for r in json.loads(Path(paths[0]).read_text())["runs"]] == [100.0, 300.0]
    capsys.readouterr()
    assert main(["--compare", *paths]) == 0
    table = capsys.readouterr().out
    assert "offered rate 100 req/s" in table and "offered rate 300 req/s" in table
    assert [c.strip() for c in table.splitlines()[1].split("|")[1:-1]] == [
        "metric",
        "static",
        "continuous",
        "B/A",
    ]
    assert main(["--compare", paths[0], str(tmp_path / "missing.json")]) == 2


async def test_run_load_with_injected_client_and_concurrency_cap():
    config = LoadConfig(
        url="http://fake",
        rates=(500.0,),
        duration_s=None,
        num_requests=12,
        num_tasks=2,
        output_len=parse_dist("const:5"),
        concurrency_limit=1,
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=fake_app()), base_url="http://fake"
    ) as client:
        result = await run_load(config, client, verbose=False)
    (run,) = result["runs"]
    assert run["counts"]["ok"] == 10 and run["counts"]["rate_limited"] == 2
    assert run["completion_tokens"] == 50
    starts = sorted((r["start_s"], r["start_s"] + r["latency_ms"] / 1000) for r in run["requests"])
    assert all(end <= nxt + 1e-3 for (_, end), (nxt, _) in itertools.pairwise(starts))  # one at a time


async def test_not_ready_server_is_a_clear_error():
    from loadtest.loadgen import LoadgenError

    app = FastAPI()

    @app.get("/ready")
    async def ready():
        return JSONResponse({"error": {"code": "not_ready", "message": "loading"}}, status_code=503)

    config = LoadConfig(url="http://fake", rates=(1.0,), duration_s=1.0, ready_timeout_s=0.1)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fake") as client:
        with pytest.raises(LoadgenError, match=r"did not answer 200 within 0.1 s \(HTTP 503\)"):
            await run_load(config, client, verbose=False)


@pytest.mark.parametrize("keep", [False, True])
def test_a_run_deletes_the_tasks_it_created_and_writes_outside_the_repo(tmp_path, capsys, monkeypatch, keep):
    """lt-0 existed before the run (kept); lt-1, lt-2 were made by it (deleted unless --keep-tasks). With no
    --out the results go to a new temporary folder, never into the checkout."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    app = fake_app()
    app.state.fake["versions"]["lt-0"] = 1
    argv = ["--url", "http://fake", "--rates", "200", "--num-requests", "5", "--tasks", "3", "--label", "t"]
    code = main([*argv, "--keep-tasks"] if keep else argv, transport=httpx.ASGITransport(app=app))
    assert code == 0
    printed = capsys.readouterr()
    assert sorted(app.state.fake["versions"]) == (["lt-0", "lt-1", "lt-2"] if keep else ["lt-0"])
    assert app.state.fake.get("deleted", []) == ([] if keep else ["lt-1", "lt-2"])
    (written,) = list(tmp_path.glob("prefix-server-loadtest-*/t.json"))
    assert f"wrote {written}" in printed.out
    assert json.loads(written.read_text())["machine"]["cores"] == os.cpu_count()


def test_a_busy_machine_is_named():
    from loadtest import machine

    assert machine.warnings({"busy_before": 0.05, "load_1m_at_end": 2.5, "cores": 2}) == []
    busy, loaded = machine.warnings({"busy_before": 0.6, "load_1m_at_end": 5.0, "cores": 2})
    assert "60% of the CPU was busy just before the run" in busy
    assert "load average was 5.0 on 2 cores" in loaded
    assert machine.warnings({"busy_before": None, "load_1m_at_end": None, "cores": None}) == []
