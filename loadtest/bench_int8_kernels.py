"""The int8 linears alone: every linear shape of the default model (30 layers' q/k/v, o, gate/up and down,
and the lm_head; random weights), one pass over all of them per sample, per kernel, rounds alternating the
kernels. Prints milliseconds per pass (best and median) and the weight bytes per second.

    python -m loadtest.bench_int8_kernels [--rows 1,8,16] [--rounds 6]

Kernels (server/engine/kernels/cpu_decode.cpp): `linear_int8` (weight-only, each weight widened to
float32), `linear_a16` (int8 x int16, `--quantize int8`) and `linear_q8` (int8 x int8, `--quantize w8a8`);
the last two need AVX-512 VNNI.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.engine import kernels
from server.engine.quantize import quantize_int8

# SmolLM2-135M: hidden 576, 9 query and 3 K/V heads of 64, intermediate 1536, 30 layers, vocabulary 49152
LAYER_SHAPES = [
    (576 + 192 + 192, 576),
    (576, 576),
    (2 * 1536, 576),
    (576, 1536),
]  # [N, K]: qkv, o, gate_up, down
SHAPES = LAYER_SHAPES * 30 + [(49152, 576)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,8,16")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    if not (kernels.avx512() and kernels.load()):
        sys.exit("the int8 kernels need AVX-512 and a C++ compiler")
    ops = torch.ops.prefix_server
    names = ["linear_int8", *(["linear_a16", "linear_q8"] if kernels.vnni() else [])]
    packs = {"linear_int8": ops.pack_linear, "linear_a16": ops.pack_a16, "linear_q8": ops.pack_q8}
    torch.manual_seed(0)
    weights = []  # per shape: {kernel: packed weight}, packed scales, K
    for n, k in SHAPES:
        q, scales = quantize_int8(torch.randn(n, k) * 0.02)
        weights.append(({name: packs[name](q) for name in names}, ops.pack_linear(scales), k))
    nbytes = sum(n * k + n * k // 32 * 4 for n, k in SHAPES)  # int8 weights and float32 scales
    print(f"{len(SHAPES)} linears, {nbytes / 1e6:.0f} MB of weights and scales; ms per pass (best / median)")
    for rows in map(int, args.rows.split(",")):
        xs = {k: torch.randn(rows, k) for k in (576, 1536)}
        samples: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.rounds):
            for name in names:  # alternating: the machine's drift hits every kernel alike
                op = getattr(ops, name)
                start = time.perf_counter()
                for packed, scales, k in weights:
                    op(xs[k], packed[name], scales, None)
                samples[name].append(time.perf_counter() - start)
        cells = [
            f"{name} {min(v) * 1e3:.2f} / {statistics.median(v) * 1e3:.2f} ({nbytes / min(v) / 1e9:.0f} GB/s)"
            for name, v in samples.items()
        ]
        print(f"  {rows:3d} rows: " + "   ".join(cells))


if __name__ == "__main__":
    main()
