"""The CUDA int8 kernel (server/engine/kernels/triton_int8.py), run here by Triton's interpreter on CPU
tensors (TRITON_INTERPRET=1): the same kernel source a GPU compiles, so its indexing, group scales, K
splits, masks and bias are checked on machines without one; and compiled (not run) for an H100 by
Triton's own compiler, so what only a GPU build shows (shared memory, the split-K reduction's barrier and
atomics) is checked too. The interpreter's bfloat16 casts are wrong (Triton 3.6 to 3.9), so the runs are
float32 and float16; bfloat16 results and the speed are the GPU's (`cuda` tests, loadtest/gpu_int8.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import byte_tokenizer, make_tiny_model, run_joining
from test_quantize import assert_mixed_batch_equals_alone

from server.engine.engine import Engine
from server.engine.kernels import triton_int8
from server.engine.kernels.triton_int8 import Config, choose
from server.engine.quantize import Int8Linear, dequantize, quantize_int8, quantize_model, warm_up_kernels

pytest.importorskip("triton", reason="Triton is a dev dependency (pyproject.toml)")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def reference(x, q, scales, bias=None) -> torch.Tensor:
    """The weight-only linear in float64: x [..., K] times (q * scales) [N, K] (+ bias)."""
    w = dequantize(q, scales, torch.float64)
    return F.linear(x.double(), w, None if bias is None else bias.double())


def quantized(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return quantize_int8(torch.randn(n, k, generator=gen) * torch.rand(k, generator=gen) * 3)


# rows, N, K: one row to past a block_m; N ragged against block_n; K in groups of 32, or not (one scale a
# row); configs: choose's, and explicit ones that split K unevenly and tile differently.
CASES = [
    (1, 64, 256, None),
    (3, 80, 96, None),
    (17, 48, 512, None),
    (40, 100, 64, None),
    (5, 40, 40, None),  # 40 is no multiple of 32: a scale per output feature
    (2, 24, 1000, None),  # ... and K past one split
    (9, 64, 512, Config(split_k=3)),  # 16 groups in splits of 6, 6, 4
    (9, 64, 512, Config(block_m=32, block_n=16, split_k=16)),
    (33, 72, 160, Config(block_m=64, block_n=128, split_k=2)),
    (9, 64, 512, Config(k_groups=4)),  # the tile scaled before its dot: 4 groups a step
    (3, 80, 96, Config(k_groups=2, split_k=2)),  # ... 3 groups in steps of 2, one a split
    (5, 40, 40, Config(k_groups=4, split_k=2)),  # one scale a row: any step
    (9, 64, 512, Config(split_k=4, fused_reduce=False)),  # the splits added by torch
    (2, 24, 1000, Config(split_k=3, k_groups=2, fused_reduce=False)),
]


@pytest.mark.parametrize("rows, n, k, config", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_is_the_weight_only_linear_in_float32(rows, n, k, config, bias):
    q, scales = quantized(n, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    b = torch.randn(n) if bias else None
    got = triton_int8.linear(x, q, scales, b, config)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    want = reference(x, q, scales, b)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("rows, n, k", [(1, 64, 256), (20, 48, 96), (7, 40, 40)])
def test_kernel_in_float16_rounds_only_its_output(rows, n, k):
    """float16 x and bias: the integer weights are exact in float16 and the sums float32, so the result is
    the float64 one rounded once to float16 (half a unit in the last place, and the inputs' own rounding)."""
    q, scales = quantized(n, k, seed=3)
    x = torch.randn(2, rows, k, generator=torch.Generator().manual_seed(4)).half()
    b = torch.randn(n).half()
    got = triton_int8.linear(x, q, scales, b)
    assert got.dtype == torch.float16 and got.shape == (2, rows, n)
    want = reference(x, q, scales, b)
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


def test_split_k_leaves_its_counts_at_zero_and_adds_splits_in_order():
    """The fused reduction resets every tile's count (a graph replay finds them at 0) and gives the bits
    of torch adding the same float32 splits in order."""
    q, scales = quantized(200, 512, seed=10)
    x = torch.randn(20, 512, generator=torch.Generator().manual_seed(11))
    b = torch.randn(200)
    fused = triton_int8.linear(x, q, scales, b, Config(block_m=16, block_n=32, split_k=4))
    assert not triton_int8._EAGER_COUNTS[x.device, 0].any()
    host = triton_int8.linear(x, q, scales, b, Config(block_m=16, block_n=32, split_k=4, fused_reduce=False))
    torch.testing.assert_close(fused, host, rtol=1e-6, atol=1e-5)
    again = triton_int8.linear(x, q, scales, b, Config(block_m=16, block_n=32, split_k=4))
    assert torch.equal(fused, again)


def test_counts_for_captures_are_never_shared_and_eager_ones_are_per_stream(monkeypatch):
    """What a CUDA graph captures keeps counts no other launch touches (disjoint slices of a zeroed chunk;
    once it is used up, a buffer of the launch's own); eager launches share their stream's buffer. (CUDA's capture and
    streams stood in for by patching; the bookkeeping is the same.)"""
    cpu = torch.device("cpu")
    monkeypatch.setattr(triton_int8, "_ARENA", {})
    monkeypatch.setattr(triton_int8, "_EAGER_COUNTS", {})
    monkeypatch.setattr(triton_int8, "ARENA_INTS", 1000)
    capturing = [False]
    monkeypatch.setattr(triton_int8, "_capturing", lambda device: capturing[0])
    eager = triton_int8._counts(cpu, 300)  # the first eager launch also makes the first chunk
    assert eager.numel() == triton_int8.MAX_TILES and triton_int8._counts(cpu, 10) is eager
    monkeypatch.setattr(triton_int8, "_stream", lambda device: 7)
    assert triton_int8._counts(cpu, 10) is not eager  # another stream, another buffer
    capturing[0] = True
    slices = [triton_int8._counts(cpu, 400) for _ in range(5)]  # 2 a chunk of 1000
    ptrs = [(t.data_ptr(), t.data_ptr() + 4 * t.numel()) for t in slices]
    assert all(a_end <= b or b_end <= a for i, (a, a_end) in enumerate(ptrs) for b, b_end in ptrs[i + 1 :])
    assert all(t.numel() == 400 and not t.any() and t.data_ptr() % 64 == 0 for t in slices)
    storages = [t.untyped_storage().data_ptr() for t in slices]
    arena = triton_int8._ARENA[cpu][0].untyped_storage().data_ptr()
    # 400 + 400 from the arena; then, used up, each launch's own (zeroed by its graph), the arena kept
    assert storages[:2] == [arena, arena] and len({arena, *storages[2:]}) == 4


def test_a_rows_result_is_the_same_bits_alone_and_in_a_batch_and_run_to_run():
    """The K split depends on (N, K) only and partial sums add in a fixed order: row i's output does not
    depend on the other rows of its tile, nor on the run."""
    q, scales = quantized(64, 1024, seed=5)
    x = torch.randn(12, 1024, generator=torch.Generator().manual_seed(6))
    assert choose(1, 64, 1024, x.device).split_k == choose(12, 64, 1024, x.device).split_k > 1
    batch = triton_int8.linear(x, q, scales)
    assert torch.equal(batch, triton_int8.linear(x, q, scales))
    for i in (0, 5, 11):
        assert torch.equal(triton_int8.linear(x[i : i + 1], q, scales), batch[i : i + 1])


def test_an_unaligned_or_strided_input_gives_the_same_result():
    """x a view at an odd offset (copied first: the kernel is compiled for aligned inputs) or with a row
    stride (made contiguous): the same bits as a fresh x."""
    q, scales = quantized(48, 128, seed=12)
    fresh = torch.randn(3, 128)
    odd = torch.empty(3 * 128 + 1)[1:].view(3, 128)
    odd.copy_(fresh)
    assert odd.data_ptr() % 16
    wide = torch.zeros(3, 256)[:, :128]
    wide.copy_(fresh)
    want = triton_int8.linear(fresh, q, scales)
    assert torch.equal(triton_int8.linear(odd, q, scales), want)
    assert torch.equal(triton_int8.linear(wide, q, scales), want)


def test_many_rows_widen_the_weight_once_for_torchs_matmul(monkeypatch):
    """Past MAX_KERNEL_ROWS (a prefill chunk) the weight is widened and torch's linear runs; both paths
    give the weight-only linear."""
    monkeypatch.setattr(triton_int8, "MAX_KERNEL_ROWS", 4)
    q, scales = quantized(48, 128, seed=7)
    x = torch.randn(6, 128)
    b = torch.randn(48)
    calls = []
    monkeypatch.setattr(triton_int8, "_kernel", lambda interpret: calls.append(1))
    widened = triton_int8.linear(x, q, scales, b)
    assert not calls  # the kernel was not launched
    torch.testing.assert_close(widened.double(), reference(x, q, scales, b), rtol=1e-5, atol=1e-4)
    assert triton_int8.linear(x[:0], q, scales, b).shape == (0, 48)


def test_choose_splits_k_for_few_rows_and_less_for_many(monkeypatch):
    """On an H100-sized GPU (132 SMs): a decode batch's few N tiles split K until the grid fills it; every
    row count of a bucket gets the same tiling; 256 rows do not split a 2048-wide K (the splits' sums
    would cost more traffic than the weight)."""
    monkeypatch.setattr(triton_int8, "_sm_count", lambda device: 132)
    gpu = torch.device("cpu")  # only the SM count matters
    one = choose(1, 8192, 2048, gpu)
    assert (one.block_m, one.block_n, one.split_k) == (16, 64, 4)  # 128 N tiles x 4 >= 2 x 132
    assert all(choose(r, 8192, 2048, gpu) == one for r in (2, 7, 16))
    assert choose(2, 2048, 8192, gpu).split_k == 16  # 32 N tiles: split until >= 264 programs
    assert choose(64, 2048, 8192, gpu) == Config(block_m=64, block_n=64, split_k=16)  # 8 x 16 x 64 <= 8192
    assert choose(256, 8192, 2048, gpu).split_k == 1 and choose(256, 2048, 8192, gpu).split_k == 4
    assert choose(3, 128256, 2048, gpu).split_k == 1  # the lm_head fills the GPU by N alone


def test_bad_shapes_say_what_was_expected():
    q, scales = quantized(48, 128)
    with pytest.raises(
        ValueError, match=r"expected x \[\.\.\., 128\], an int8 weight \[48, 128\].*got x \(2, 64\)"
    ):
        triton_int8.linear(torch.randn(2, 64), q, scales)
    with pytest.raises(ValueError, match=r"got x .* torch.float32"):
        triton_int8.linear(torch.randn(2, 128), q.float(), scales)
    with pytest.raises(ValueError, match=r"scales \(48, 3\)"):
        triton_int8.linear(torch.randn(2, 128), q, scales[:, :3])
    with pytest.raises(ValueError, match="block_n must be a power of two of at least 16"):
        Config(block_n=24)
    with pytest.raises(ValueError, match="split_k must be at least 1"):
        Config(split_k=0)
    with pytest.raises(ValueError, match="k_groups must be a power of two, got 3"):
        Config(k_groups=3)
    with pytest.raises(ValueError, match=r"split-K over 70000 output tiles, at most 65536"):
        triton_int8._counts(torch.device("cpu"), 70_000)


def test_int8_linear_runs_on_triton_where_it_is_available(monkeypatch):
    """Int8Linear(kernel='triton'): the kernel where Triton runs (CUDA, or the CPU under its interpreter),
    weight-only in torch elsewhere; both the same linear up to float32 rounding."""
    torch.manual_seed(8)
    lin = torch.nn.Linear(64, 40)
    layer = Int8Linear(lin, "triton")
    assert layer.kernel == "triton" and layer.weight.shape == (40, 64) and layer.scales.shape == (40, 2)
    assert "Triton int8" in repr(layer)
    x = torch.randn(2, 3, 64)
    want = reference(x, layer.weight, layer.scales, lin.bias)
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
    on_triton = layer(x)
    monkeypatch.delenv("TRITON_INTERPRET")  # a CPU without the interpreter: torch's weight-only path
    plain = Int8Linear(lin, "triton")
    assert plain.kernel is None
    torch.testing.assert_close(plain(x), on_triton, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), on_triton, rtol=1e-5, atol=1e-5)  # the kernel's layer, widened


