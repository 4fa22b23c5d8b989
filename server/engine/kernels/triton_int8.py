"""Weight-only int8 linears on CUDA (issue #18's GPU half): a Triton kernel over Int8Linear's own layout,
the int8 weight [N, K] and its float32 scales [N, G] (G = K / 32, or 1 when 32 does not divide K).

A decode step reads every weight once and does little else with it, so its time is the weight read:
bfloat16 is 2 bytes a weight, int8 1 (+ 4 bytes of scale per 32), ~0.56x. Each program multiplies a
[block_m, 32] tile of x by the group's [32, block_n] int8 tile taken as x's dtype (integers up to 127 are
exact in bfloat16, float16 and float32) and adds that dot times the group's scales to a float32
accumulator: the weight is never widened in memory, and the scale is applied once per 32 products, to
the exact integer weights (weight-only int8 as GPTQ's and Marlin's kernels do it). `Config.k_groups` > 1
takes several groups a step instead (longer reads along K), scaling the widened tile before one dot:
which is faster on a given GPU is what loadtest/gpu_int8.py's sweep says. A few rows give few N tiles,
far fewer than a GPU's SMs, so K is split too (split-K, less as the rows grow, so the partial sums never
cost more traffic than the weight): each split writes float32 partial sums, and the
tile's last split to finish adds them in split order (an atomic count per tile says which is last; the
sums are never added atomically, so the same inputs give the same bits) and writes the result.

Rows beyond `MAX_KERNEL_ROWS` (prefill chunks) are compute-bound: there the weight is widened once into
a temporary and torch's matmul (cuBLAS) runs; the extra read is small beside such a GEMM.

Triton is imported on first use (the CPU server never needs it). Under Triton's interpreter
(TRITON_INTERPRET=1) the same kernel runs on CPU tensors, which is how tests/test_triton_int8.py checks it
on machines without a GPU; the interpreter's bfloat16 casts are wrong (Triton 3.6 to 3.9), so those tests
run float32 and float16. Speed is measured on a GPU only: `loadtest/gpu_int8.py`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUP_SIZE = 32  # engine/quantize.py's: the weights per scale along K (the kernel's K step)
ROW_BUCKETS = (16, 32, 64, 128, 256)  # `choose` tiles by the bucket a row count falls in
MAX_KERNEL_ROWS = ROW_BUCKETS[-1]  # more rows (a prefill chunk): widen the weight once, then cuBLAS
SPLIT_TARGET = 2  # split K until the grid holds about this many programs per SM


@dataclass(frozen=True)
class Config:
    """One launch's tiling: rows and output features per program, K splits, and Triton's warps and
    pipeline stages. `choose` picks one; loadtest/gpu_int8.py sweeps them."""

    block_m: int = 16
    block_n: int = 64
    split_k: int = 1
    k_groups: int = 1  # groups of 32 k per step; more than 1: the tile is scaled before its dot
    fused_reduce: bool = True  # split-K's sums added by the tile's last split (else by torch, after)
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two of at least 16 (tl.dot), got {value}")
        if self.split_k < 1:
            raise ValueError(f"split_k must be at least 1, got {self.split_k}")
        if self.k_groups < 1 or self.k_groups & (self.k_groups - 1):
            raise ValueError(f"k_groups must be a power of two, got {self.k_groups}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def interpreting() -> bool:
    """Whether Triton's interpreter is asked for (its kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


def available(device: torch.device) -> bool:
    """Whether the kernel runs on `device`: CUDA with Triton installed, or the CPU under its interpreter."""
    if _triton() is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: small, so the tests' shapes split K too
    return torch.cuda.get_device_properties(device).multi_processor_count


def warm_up_rows() -> tuple[int, ...]:
    """A row count in each of ROW_BUCKETS (1, 17, 33, ...): launching each once compiles every variant a
    weight's launches can meet (the row count itself is not specialized on)."""
    return tuple(1 if i == 0 else ROW_BUCKETS[i - 1] + 1 for i in range(len(ROW_BUCKETS)))


