"""Issue #18's GPU half, measured: `--quantize int8` on CUDA (the Triton kernel of
server/engine/kernels/triton_int8.py) against bfloat16 on the same GPU, in one run of a minute or two.

    python -m loadtest.gpu_int8 --out OUT        # on the GPU; loadtest/gpu_check.sh runs it after #16's check
    python -m loadtest.gpu_int8 --out OUT --device cpu --tiny   # the pipeline on a CPU (Triton interpreted)

Writes OUT/gpu_int8.json (after every step) and OUT/gpu_int8.md. Sections, in order, each skipped when
--budget-s runs out:
1. linears: one pass over every linear of a Llama-3.2-1B-shaped model (16 layers' q, k, v, o, gate, up and
   down, and the lm_head; each its own random weight, so little of a pass sits in L2), captured as one CUDA
   graph per variant and replayed: bfloat16 (cuBLAS), int8 on the Triton kernel, and int8 widened in every
   call (CUDA's int8 before the kernel), at 1, 16, 64 and 256 rows; each against its weight-read floor
   (the bytes it must read / the GPU's copy bandwidth).
2. engine: that shape served (random weights, bfloat16, and the same with --quantize int8; CUDA graphs):
   decode step at 1, 16 and 64 rows against each one's floor, tokens/s at 64 requests in flight of 64
   tasks (the two engines alternating), and a mixed-task batch under int8 equal to each request alone.
3. sweep: the kernel's tilings (block_n x split_k x k_groups) on the 1B shape's largest linears at 64
   and 1 rows, the fastest beside `choose`'s pick, to set its defaults from (with what time is left).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from loadtest import gpu_check as gc

LINEAR_ROWS = (1, 16, 64, 256)
SWEEP_ROWS = (64, 1)  # 64 first: the serving goal's batch
# (block_n, split_k, k_groups): every block_n x split_k with one group a step, and a few with four
SWEEP_TILINGS = [(bn, sk, 1) for bn in (32, 64, 128) for sk in (1, 2, 4, 8, 16)] + [
    (bn, sk, 4) for bn in (64, 128) for sk in (1, 4)
]  # all with the split-K sums added in the kernel (`choose`'s tiling is also run with torch adding them)
TINY_TILINGS = [(32, 1, 1), (64, 2, 1), (64, 1, 2), (32, 2, 2)]
WORKLOAD = gc.Workload(levels=(1, 16, 64), new_tokens=64, waves=1, exact_rows=8, exact_new_tokens=16)
TINY_WORKLOAD = gc.Workload(levels=(1, 4), prompt_len=8, new_tokens=4, waves=1, exact_rows=4,
                            exact_new_tokens=5, step_warm=1, step_timed=2, kv_cache_bytes=64 << 20)  # fmt: skip


def linear_shapes(shape: dict) -> list[tuple[int, int]]:
    """[N, K] of every linear a decode step runs: each layer's q, k, v, o, gate, up, down; the lm_head."""
    h, inter, d = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    layer = [(q, h), (kv, h), (kv, h), (h, q), (inter, h), (inter, h), (h, inter)]
    return layer * shape["num_hidden_layers"] + [(shape["vocab_size"], h)]


def timer(ctx: gc.Ctx):
    """fn, reps -> ms per call: on CUDA `reps` calls captured in one graph and replayed (a small kernel's
    launch from Python costs more than the kernel), the median of 5 replays; on a CPU, plain calls."""
    import torch

    def cuda_ms(fn, reps: int) -> float:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # compiles, allocates: outside the graph
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        graph.replay()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / reps)
        del graph
        return statistics.median(times)

    def cpu_ms(fn, reps: int) -> float:
        fn()
        started = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - started) * 1000 / reps

    return cuda_ms if ctx.device.startswith("cuda") else cpu_ms