def test_quantize_model_takes_triton_on_cuda_or_under_the_interpreter(monkeypatch):
    """Default: the Triton kernel on CUDA, and on a CPU where TRITON_INTERPRET asks for the interpreter (a
    rehearsal of the GPU path, as here); otherwise a CPU's VNNI kernels. vnni=False: torch's path."""

    def kernels_of(model):
        return {m.kernel for m in model.modules() if isinstance(m, Int8Linear)}

    assert kernels_of(quantize_model(make_tiny_model("llama-gqa"), "int8")) == {"triton"}
    assert kernels_of(quantize_model(make_tiny_model("llama-gqa"), "w8a8")) == {"triton"}  # weight-only there
    assert kernels_of(quantize_model(make_tiny_model("llama-gqa"), "int8", vnni=False)) == {None}
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "triton" not in kernels_of(quantize_model(make_tiny_model("llama-gqa"), "int8"))
    # asked for where it cannot run (a CPU outside the interpreter): torch's weight-only path
    assert kernels_of(quantize_model(make_tiny_model("llama-gqa"), "int8", triton=True)) == {None}


def test_warm_up_runs_every_distinct_linear_at_every_rows_bucket(monkeypatch):
    """Engine.compile first runs each distinct int8 linear at one row count of each of choose's buckets
    (on a GPU: every compile serving can meet, before any capture); nothing where no linear is on Triton."""
    model = quantize_model(make_tiny_model("llama-gqa"), "int8", triton=True)
    shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, Int8Linear)}
    seen = []
    real = triton_int8.linear
    monkeypatch.setattr(triton_int8, "linear", lambda x, *a, **k: seen.append(x.shape[0]) or real(x, *a, **k))
    rows = triton_int8.warm_up_rows()
    assert rows == (1, 17, 33, 65, 129)  # one in each of ROW_BUCKETS
    assert warm_up_kernels(model) == len(shapes) * len(rows)
    assert sorted(set(seen)) == list(rows)
    assert warm_up_kernels(make_tiny_model("llama-gqa")) == 0  # float linears: nothing to compile


