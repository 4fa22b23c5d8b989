"""/metrics (Prometheus) after a short load, X-Request-ID, and JSON log lines."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import app_client, make_tiny_model, tiny_app
from prometheus_client.parser import text_string_to_metric_families

from server.api.logs import JsonFormatter
from server.engine.engine import Engine


@pytest.fixture
async def api(tmp_path, tokenizer):
    engine = Engine(make_tiny_model("llama-gqa"), tokenizer)
    async with app_client(tiny_app(engine, tmp_path / "p", max_batch_wait_ms=1.0)) as c:
        yield c


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_after_a_short_load(api):
    await api.post("/prefixes/from-text", json={"task_id": "t", "text": "be brief"})
    for _ in range(3):
        r = await api.post(
            "/generate", json={"task_id": "t", "prompt": "hi", "max_new_tokens": 4, "ignore_eos": True}
        )
        assert r.status_code == 200
    await api.post("/generate", json={"prompt": "base", "max_new_tokens": 2, "ignore_eos": True})
    assert (await api.post("/generate", json={"task_id": "nope", "prompt": "x"})).status_code == 404
    resp = await api.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    m = samples(resp.text)
    assert m[("prefix_server_requests_total", (("status", "ok"), ("task", "t")))] == 3
    assert m[("prefix_server_requests_total", (("status", "ok"), ("task", "__base__")))] == 1
    assert m[("prefix_server_requests_total", (("status", "task_not_found"), ("task", "nope")))] == 1
    assert m[("prefix_server_tokens_total", (("kind", "completion"), ("task", "t")))] == 12
    assert m[("prefix_server_time_to_first_token_seconds_count", ())] == 4
    assert m[("prefix_server_request_latency_seconds_count", ())] == 4
    assert m[("prefix_server_queue_depth", ())] == 0 and m[("prefix_server_running_batch_size", ())] == 0
    assert m[("prefix_server_prefix_cache_misses_total", ())] >= 1
    assert m[("prefix_server_prefix_cache_hits_total", ())] >= 1
    assert m[("prefix_server_prefix_cache_bytes_in_use", ())] > 0
    # 4 requests of at most 4 tokens, one after another: each one prefill + decode steps.
    assert 4 <= m[("prefix_server_engine_steps_total", ())] <= 16
    assert m[("prefix_server_engine_busy_seconds_total", ())] > 0
    assert m[("prefix_server_compiled_decode", ())] == 0  # the eager step (tests/test_compiled.py compiles)


async def test_request_id_in_reply_header_and_logs(api, caplog):
    caplog.set_level(logging.INFO)
    r = await api.post("/generate", json={"prompt": "hi", "max_new_tokens": 2})
    assert r.headers["x-request-id"] == r.json()["request_id"]
    r2 = await api.post(
        "/generate", json={"prompt": "hi", "max_new_tokens": 2}, headers={"X-Request-ID": "abc-123"}
    )
    assert r2.headers["x-request-id"] == "abc-123" == r2.json()["request_id"]
    err = await api.post("/generate", json={"prompt": 5})
    assert err.status_code == 422 and err.headers["x-request-id"]
    lines = [json.loads(JsonFormatter().format(rec)) for rec in caplog.records]
    gen = [ln for ln in lines if ln["msg"] == "generate" and ln["request_id"] == "abc-123"]
    acc = [ln for ln in lines if ln["msg"] == "request" and ln["request_id"] == "abc-123"]
    assert gen and gen[0]["status"] == "ok" and gen[0]["completion_tokens"] == 2
    assert acc and acc[0]["status"] == 200 and acc[0]["path"] == "/generate"