def choose(rows: int, n: int, k: int, device: torch.device) -> Config:
    """The default tiling for x [rows, k] times a weight [n, k]. It depends on the rows' bucket
    (ROW_BUCKETS) only, so rows 1 to 16 (the decode batches of up to 16) sum in the same order whatever
    their number."""
    bucket = next((b for b in ROW_BUCKETS if b >= rows), ROW_BUCKETS[-1])
    block_m = min(bucket, 64)
    block_n = 64
    n_tiles, groups = _cdiv(n, block_n), _cdiv(k, GROUP_SIZE)
    split = 1
    # At least 8 groups (256 k) a split, so each program streams enough to hide its latency; and the
    # splits' float32 sums (written and read: 8 bytes a row, output and split) at most the int8 weight's
    # bytes (~1 a k), so many rows split less.
    while (
        n_tiles * split < SPLIT_TARGET * _sm_count(device)
        and groups // (split * 2) >= 8
        and 8 * (split * 2) * bucket <= k
    ):
        split *= 2
    return Config(block_m=block_m, block_n=block_n, split_k=split)


@functools.cache
def _kernel(interpret: bool):
    """The jitted kernel; `interpret`: Triton's interpreter (decided when the function is decorated, so
    one of each is kept)."""
    triton, tl = _triton()

    # M (rows) not specialized on (Triton would compile apart for 1 and multiples of 16): every row count
    # of a block_m shares one compile, so the decode buckets' warm-up compiles what prefills use too.
    @triton.jit(do_not_specialize=["M"])
    def int8_linear(
        x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, count_ptr,
        M, N, K, G, stride_xm, stride_ym, stride_ws,
        GROUP: tl.constexpr, GROUPED: tl.constexpr, SCALE_TILE: tl.constexpr,
        HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, SPLITS: tl.constexpr, FUSED_REDUCE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr,
    ):  # fmt: skip
        """y[m, n] = sum_k x[m, k] * w[n, k] * s[n, k // GROUP] (+ bias[n]) over this program's K split.
        GROUPED (G = K / GROUP scales a row): each step's dot is one group's, scaled after (BLOCK_K = GROUP),
        or, SCALE_TILE, BLOCK_K spans several groups and the weight tile is scaled before its dot; else one
        scale a row, applied at the end. SPLITS > 1: each split's float32 sums go to ws[pid_k] ([SPLITS, M,
        N]); FUSED_REDUCE: the tile's last split to arrive (an atomic count per tile) adds them in split
        order, writes y and sets the count back to 0 for the next launch (CUTLASS's semaphore split-K, in
        the kernel: no second launch, and the same bits whichever split is last); else the host adds them."""
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        rk = tl.arange(0, BLOCK_K)  # [BLOCK_K]
        m_ok, n_ok = rm < M, rn < N
        # tl.full, not tl.zeros: the standard library's functions are jitted when triton is imported, and an
        # interpreter turned on after that cannot call them (the tests turn it on late).
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        # One group a step: its scales [BLOCK_N] are loaded a step ahead, so their latency hides behind a
        # dot (Triton pipelines the tiles' loads, not this small one).
        g_first = pid_k * K_STEPS * (BLOCK_K // GROUP)  # this split's first group
        s_next = tl.load(s_ptr + rn * G + g_first, mask=n_ok & (rn * 0 + g_first < G), other=0.0)  # [BLOCK_N]
        for step in range(0, K_STEPS):  # this split's K: K_STEPS x BLOCK_K from pid_k * K_STEPS * BLOCK_K
            k0 = (pid_k * K_STEPS + step) * BLOCK_K
            kk = k0 + rk
            k_ok = kk < K
            x = tl.load(
                x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0
            )  # [BLOCK_M, BLOCK_K], x's dtype
            q = tl.load(
                w_ptr + rn[None, :] * K + kk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0
            )  # [BLOCK_K, BLOCK_N] int8 (via float32: the interpreter's int8 -> bfloat16 cast is wrong)
            if SCALE_TILE:  # several groups a step: the tile widened and scaled by its groups' scales
                gs = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)  # [groups a step]
                s = tl.load(
                    s_ptr + rn[None, :] * G + gs[:, None], mask=n_ok[None, :] & (gs < G)[:, None], other=0.0
                )  # [groups a step, BLOCK_N] float32
                w = tl.reshape(q.to(tl.float32), (BLOCK_K // GROUP, GROUP, BLOCK_N)) * s[:, None, :]
                acc += tl.dot(x, tl.reshape(w, (BLOCK_K, BLOCK_N)).to(x.dtype), input_precision=PRECISION)
            else:
                dot = tl.dot(x, q.to(tl.float32).to(x.dtype), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
                if GROUPED:  # BLOCK_K is one group
                    s_step = s_next
                    g = k0 // GROUP + 1
                    s_next = tl.load(s_ptr + rn * G + g, mask=n_ok & (rn * 0 + g < G), other=0.0)
                    acc += dot * s_step[None, :]
                else:
                    acc += dot
        if not GROUPED:  # one scale per output feature
            acc *= tl.load(s_ptr + rn, mask=n_ok, other=0.0)[None, :]
        out = rm[:, None] * stride_ym + rn[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        if SPLITS > 1:
            tl.store(ws_ptr + pid_k * stride_ws + out, acc, mask=ok)  # this split's sums
        if SPLITS > 1 and FUSED_REDUCE:  # (else the host adds the splits)
            tile = pid_m * tl.num_programs(0) + pid_n
            # Every warp's stores done (the barrier) before one thread's release of the count; the last
            # split's acquire then sees every split's sums (read past L1, which is not coherent).
            tl.debug_barrier()
            if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
                acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
                for i in range(0, SPLITS):  # in split order, not arrival order: deterministic
                    acc += tl.load(ws_ptr + i * stride_ws + out, mask=ok, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=ok)
                tl.atomic_xchg(count_ptr + tile, 0)
        if SPLITS == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=ok)

    return int8_linear


def launch_constexprs(config: Config, k: int, groups: int, dtype: torch.dtype, has_bias: bool) -> dict:
    """The kernel's compile-time arguments for a weight [N, k] with `groups` scales a row and x of `dtype`
    (SPLITS: the launch's K splits, split_k or fewer where it does not divide the steps evenly)."""
    block_k = GROUP_SIZE * config.k_groups
    k_per_split = _cdiv(_cdiv(k, block_k), config.split_k) * block_k  # whole steps (so whole groups)
    return dict(
        GROUP=GROUP_SIZE, GROUPED=groups > 1, SCALE_TILE=groups > 1 and config.k_groups > 1,
        HAS_BIAS=has_bias, PRECISION="ieee" if dtype == torch.float32 else "tf32",  # float32: in full, not TF32
        SPLITS=_cdiv(k, k_per_split), FUSED_REDUCE=config.fused_reduce,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k, K_STEPS=k_per_split // block_k,
    )  # fmt: skip


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """x [..., K] (float32, bfloat16 or float16) times the int8 weight [N, K] with float32 scales [N, G]
    (+ bias [N]) -> [..., N] in x's dtype, accumulated in float32. `config`: a tiling to use instead of
    `choose`'s (and the kernel even past MAX_KERNEL_ROWS)."""
    n, k = weight.shape
    groups = scales.shape[1]
    if (
        x.shape[-1] != k
        or weight.dtype != torch.int8
        or scales.shape[0] != n
        or groups not in (1, k // GROUP_SIZE)
    ):
        raise ValueError(
            f"int8 linear: expected x [..., {k}], an int8 weight [{n}, {k}] and scales [{n}, "
            f"{k // GROUP_SIZE} or 1], got x {tuple(x.shape)}, {weight.dtype} {tuple(weight.shape)} and "
            f"scales {tuple(scales.shape)}"
        )
    if groups > 1 and k % GROUP_SIZE:
        raise ValueError(f"int8 linear: grouped scales need K a multiple of {GROUP_SIZE}, got {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # [M, K]
    rows = x2.shape[0]
    # Also where the kernel cannot run: a CPU tensor outside the interpreter.
    if rows == 0 or (config is None and rows > MAX_KERNEL_ROWS) or not (x.is_cuda or interpreting()):
        # Widened straight into x's dtype (no float32 copy of the weight: the lm_head's alone would be
        # 1 GB for a 1B model); the scale rounded to x's dtype first, a second rounding of bfloat16 size.
        w = (weight.view(n, groups, -1).to(x.dtype) * scales.to(x.dtype)[:, :, None]).view(n, k)
        return F.linear(x, w, bias)
    x2 = x2.contiguous()
    if x2.data_ptr() % 16:  # a view at an odd offset: copied, so x's alignment is always the one compiled for
        x2 = x2.clone()
    config = config or choose(rows, n, k, x.device)
    constexprs = launch_constexprs(config, k, groups, x.dtype, bias is not None)
    splits = constexprs["SPLITS"]
    y = torch.empty((rows, n), device=x.device, dtype=x.dtype)
    grid = (_cdiv(n, config.block_n), _cdiv(rows, config.block_m), splits)
    if splits > 1:
        ws = torch.empty((splits, rows, n), device=x.device, dtype=torch.float32)  # each split's sums
        counts = _counts(x.device, grid[0] * grid[1])  # [tiles] int32, 0 between launches
    else:
        ws = counts = y  # not read
    _kernel(interpreting())[grid](
        x2, weight, scales, bias if bias is not None else scales, y, ws, counts,
        rows, n, k, groups, x2.stride(0), n, rows * n,
        **constexprs, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if splits > 1 and not config.fused_reduce:
        total = ws.sum(0)  # [M, N] float32, the splits in order
        if bias is not None:
            total += bias
        y.copy_(total)
    return y.view(*lead, n)


MAX_TILES = 1 << 16  # output tiles of one split-K launch (the default tilings use a few hundred)
ARENA_INTS = 1 << 20  # counts handed to CUDA-graph captures, a chunk at a time (4 MB)
_EAGER_COUNTS: dict[tuple[torch.device, int], torch.Tensor] = {}  # (device, stream) -> [MAX_TILES] int32
_ARENA: dict[torch.device, list] = {}  # device -> [chunk, next free]: kept for good (graphs point into it)


def _counts(device: torch.device, tiles: int) -> torch.Tensor:
    """Split-K arrival counts for one launch, one int32 per output tile, all 0 (the launch's last splits
    set them back to 0). An eager launch shares its stream's buffer (launches on one stream never overlap;
    streams get their own). A launch being captured into a CUDA graph gets counts of its own, taken from a
    chunk zeroed before (so a replay runs no memset), never handed out again: a graph may replay while
    other work runs on another stream."""
    if tiles > MAX_TILES:
        raise ValueError(f"int8 linear: split-K over {tiles} output tiles, at most {MAX_TILES}")
    capturing = _capturing(device)
    arena = _ARENA.get(device)
    if arena is None and not capturing:  # on the first eager launch: a graph's warm-up runs eagerly first
        arena = _ARENA[device] = [torch.zeros(ARENA_INTS, dtype=torch.int32, device=device), 0]
    if capturing and (arena is None or arena[1] + tiles > arena[0].numel()):
        # The arena used up (or never made): counts of this launch's own, zeroed by a memset the graph
        # captures (correct, one memset a replay); never shared, since that memset runs only with its graph.
        return torch.zeros(tiles, dtype=torch.int32, device=device)
    if capturing:
        # Slices start 64-byte aligned, as a fresh buffer does: Triton specializes on a pointer's alignment,
        # and a new specialization would compile in the middle of the capture.
        start, arena[1] = arena[1], arena[1] + _cdiv(tiles, 16) * 16
        return arena[0][start : start + tiles]
    stream = _stream(device)
    counts = _EAGER_COUNTS.get((device, stream))
    if counts is None:
        counts = _EAGER_COUNTS[device, stream] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return counts


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