def test_mixed_batch_on_the_triton_kernel_equals_each_request_alone(monkeypatch):
    """Rows of different prefixes (and none) joining mid-flight, every linear on the Triton kernel, on the
    CUDA-graph step's code (static buffers, no capture on a CPU; the eager decode calls the same
    Int8Linears through transformers' forward, which every prefill here runs too): each row's greedy
    tokens are the tokens it gets alone, and the weight-only torch engine's (float32). Engine.compile
    warmed the kernel up first, every rows bucket (129 rows: no request here has that many)."""
    model = quantize_model(make_tiny_model("llama-gqa"), "int8", triton=True)
    assert model.lm_head.kernel == model.model.layers[0].self_attn.q_proj.kernel == "triton"
    engine = Engine(model, byte_tokenizer(), max_rows=4, max_virtual_tokens=32, max_seq_len=64)
    seen = []
    real = triton_int8.linear
    monkeypatch.setattr(triton_int8, "linear", lambda x, *a, **k: seen.append(x.shape[0]) or real(x, *a, **k))
    engine.compile(graphs=True)
    shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, Int8Linear)}
    assert engine.decoder.captures == 0 and seen.count(129) == len(shapes)
    requests, joins_at, batch = assert_mixed_batch_equals_alone(engine, new_tokens=(7, 4, 6, 4))
    torch_int8 = Engine(
        quantize_model(make_tiny_model("llama-gqa"), "int8", vnni=False), byte_tokenizer(), max_rows=4
    )
    want = requests()
    run_joining(torch_int8, want, joins_at)
    assert [r.output_token_ids for r in batch] == [r.output_token_ids for r in want]


