"""loadtest/gpu_int8.py, issue #18's GPU measurement, rehearsed on the CPU: the same pipeline on tiny
shapes with the Triton kernel under its interpreter (`--device cpu --tiny`, TRITON_INTERPRET=1). The
figures mean nothing here; that every section runs and reports does (a GPU session has minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.gpu_int8 import linear_shapes

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("triton", reason="Triton is a dev dependency (pyproject.toml)")


def test_linear_shapes_are_a_decode_steps_linears():
    shape = dict(hidden_size=2048, intermediate_size=8192, head_dim=64, num_attention_heads=32,
                 num_key_value_heads=8, num_hidden_layers=16, vocab_size=128256)  # fmt: skip
    shapes = linear_shapes(shape)
    assert len(shapes) == 7 * 16 + 1 and shapes[-1] == (128256, 2048)
    assert shapes[:7] == [
        (2048, 2048),
        (512, 2048),
        (512, 2048),
        (2048, 2048),
        (8192, 2048),
        (8192, 2048),
        (2048, 8192),
    ]
    # Llama-3.2-1B's linears: 1.236 B weights with the (tied) lm_head
    assert sum(n * k for n, k in shapes) == 973_078_528 + 262_668_288


@pytest.mark.slow
def test_tiny_cpu_rehearsal_reports_every_section(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "loadtest.gpu_int8", "--out", str(tmp_path), "--device", "cpu", "--tiny"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_int8.json").read_text())
    check = data["kernel_check"]
    assert check["all_ok"] and len(check["cases"]) == 5 * 2 * 2  # tiny's 5 shapes, 2 row counts, 2 reductions
    for rows in (1, 4):
        lin = data[f"linears:{rows}"]
        assert lin["linears"] == 2 * 7 + 1 and lin["int8_triton_ms"] > 0 and "int8_triton_vs_floor" in lin
    assert data["load:int8"]["step_bytes"] < data["load:off"]["step_bytes"] / 3  # int8 vs float32 here
    assert data["load:int8"]["int8_kernels"] == ["triton"] and data["load:off"]["int8_kernels"] == []
    for mode in ("off", "int8"):
        assert data[f"step_time:{mode}:4"]["rows"] == 4
        assert data[f"tokens_per_s:{mode}:1"]["short_replies"] == 0
    assert data["exactness:int8"]["all_equal"] and data["exactness:int8"]["rows"] == 4
    sweep = data["sweep"]
    assert sweep["stopped"] is None and len(sweep["results"]) == 2 and len(sweep["results"][0]["all"]) == 4
    report = (tmp_path / "gpu_int8.md").read_text()
    assert "| rows | float32 ms" in report and "4 of 4 rows equal" in report and "sweep 64 x" in report
    assert "Kernel check: 20 of 20 cases" in report
