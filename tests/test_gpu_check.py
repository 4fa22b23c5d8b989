"""loadtest/gpu_check (issue #16's device check): the whole pipeline on tiny random models on the CPU
(`--device cpu --tiny`: every part in its child process, a real server, transformers' baseline), the
report's sections and Markdown; the time budget's skips; gpu_check.sh's syntax and its fallback report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import gpu_check

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "loadtest" / "gpu_check.sh"
TINY_MODELS = list(gpu_check.TINY_SHAPES)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFIX_SERVER_COMPILE"}
    return env | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def test_the_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_the_script_writes_a_report_when_the_driver_cannot_run(tmp_path):
    """Too little time for the driver: the JSON and the Markdown still exist and say why."""
    out = tmp_path / "out"
    env = _env() | {"GPU_CHECK_TOTAL_S": "20", "GPU_CHECK_SKIP_WHEELS": "1", "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 124, proc.stdout + proc.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["status"] == "driver failed" and report["exit_code"] == 124
    assert "wrote no report" in (out / "gpu_check.md").read_text()
    assert "the driver does not start" in (out / "gpu_check.log").read_text()
    # then issue #18's int8 measurement, on its own limit: it runs and reports (here: no CUDA to measure)
    int8 = json.loads((out / "gpu_int8.json").read_text())
    assert int8["issue"] == 18 and int8["bandwidth"]["status"] == "error"
    assert "Not measured:" in (out / "gpu_int8.md").read_text()


def test_a_budget_too_small_skips_every_part_and_still_reports(tmp_path):
    out = tmp_path / "out"
    argv = [
        "--out",
        str(out),
        "--device",
        "cpu",
        "--tiny",
        "--budget-s",
        "1",
        "--workdir",
        str(tmp_path / "w"),
    ]
    assert gpu_check.main(argv) == gpu_check.PARTS_NOT_OK
    report = json.loads((out / "gpu_check.json").read_text())
    parts = report["parts"]
    assert list(parts) == ["prepare"] + [
        f"{p}:{m}" for m in TINY_MODELS for p in ("engine", "transformers", "http")
    ]
    assert parts["prepare"]["status"] == "skipped" and "time budget" in parts["prepare"]["error"]
    assert all(p["status"] == "skipped" for p in parts.values())
    assert all(g["measured"] is None and g["met"] is None for g in report["goals"])
    md = (out / "gpu_check.md").read_text()
    assert "| prepare | skipped |" in md and "## Goals" in md


def test_goals_and_markdown_from_figures():
    w = gpu_check.FULL
    engine = {f"tokens_per_s:{n}": {"tokens_per_s": 100.0 * n} for n in w.levels}
    engine |= {f"step_time:{n}": {"step_ms": 2.0, "floor_ms": 1.0, "ratio_to_floor": 2.0} for n in w.levels}
    engine |= {
        "one_task": {"tokens_per_s": 25600.0},
        "exactness": {
            "rows": 8,
            "equal": 7,
            "differences": [
                {"row": 3, "first_difference_at": 5, "margin_batch": 0.001, "margin_alone": 0.002}
            ],
        },
        "counters": {"after_start_up": {"dynamo_unique_graphs": 0, "cuda_graph_captures": 1}},
        "compiled_at_end": True,
        "compile": {"ok": True, "finished": True, "wall_s": 12.0},
    }
    http = {f"tokens_per_s:{n}": {"tokens_per_s": 90.0 * n} for n in w.levels} | {
        "one_task": {"tokens_per_s": 30000.0}
    }
    hf = {
        "mode": "continuous_batching_context_manager",
        "levels": {str(n): {"tokens_per_s": 20.0 * n} for n in w.levels},
    }
    report = {
        "mode": {"tiny": False, "dtype": "bfloat16", "device": "cuda"},
        "workload": gpu_check.asdict(w),
        "models": {"llama-3.2-1b": {"engine": engine, "http": http, "transformers": hf}},
        "parts": {},
    }
    goals = {g["goal"].split(": ", 1)[1]: g for g in gpu_check.goals(report)}
    ratio = goals["engine tokens/s / transformers' own batching"]
    assert ratio["measured"] == 5.0 and ratio["met"] is True
    assert goals["HTTP tokens/s / transformers' own batching"]["measured"] == 4.5
    assert goals["decode step at 64 rows / weight-read floor"]["met"] is True
    assert goals["256 tasks / one task (engine)"]["measured"] == 1.0
    assert goals["256 tasks / one task (HTTP)"]["met"] is False  # 23040 / 30000
    recompiles = next(g for k, g in goals.items() if k.startswith("compiles / graph captures"))
    assert recompiles["measured"] == 1 and recompiles["met"] is False
    exact = next(g for k, g in goals.items() if k.startswith("mixed-task batch"))
    assert exact["measured"] == 7 and exact["met"] is False
    md = gpu_check.render_markdown(report | {"goals": gpu_check.goals(report)})
    assert "| 64 | 6400.0 | 5760.0 | 1280.0 | 5.00 | 4.50 |" in md
    assert "row 3 parts at token 5" in md


@pytest.mark.slow
def test_tiny_cpu_run_writes_every_section(tmp_path):
    """The whole pipeline, each part in its own process, on the CPU (about a minute on 2 cores)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "loadtest.gpu_check", "--out", str(out), "--device", "cpu", "--tiny"]
    cmd += ["--budget-s", "300", "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "gpu_check: [" in proc.stdout  # progress lines with elapsed seconds
    report = json.loads((out / "gpu_check.json").read_text())
    for section in ("environment", "bandwidth", "models", "goals", "parts", "workload", "mode"):
        assert report[section], section
    bad = {k: p for k, p in report["parts"].items() if p["status"] != "ok"}
    assert not bad, json.dumps(bad, indent=1)[:4000]
    assert report["bandwidth"]["gb_per_s"] > 0
    levels = gpu_check.TINY.levels
    for name in TINY_MODELS:
        m = report["models"][name]
        assert m["weight_bytes"] > 0 and m["floor_ms"] > 0
        engine, http, hf = m["engine"], m["http"], m["transformers"]
        for key in ["exactness", "one_task", "churn", "warm_up"] + [
            f"{kind}:{n}" for kind in ("tokens_per_s", "step_time") for n in levels
        ]:
            assert "status" not in engine[key], (name, key, engine[key])
        assert engine["exactness"]["rows"] == gpu_check.TINY.exact_rows
        assert engine["churn"]["rows_with_wrong_length"] == []
        assert engine["churn"]["aborted"] == 2 and engine["churn"]["hot_swapped_requests"] >= 4
        assert engine["step_time:4"]["ratio_to_floor"] > 0
        assert set(engine["counters"]["after_start_up"]) >= {"dynamo_unique_graphs", "cuda_graph_captures"}
        for n in levels:
            assert engine[f"tokens_per_s:{n}"]["short_replies"] == 0
            h = http[f"tokens_per_s:{n}"]
            assert h["errors"] == 0 and h["short_replies"] == 0, h
            assert h["prompt_tokens"] == [gpu_check.TINY.prompt_len]
            assert hf["levels"][str(n)]["tokens"] == n * gpu_check.TINY.waves * gpu_check.TINY.new_tokens
        assert http["one_task"]["errors"] == 0
        assert http[f"tokens_per_s:{min(levels)}"]["during"]["hot_swapped_tasks"] == 4
    assert len(report["goals"]) == 7
    assert all(g["measured"] is not None for g in report["goals"]), report["goals"]
    md = (out / "gpu_check.md").read_text()
    assert "| goal | measured | target | met |" in md
    logs = (out / "gpu_check.parts.log").read_text()
    assert "===== http:tiny-135m: server-tiny-135m.log (ok" in logs
    assert "| in flight | engine tok/s | HTTP tok/s |" in md and "| rows | decode step ms |" in md