H100_SHARED_BYTES = 232_448  # the most shared memory one program may use on an H100 (sm_90)


def compile_for_h100(config: Config, k: int, dtype: str = "bf16", grouped: bool = True, bias: bool = False):
    """The kernel compiled (not run) for sm_90 by the installed Triton, as `linear` would launch it for a
    weight [N, k] with the rows' block: no GPU needed, only Triton's bundled compiler."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = triton_int8._kernel(False)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    constexprs = triton_int8.launch_constexprs(config, k, k // 32 if grouped else 1, torch_dtype, bias)
    splits = constexprs["SPLITS"]
    f32 = "*fp32"
    signature = {
        "x_ptr": f"*{dtype}", "w_ptr": "*i8", "s_ptr": f32, "b_ptr": f"*{dtype}" if bias else f32,
        "y_ptr": f"*{dtype}", "ws_ptr": f32 if splits > 1 else f"*{dtype}",
        "count_ptr": "*i32" if splits > 1 else f"*{dtype}",
        "M": "i32", "N": "i32", "K": "i32", "G": "i32", "stride_xm": "i32", "stride_ym": "i32", "stride_ws": "i32",
    }  # fmt: skip
    signature |= dict.fromkeys(constexprs, "constexpr")
    aligned = {"N", "K", "stride_xm", "stride_ym", "stride_ws"}  # as the shapes here: multiples of 16
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(kernel.arg_names)
        if name.endswith("_ptr") or name in aligned
    }
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options), splits


# choose's tilings for a Llama-3.2-1B's shapes at 1, 16, 64 and 256 rows on 132 SMs, and the sweep's
# heaviest ones (block_m 64, split, four groups a step)
H100_CASES = [
    (Config(block_m=16, block_n=64, split_k=4), 2048, "bf16"),
    (Config(block_m=16, block_n=64, split_k=16), 8192, "bf16"),
    (Config(block_m=64, block_n=64, split_k=4), 2048, "bf16"),
    (Config(block_m=64, block_n=64, split_k=1), 2048, "bf16"),
    (Config(block_m=64, block_n=128, split_k=4, k_groups=4), 2048, "bf16"),
    (Config(block_m=64, block_n=128, split_k=1, k_groups=4), 8192, "bf16"),
    (Config(block_m=64, block_n=32, split_k=16), 8192, "bf16"),
    (Config(block_m=32, block_n=64, split_k=2, fused_reduce=False), 2048, "fp16"),
    (Config(block_m=16, block_n=64, split_k=2), 2048, "fp32"),
]


@pytest.mark.parametrize("config, k, dtype", H100_CASES)
def test_the_kernel_compiles_for_an_h100(config, k, dtype, monkeypatch, tmp_path):
    """What the interpreter cannot show: Triton's real compiler takes the kernel for sm_90, within the
    H100's shared memory, and the fused split-K reduction is a CTA barrier, then one acq_rel atomic add
    at GPU scope, loads of the splits past L1 (.cg), and an atomic reset."""
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compiled here and now, not taken from a cache
    compiled, splits = compile_for_h100(config, k, dtype, bias=dtype == "fp16")
    assert compiled.metadata.shared <= H100_SHARED_BYTES
    ptx = compiled.asm["ptx"]
    if splits > 1 and config.fused_reduce:
        assert "bar.sync" in ptx and "atom.global.gpu.acq_rel.add" in ptx and "ld.global.cg" in ptx
        assert "atom.global.gpu.acq_rel.exch" in ptx
    else:
        assert "atom." not in ptx


def test_a_kernel_with_one_scale_a_row_compiles_for_an_h100(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    compiled, _ = compile_for_h100(Config(block_m=16, block_n=64, split_k=2), 2048, grouped=False)
    assert compiled.metadata.shared <= H100_SHARED_BYTES


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 16, 64, 300])
def test_cuda_kernel_is_the_weight_only_linear(dtype, rows, monkeypatch):
    """On a GPU, compiled (not interpreted): each dtype against float64, within its output rounding (and
    float32's full precision: not TF32)."""
    monkeypatch.delenv("TRITON_INTERPRET")
    q, scales = quantized(2048, 2048, seed=9)
    q, scales = q.cuda(), scales.cuda()
    x = torch.randn(rows, 2048, device="cuda").to(dtype)
    b = torch.randn(2048, device="cuda").to(dtype)
    got = triton_int8.linear(x, q, scales, b)
    want = reference(x, q, scales, b)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())