class Linears:
    """Every linear of the shape, in bfloat16 and in int8 with its scales (random values)."""

    def __init__(self, ctx: gc.Ctx, shape: dict):
        import torch

        self.shapes = linear_shapes(shape)
        dev, dtype = ctx.device, gc.torch_dtype(ctx.dtype)
        gen = torch.Generator(device=dev).manual_seed(0)
        self.dtype, self.device = dtype, dev
        self.float = [torch.randn(n, k, device=dev, generator=gen).to(dtype) * 0.02 for n, k in self.shapes]
        self.int8 = [self.random_int8(n, k, gen) for n, k in self.shapes]
        self.bytes = {
            "bfloat16": sum(w.numel() * w.element_size() for w in self.float),
            "int8": sum(q.numel() + s.numel() * 4 for q, s in self.int8),
        }

    def random_int8(self, n: int, k: int, gen=None) -> tuple:
        """A random int8 weight [n, k] and its float32 scales [n, k / 32]."""
        import torch

        q = torch.randint(-127, 128, (n, k), device=self.device, generator=gen, dtype=torch.int8)
        return q, torch.rand(n, k // 32, device=self.device, generator=gen) * 1e-3

    def copies(self, n: int, k: int, count: int) -> list:
        """`count` int8 weights [n, k] with scales: the shape's own, then random ones of the same shape."""
        first = next(p for p in self.int8 if tuple(p[0].shape) == (n, k))
        return [first, *(self.random_int8(n, k) for _ in range(count - 1))]

    def inputs(self, rows: int) -> dict:
        import torch

        return {
            k: torch.randn(rows, k, device=self.device).to(self.dtype) for k in {k for _, k in self.shapes}
        }

    def variant(self, name: str, xs: dict):
        import torch.nn.functional as F

        from server.engine.kernels import triton_int8
        from server.engine.quantize import dequantize

        if name == "bfloat16":
            return lambda: [F.linear(xs[w.shape[1]], w) for w in self.float]
        if name == "int8_triton":
            return lambda: [triton_int8.linear(xs[q.shape[1]], q, s) for q, s in self.int8]
        return lambda: [F.linear(xs[q.shape[1]], dequantize(q, s, self.dtype)) for q, s in self.int8]


def kernel_check(ctx: gc.Ctx, lin: Linears) -> dict:
    """The kernel on this device against the widened weight's float32 product (torch), for every distinct
    shape at each row count: `choose`'s tiling with split-K's sums added in the kernel and by torch; each
    run twice (the same bits?), and row 0 alone against row 0 in the batch (the same bits where the tiling
    is; informative where block_m differs)."""
    import dataclasses

    import torch
    import torch.nn.functional as F

    from server.engine.kernels import triton_int8
    from server.engine.quantize import dequantize

    cases = []
    for n, k in sorted(set(lin.shapes)):
        q, s = next(p for p in lin.int8 if tuple(p[0].shape) == (n, k))
        w = dequantize(q, s, torch.float32)
        for rows in (1, 4) if ctx.tiny else LINEAR_ROWS:
            x = torch.randn(rows, k, device=lin.device).to(lin.dtype)
            want = F.linear(x.float(), w)  # [rows, n] float32
            chosen = triton_int8.choose(rows, n, k, x.device)
            for fused in (True, False):
                cfg = dataclasses.replace(chosen, fused_reduce=fused)
                got, again = (triton_int8.linear(x, q, s, None, cfg) for _ in range(2))
                alone = triton_int8.linear(x[:1], q, s, None, cfg)
                err = ((got.float() - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()
                cases.append({"n": n, "k": k, "rows": rows, "split_k": chosen.split_k, "fused_reduce": fused,
                              "rel_err": float(f"{err:.3g}"), "same_bits_twice": torch.equal(got, again),
                              "row0_alone_same_bits": torch.equal(alone[0], got[0])})  # fmt: skip
    tolerance = 1e-2 if lin.dtype != torch.float32 else 1e-5  # bfloat16's rounding of the result
    return {
        "cases": cases,
        "tolerance": tolerance,
        "all_ok": all(c["rel_err"] < tolerance and c["same_bits_twice"] for c in cases),
        "max_rel_err": max(c["rel_err"] for c in cases),
    }


def linears_at(ctx: gc.Ctx, lin: Linears, rows: int, bandwidth: float | None) -> dict:
    ms = timer(ctx)
    xs = lin.inputs(rows)
    out = {"rows": rows, "linears": len(lin.shapes)}
    for name in ("bfloat16", "int8_triton", "int8_widened"):
        out[f"{name}_ms"] = round(ms(lin.variant(name, xs), 1 if ctx.tiny else 3), 4)
    out["int8_speedup"] = round(out["bfloat16_ms"] / out["int8_triton_ms"], 2)
    if bandwidth:
        for name, kind in (("bfloat16", "bfloat16"), ("int8_triton", "int8")):
            floor = lin.bytes[kind] / bandwidth * 1000
            out[f"{name}_floor_ms"] = round(floor, 4)
            out[f"{name}_vs_floor"] = round(out[f"{name}_ms"] / floor, 2)
    return out


def sweep(ctx: gc.Ctx, lin: Linears) -> dict:
    """Each tiling (block_n, split_k, k_groups) on the three largest distinct shapes at SWEEP_ROWS (the tiny
    rehearsal: one shape, four tilings); ms per call, best first. Stops at the budget with what it has."""
    import dataclasses

    from server.engine.kernels import triton_int8

    ms = timer(ctx)
    reps = 1 if ctx.tiny else 12
    results: list[dict] = []
    picks = sorted(set(lin.shapes), key=lambda nk: -nk[0] * nk[1])[: 1 if ctx.tiny else 3]
    tilings = TINY_TILINGS if ctx.tiny else SWEEP_TILINGS

    def timed(cfg, x, weights) -> float | str:
        """ms per call, the calls cycling over `weights` (so a shape that fits in L2 is still read from
        memory); or the error of a tiling this GPU cannot run (e.g. too much shared memory)."""
        calls = iter(range(1 << 30))

        def call():
            q, s = weights[next(calls) % len(weights)]
            return triton_int8.linear(x, q, s, None, cfg)

        try:
            return round(ms(call, reps), 4)
        except gc.OutOfTime:
            raise
        except Exception as e:
            return f"{type(e).__name__}: {str(e)[:160]}"

    try:
        for rows in SWEEP_ROWS:
            xs = lin.inputs(rows)
            for n, k in picks:
                weights = lin.copies(n, k, 1 if ctx.tiny else 4)
                chosen = triton_int8.choose(rows, n, k, weights[0][0].device)
                timings, failed = [], []
                for block_n, split_k, k_groups in tilings:
                    ctx.need(3, f"sweep {rows} x [{n}, {k}]")
                    cfg = triton_int8.Config(
                        block_m=chosen.block_m, block_n=block_n, split_k=split_k, k_groups=k_groups
                    )
                    t = timed(cfg, xs[k], weights)
                    row = {"block_n": block_n, "split_k": split_k, "k_groups": k_groups}
                    (timings if isinstance(t, float) else failed).append(
                        row | {"ms" if isinstance(t, float) else "error": t}
                    )
                if not timings:
                    results.append({"rows": rows, "n": n, "k": k, "failed": failed})
                    continue
                unfused = None
                if chosen.split_k > 1:  # choose's tiling with torch adding the splits: what fusing saves
                    unfused = timed(dataclasses.replace(chosen, fused_reduce=False), xs[k], weights)
                timings.sort(key=lambda r: r["ms"])
                mine = (chosen.block_n, chosen.split_k, chosen.k_groups)
                pick = next((r for r in timings if (r["block_n"], r["split_k"], r["k_groups"]) == mine), None)
                results.append(
                    {
                        "rows": rows,
                        "n": n,
                        "k": k,
                        "best": timings[0],
                        "chosen": {
                            "tiling": list(mine),
                            "ms": pick and pick["ms"],
                            "ms_torch_reduce": unfused,
                        },
                        "gb_per_s_best": round((n * k + n * k // 8) / timings[0]["ms"] / 1e6, 1),
                        "all": timings,
                        "failed": failed,
                    }
                )
    except gc.OutOfTime as e:
        return {"results": results, "stopped": str(e)}
    return {"results": results, "stopped": None}


def step_bytes(model) -> int:
    """The weight bytes one decode step reads: every linear's weight (and scales, biases); the embedding
    only through a tied lm_head (a step reads a few rows of it otherwise)."""
    import torch

    from server.engine.quantize import Int8Linear

    total = 0
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, Int8Linear)):
            total += (
                sum(t.numel() * t.element_size() for t in module.buffers())
                if isinstance(module, Int8Linear)
                else sum(p.numel() * p.element_size() for p in module.parameters())
            )
    return total


def engines(ctx: gc.Ctx, name: str, bandwidth: float | None) -> None:
    from server.engine.quantize import Int8Linear

    fixtures = {}
    for mode in ("off", "int8"):
        fx = ctx.step(f"load:{mode}", lambda m=mode: gc.Fixture(ctx, name, quantize=m), need_s=10)
        if not isinstance(fx, gc.Fixture):
            return
        fixtures[mode] = fx
        graphs = ctx.step(
            f"compile:{mode}",
            lambda f=fx: {
                "seconds": round(f.engine.compile(graphs=True), 1),
                **gc.compile_counters(f.engine),
            },
        )
        ctx.data[f"load:{mode}"] = {
            "seconds": round(fx.load_s, 1),
            "step_bytes": step_bytes(fx.engine.model),
            "int8_kernels": sorted(
                {str(m.kernel) for m in fx.engine.model.modules() if isinstance(m, Int8Linear)}
            ),
            "compiled": gc._compiled(fx.engine),
            "graphs": graphs,
        }
        ctx.step(
            f"warm_up:{mode}",
            lambda f=fx: (
                gc.run_in_flight(f.engine, [f.request(f"t{i}", 4) for i in range(8)], 8) or {"ok": True}
            ),
        )
    ctx.data["triton_compiles"] = {"after_warm_up": triton_compiles()}
    w = ctx.workload
    for rows in w.levels:
        for mode, fx in fixtures.items():
            floor = ctx.data[f"load:{mode}"]["step_bytes"] / bandwidth * 1000 if bandwidth else None
            ctx.step(
                f"step_time:{mode}:{rows}", lambda f=fx, r=rows, fl=floor: gc.step_time(f, r, fl), need_s=3
            )
    level = max(w.levels)
    for attempt in (1, 2):  # alternating: the GPU's clocks drift alike for both
        for mode, fx in fixtures.items():
            ctx.step(
                f"tokens_per_s:{mode}:{attempt}", lambda f=fx: gc.tokens_per_s(f, level, False), need_s=4
            )
    ctx.step("exactness:int8", lambda: gc.exactness(fixtures["int8"]), need_s=5)
    ctx.data["triton_compiles"] |= {"end": triton_compiles()}  # more than after warm-up: compiled mid-serving


def triton_compiles() -> int | None:
    """Kernels the compiled (not interpreted) int8 kernel holds, over every device; None where unknown."""
    from server.engine.kernels import triton_int8

    try:
        caches = triton_int8._kernel(False).device_caches  # Triton 3.x: device -> (kernel cache, ...)
        return sum(len(c[0]) for c in caches.values())
    except Exception:  # another Triton's internals, or none
        return None


def summary(data: dict) -> list[str]:
    """The Markdown report."""
    lines = ["# int8 on the GPU (issue #18)", "", f"{data.get('environment', {}).get('gpu', '?')}; "
             f"copy bandwidth {data.get('bandwidth', {}).get('gb_per_s', '?')} GB/s", ""]  # fmt: skip
    check = data.get("kernel_check")
    if isinstance(check, dict) and "cases" in check:
        bad = [c for c in check["cases"] if c["rel_err"] >= check["tolerance"] or not c["same_bits_twice"]]
        lines += [f"Kernel check: {len(check['cases']) - len(bad)} of {len(check['cases'])} cases within "
                  f"{check['tolerance']} of torch's float32 product and the same bits twice (largest relative "
                  f"error {check['max_rel_err']}).", ""]  # fmt: skip
        lines += [f"- wrong: {c}" for c in bad[:10]]
    rows = [v for k, v in data.items() if k.startswith("linears:") and isinstance(v, dict) and "rows" in v]
    if rows:
        lines += [
            f"| rows | {data.get('dtype', 'bfloat16')} ms (vs floor) | int8 Triton ms (vs floor) | int8 widened ms "
            "| int8 speedup |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['rows']} | {r['bfloat16_ms']} ({r.get('bfloat16_vs_floor', '-')}x) | {r['int8_triton_ms']} "
                f"({r.get('int8_triton_vs_floor', '-')}x) | {r['int8_widened_ms']} | {r['int8_speedup']}x |"
            )
        lines.append("")
    steps = {
        k: v for k, v in data.items() if k.startswith("step_time:") and isinstance(v, dict) and "step_ms" in v
    }
    if steps:
        lines += ["| engine decode step | rows | ms | vs floor |", "|---|---|---|---|"]
        lines += [
            f"| {k.split(':')[1]} | {v['rows']} | {v['step_ms']} | {v.get('ratio_to_floor', '-')} |"
            for k, v in steps.items()
        ]
        lines.append("")
    tps = {
        k: v
        for k, v in data.items()
        if k.startswith("tokens_per_s:") and isinstance(v, dict) and "tokens_per_s" in v
    }
    if tps:
        level = next(iter(tps.values()))["in_flight"]
        lines += [f"| tokens/s, {level} in flight, {level} tasks | run | tokens/s |", "|---|---|---|"]
        lines += [f"| {k.split(':')[1]} | {k.split(':')[2]} | {v['tokens_per_s']} |" for k, v in tps.items()]
        lines.append("")
    compiles = data.get("triton_compiles")
    if compiles:
        lines += [f"Triton compiles of the int8 kernel: {compiles.get('after_warm_up')} after warm-up, "
                  f"{compiles.get('end')} at the end.", ""]  # fmt: skip
    exact = data.get("exactness:int8")
    if isinstance(exact, dict) and "equal" in exact:
        lines += [
            f"int8 mixed batch vs each request alone: {exact['equal']} of {exact['rows']} rows equal.",
            "",
        ]
    sweep_data = data.get("sweep") if isinstance(data.get("sweep"), dict) else {}
    for r in sweep_data.get("results", []):
        if "best" not in r:
            lines.append(f"sweep {r['rows']} x [{r['n']}, {r['k']}]: every tiling failed: {r['failed'][:2]}")
            continue
        best = r["best"]
        lines.append(
            f"sweep {r['rows']} x [{r['n']}, {r['k']}]: best block_n {best['block_n']} split_k {best['split_k']} "
            f"k_groups {best['k_groups']}: {best['ms']} ms ({r['gb_per_s_best']} GB/s); choose's "
            f"{tuple(r['chosen']['tiling'])}: {r['chosen']['ms']} ms"
        )
    if sweep_data.get("stopped"):
        lines.append(f"sweep {sweep_data['stopped']}")
    errors = {k: v["error"] for k, v in data.items() if isinstance(v, dict) and "error" in v}
    if errors:
        lines += ["", "Not measured:", *(f"- {k}: {e}" for k, e in errors.items())]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--tiny", action="store_true", help="tiny shapes (a CPU rehearsal under TRITON_INTERPRET=1)"
    )
    ap.add_argument("--budget-s", type=float, default=100.0)
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out: linears,engine,sweep")
    args = ap.parse_args(argv)
    if args.device == "cpu":  # the kernel can run there only under Triton's interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    name = gc.GOAL_MODEL["tiny" if args.tiny else "full"]
    shape = gc.shapes_for(args.tiny)[name]
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"  # the interpreter: no bfloat16
    ctx = gc.Ctx(
        workdir=Path(tempfile.mkdtemp(prefix="gpu-int8-")),
        device=args.device,
        dtype=dtype,
        tiny=args.tiny,
        compile="graphs",
        deadline=time.time() + args.budget_s,
        workload=TINY_WORKLOAD if args.tiny else WORKLOAD,
        result_path=out / "gpu_int8.json",
        data={"issue": 18, "model": name, "dtype": dtype, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
    )
    try:
        ctx.step("environment", lambda: gc.environment(args.device) | _triton_version())
        bandwidth = ctx.step("bandwidth", lambda: gc.copy_bandwidth(ctx)).get("bytes_per_s")
        lin = None
        if "linears" not in skip:
            lin = ctx.step("weights", lambda: Linears(ctx, shape), need_s=5)
            if isinstance(lin, Linears):
                ctx.data["weights"] = {"linears": len(lin.shapes), "bytes": lin.bytes}
                ctx.step("kernel_check", lambda: kernel_check(ctx, lin), need_s=5)
                for rows in LINEAR_ROWS if not args.tiny else (1, 4):
                    ctx.step(f"linears:{rows}", lambda r=rows: linears_at(ctx, lin, r, bandwidth), need_s=3)
            else:
                lin = None  # its error is in the report
        if "engine" not in skip:
            ctx.step("model", lambda: gc.build_model_folder(ctx, name, shape, seed=0), need_s=10)
            engines(ctx, name, bandwidth)
        if lin is not None and "sweep" not in skip:  # last: it only tunes, and takes what time is left
            ctx.step("sweep", lambda: sweep(ctx, lin), need_s=5)
    finally:
        ctx.save()
        (out / "gpu_int8.md").write_text("\n".join(summary(ctx.data)) + "\n")
    failed = [
        k for k, v in ctx.data.items() if isinstance(v, dict) and v.get("status") in ("error", "skipped")
    ]
    print(f"gpu_int8: done; {len(failed)} steps not measured{': ' + ', '.join(failed) if failed else ''}")
    return 3 if failed else 0


def _triton_version() -> dict:
    try:
        import triton
    except ImportError as e:
        return {"triton": f"not importable: {e}"}
    return {"triton": triton.__version__}


if __name__ == "__main__":
    sys.exit(main())
