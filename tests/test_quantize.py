"""Eight-bit weights (server/engine/quantize.py, `--quantize int8 | w8a8`): the quantizer's error bound;
the `linear_int8` (weight-only), `linear_a16` (int8 x int16) and `linear_q8` (int8 x int8) kernels against
references; a mixed-task batch under int8 equal to each request alone (greedy), eager and compiled, on
each kernel. How close int8 stays to float32 on the real model is measured by
`python -m loadtest.bench_int8`, not asserted here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model, run_joining
from test_engine import make_requests, random_prefix

from server.config import Settings
from server.engine import kernels
from server.engine.compiled import DecodeStep
from server.engine.engine import Engine
from server.engine.quantize import Int8Linear, dequantize, quantize_int8, quantize_model
from server.errors import ConfigError


@pytest.mark.parametrize("group_size, groups", [(32, 3), (48, 2), (7, 1), (96, 1)])
def test_quantize_int8_rounds_each_weight_to_its_groups_grid(group_size, groups):
    """A scale per group_size weights along K (per output feature when group_size does not divide K);
    every weight within half a step of its group's grid, each group's largest at +-127."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 96, generator=gen) * torch.linspace(0.01, 10, 96)  # groups of any magnitude
    w[5] = 0.0  # an all-zero row
    q, scales = quantize_int8(w, group_size)
    assert q.dtype == torch.int8 and q.shape == (32, 96)
    assert scales.dtype == torch.float32 and scales.shape == (32, groups)
    assert (q[5] == 0).all()
    step = scales.repeat_interleave(96 // groups, dim=1)  # [N, K]: each weight's scale
    assert ((w - q.float() * step).abs() <= step / 2 + 1e-6 * w.abs()).all()  # half a step, at most
    torch.testing.assert_close(dequantize(q, scales, torch.float32), q.float() * step)
    largest = q.reshape(32, groups, -1).abs().amax(dim=2)  # [N, G]
    assert (largest[torch.arange(32) != 5] == 127).all() and q.min() >= -127


@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_is_the_dequantized_linear(bias):
    torch.manual_seed(1)
    lin = torch.nn.Linear(40, 24, bias=bias)
    q8 = Int8Linear(lin)  # 40 is no multiple of 32: a scale per output feature
    x = torch.randn(3, 5, 40)
    want = F.linear(x, q8.weight.float() * q8.scales, lin.bias)
    torch.testing.assert_close(q8(x), want, rtol=1e-5, atol=1e-5)
    # and close to the float linear: each weight within half a step of its row's grid
    assert (q8(x) - lin(x)).abs().max() < 0.05 * lin(x).abs().max()


needs_kernels = pytest.mark.skipif(
    not (kernels.avx512() and kernels.load()), reason="the int8 kernel needs AVX-512 and a C++ compiler"
)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 13])
@pytest.mark.parametrize("k, group_size", [(96, 32), (72, 32), (72, 24)])  # 3 groups, 1 (per feature), 3
def test_linear_int8_kernel_matches_a_float_reference(dtype, rows, k, group_size):
    """The kernel against x @ dequantized(q).T in float64: float32 within float32 rounding, bfloat16
    within its one final rounding (2**-8 relative)."""
    gen = torch.Generator().manual_seed(rows)
    n = 80  # 5 packed blocks
    w, bias = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    q, scales = quantize_int8(w, group_size)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    pack = torch.ops.prefix_server.pack_linear
    got = torch.ops.prefix_server.linear_int8(x, pack(q), pack(scales), bias)
    assert got.dtype == dtype and got.shape == (rows, n)
    want = x.double() @ dequantize(q, scales, torch.float64).T + bias.double()
    tol = 1e-5 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


@needs_kernels
def test_linear_int8_says_what_it_expected():
    q, scales = quantize_int8(torch.randn(32, 64))  # 2 groups
    pack = torch.ops.prefix_server.pack_linear
    packed, packed_scales = pack(q), pack(scales)
    x = torch.randn(2, 64)
    with pytest.raises(
        RuntimeError, match=r"expected float32 scales packed by pack_linear \[2, groups dividing 64"
    ):
        torch.ops.prefix_server.linear_int8(x, packed, scales, None)  # not packed
    with pytest.raises(RuntimeError, match=r"groups dividing 64"):
        torch.ops.prefix_server.linear_int8(x, packed, pack(torch.ones(32, 3)), None)
    with pytest.raises(RuntimeError, match=r"expected a float32 or bfloat16 input \[\.\.\., 64\]"):
        torch.ops.prefix_server.linear_int8(torch.randn(2, 8), packed, packed_scales, None)
    with pytest.raises(RuntimeError, match="expected an int8 weight packed by pack_linear"):
        torch.ops.prefix_server.linear_int8(x, pack(q.float()), packed_scales, None)
    with pytest.raises(RuntimeError, match="int8 weights go to linear_int8"):  # the float kernel refuses int8
        torch.ops.prefix_server.linear(x, packed, None)


needs_vnni = pytest.mark.skipif(
    not (kernels.avx512() and kernels.load() and kernels.vnni()), reason="the VNNI kernels need AVX-512 VNNI"
)
VNNI = [pytest.param("a16", marks=needs_vnni), pytest.param("q8", marks=needs_vnni)]
KERNELS = [None, *VNNI]  # an Int8Linear's kernel: weight-only, int8 x int16, int8 x int8
MODES = {None: ("int8", False), "a16": ("int8", True), "q8": ("w8a8", True)}  # kernel -> quantize_model's
LEVELS = {"a16": 32767, "q8": 127}  # what each kernel rounds activations to


def vnni_reference(kernel: str, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """linear_a16's / linear_q8's arithmetic in float64: x [M, K] rounded per row and 32 k to integers of
    at most LEVELS[kernel] (scale = max |x| / LEVELS, to nearest, ties to even, computed in float32 as the
    kernels do), exact integer dot products with q [N, K] per group, each times both scales, summed over
    groups -> [M, N]."""
    levels = LEVELS[kernel]
    m, k = x.shape
    groups = k // 32
    xg = x.float().reshape(m, groups, 32)
    amax = xg.abs().amax(dim=2)  # [M, G]
    inv = torch.where(amax > 0, levels / amax, torch.zeros_like(amax))
    xq = torch.round(xg * inv[:, :, None]).double()  # [M, G, 32]
    dots = torch.einsum("mgk,ngk->mng", xq, q.reshape(-1, groups, 32).double())  # [M, N, G], exact
    return (dots * (amax / levels).double()[:, None, :] * scales.double()[None]).sum(dim=2)


def vnni_ops(kernel: str):
    ops = torch.ops.prefix_server
    return (ops.pack_a16, ops.linear_a16) if kernel == "a16" else (ops.pack_q8, ops.linear_q8)


@pytest.mark.parametrize("kernel", VNNI)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 13])  # every row tile: 1 x 1 block, 2 x 4, 3 x 2, 8 x 1, 8 + 5
@pytest.mark.parametrize("n, k", [(80, 32), (48, 96), (16, 64)])  # 5 blocks (not a multiple of 2 or 4)
def test_vnni_kernels_match_their_integer_reference(kernel, dtype, rows, n, k):
    """linear_a16 / linear_q8 against the same rounding done in float64 with exact integer dot products:
    equal within float32's accumulation of the group sums (and bfloat16's one final rounding); a group of
    zeros adds nothing. Against the float product: off by the weights' rounding (and q8's activations')."""
    gen = torch.Generator().manual_seed(rows * n)
    w, bias = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    q, scales = quantize_int8(w)
    x = torch.randn(rows, k, generator=gen) * torch.linspace(0.01, 10, k)  # groups of any magnitude
    x[0, :32] = 0.0  # an all-zero group of activations
    x = x.to(dtype)
    pack, linear = vnni_ops(kernel)
    got = linear(x, pack(q), torch.ops.prefix_server.pack_linear(scales), bias)
    assert got.dtype == dtype and got.shape == (rows, n)
    want = vnni_reference(kernel, x, q, scales) + bias.double()
    tol = 1e-5 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())
    exact = x.double() @ w.double().T + bias.double()
    assert (got.double() - exact).abs().max() < 0.03 * exact.abs().max()
    if kernel == "a16" and dtype == torch.float32:  # int16 activations: weight-only int8's result
        weight_only = x.double() @ dequantize(q, scales, torch.float64).T + bias.double()
        torch.testing.assert_close(
            got.double(), weight_only, rtol=1e-4, atol=1e-4 * weight_only.abs().max().item()
        )


@needs_vnni
def test_vnni_packing_layouts():
    """pack_q8: uint8 [N / 16, K / 4, 16, 4] = w + 128; pack_a16: int8 [N / 16, K / 2, 16, 2] = w (block,
    group of k, feature, k within the group)."""
    q = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    ops = torch.ops.prefix_server
    q8, a16 = ops.pack_q8(q), ops.pack_a16(q)
    assert q8.dtype == torch.uint8 and q8.shape == (2, 16, 16, 4)
    assert q8[1, 3, 5, 2].item() == q[16 + 5, 3 * 4 + 2].item() + 128
    torch.testing.assert_close(q8.permute(0, 2, 1, 3).reshape(32, 64).int() - 128, q.int())
    assert a16.dtype == torch.int8 and a16.shape == (2, 32, 16, 2)
    assert a16[1, 3, 5, 1].item() == q[16 + 5, 3 * 2 + 1].item()
    torch.testing.assert_close(a16.permute(0, 2, 1, 3).reshape(32, 64), q)


@pytest.mark.parametrize("kernel", VNNI)
def test_vnni_kernels_say_what_they_expected(kernel):
    q, scales = quantize_int8(torch.randn(32, 64))  # 2 groups
    pack, linear = vnni_ops(kernel)
    name = f"linear_{kernel}"
    packed, packed_scales = pack(q), torch.ops.prefix_server.pack_linear(scales)
    x = torch.randn(2, 64)
    with pytest.raises(
        RuntimeError, match=r"output features a multiple of 16 and input features a multiple of 32"
    ):
        pack(torch.zeros(32, 40, dtype=torch.int8))
    with pytest.raises(RuntimeError, match=f"pack_{kernel}: expected a 2-D int8 weight"):
        pack(q.float())
    with pytest.raises(
        RuntimeError, match=rf"{name}: expected float32 scales packed by pack_linear \[2, 2, 16\]"
    ):
        linear(x, packed, scales, None)  # not packed
    with pytest.raises(RuntimeError, match=rf"{name}: expected a float32 or bfloat16 input \[\.\.\., 64\]"):
        linear(torch.randn(2, 8), packed, packed_scales, None)
    with pytest.raises(RuntimeError, match=f"{name}: expected an? u?int8 weight packed by pack_{kernel}"):
        linear(x, torch.ops.prefix_server.pack_linear(q), packed_scales, None)
    with pytest.raises(RuntimeError, match=rf"{name}: expected a bias \[32\]"):
        linear(x, packed, packed_scales, torch.zeros(31))


@pytest.mark.parametrize("kernel", VNNI)
def test_int8_linear_on_a_vnni_kernel(kernel):
    """Int8Linear(kernel=...): that kernel's layout and op where the shape allows it, else weight-only."""
    torch.manual_seed(2)
    lin = torch.nn.Linear(64, 48)
    layer = Int8Linear(lin, kernel)
    assert layer.kernel == kernel and layer.scales.shape == (3, 2, 16)
    assert layer.weight.shape == ((3, 16, 16, 4) if kernel == "q8" else (3, 32, 16, 2))
    x = torch.randn(2, 3, 64)
    q, scales = quantize_int8(lin.weight)
    want = vnni_reference(kernel, x.reshape(6, 64), q, scales) + lin.bias.double()
    torch.testing.assert_close(layer(x).double(), want.reshape(2, 3, 48), rtol=1e-5, atol=1e-5)
    assert Int8Linear(torch.nn.Linear(40, 48), kernel).kernel is None  # 40 is no multiple of 32
    assert Int8Linear(torch.nn.Linear(64, 40), kernel).kernel is None  # 40 is no multiple of 16
    with pytest.raises(ValueError, match="kernel must be None, 'a16', 'q8' or 'triton'"):
        Int8Linear(lin, "int4")


@pytest.mark.parametrize("mode, kernel", [("int8", "a16"), ("w8a8", "q8")])
def test_quantize_model_picks_the_modes_kernel_where_the_cpu_runs_it(mode, kernel):
    model = quantize_model(make_tiny_model("llama-gqa"), mode)
    layers = [m for m in model.modules() if isinstance(m, Int8Linear) and m.out_features % 16 == 0]
    assert len(layers) == 7 * len(model.model.layers)  # the lm_head's 258 outputs are no multiple of 16
    assert {m.kernel for m in layers} == {kernel if kernels.vnni() else None}
    weight_only = quantize_model(make_tiny_model("llama-gqa"), mode, vnni=False)
    assert {m.kernel for m in weight_only.modules() if isinstance(m, Int8Linear)} == {None}


def int8_engine(seed: int = 0, kernel: str | None = "a16", **kw) -> Engine:
    from conftest import byte_tokenizer

    mode, vnni = MODES[kernel]
    return Engine(quantize_model(make_tiny_model("llama-gqa", seed), mode, vnni), byte_tokenizer(), **kw)


def assert_mixed_batch_equals_alone(engine: Engine, new_tokens=(12, 5, 10, 8)):
    """Rows of different prefixes (one shared by two rows, and none) joining mid-flight: each row's greedy
    tokens are the tokens it gets alone. Returns a function making the same requests anew, and the batch."""
    fp = engine.fingerprint
    prefixes = [random_prefix(fp, 3, 1), None, random_prefix(fp, 17, 2), random_prefix(fp, 3, 1)]
    prompt_lens, joins_at = [6, 14, 2, 9], [0, 0, 2, 4]

    def requests():
        return make_requests(prefixes, prompt_lens, list(new_tokens))

    batch = requests()
    run_joining(engine, batch, joins_at)
    for i, req in enumerate(batch):
        alone = requests()[i]
        engine.generate([alone])
        assert req.output_token_ids == alone.output_token_ids, f"row {i}"
    return requests, joins_at, batch


@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_mixed_batch_equals_each_request_alone(kernel):
    """Under int8, on each kernel: a mixed batch joining mid-flight equals each request alone."""
    assert_mixed_batch_equals_alone(int8_engine(kernel=kernel, max_rows=4))


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_compiled_step_equals_the_eager_int8_engine(kernel):
    """The compiled step on `linear_a16`, `linear_q8` or `linear_int8` (or torch's int8 path without
    AVX-512) gives the eager int8 engine's greedy tokens, as rows join and leave."""
    engine = int8_engine(kernel=kernel, max_rows=4)
    engine.compile(on_new_shape="fail")
    eager = Engine(engine.model, engine.tokenizer, max_rows=4)
    fp = engine.fingerprint
    prefixes = [random_prefix(fp, 3, 1), None, random_prefix(fp, 9, 2), None, random_prefix(fp, 5, 3)]
    prompt_lens, new_tokens, joins_at = [6, 14, 2, 40, 5], [20, 5, 12, 30, 9], [0, 0, 3, 4, 10]
    got = make_requests(prefixes, prompt_lens, new_tokens)
    run_joining(engine, got, joins_at)
    want = make_requests(prefixes, prompt_lens, new_tokens)
    run_joining(eager, want, joins_at)
    assert [r.output_token_ids for r in got] == [r.output_token_ids for r in want]
    assert engine.decoder.packed == kernels.avx512()
    if kernels.avx512():  # the packed linears are the int8 ones
        step = DecodeStep(engine.model, packed=True, attention_kernel=True)
        assert step.qkv[0].int8 and step.lm_head.int8 and step.down[0].kernel == kernel
        assert step.down[0].weight.dtype == (torch.uint8 if kernel == "q8" else torch.int8)


def test_quantize_setting():
    assert Settings().quantize == "off"
    assert Settings.from_env(environ={"PREFIX_SERVER_QUANTIZE": "int8"}).quantize == "int8"
    with pytest.raises(ConfigError, match="quantize must be one of off, int8, w8a8, got 'int4'"):
        Settings(quantize="int4")


def test_quantize_setting_reaches_the_served_model(tmp_path, tokenizer):
    """`--quantize int8` is applied where the server loads its model (build_components -> load_model)."""
    from conftest import save_model_folder

    from server.api.runtime import build_components

    folder = save_model_folder(Engine(make_tiny_model("llama-gqa"), tokenizer), tmp_path / "model")
    for mode, kind in (("int8", Int8Linear), ("w8a8", Int8Linear), ("off", torch.nn.Linear)):
        settings = Settings(
            model=str(folder), quantize=mode, prefix_dir=tmp_path / mode, kv_cache_bytes=1 << 22
        )
        model = build_components(settings).engine.model
        assert isinstance(model.lm_head, kind) and isinstance(model.model.layers[0].mlp.down_proj, kind)
        if (
            mode != "off"
        ):  # the mode's kernel where this CPU runs it (the tiny model's down_proj, 128 -> 64, is packable)
            want = ("a16" if mode == "int8" else "q8") if kernels.vnni() else None
            assert model.model.layers[0].mlp.down_proj.kernel == want
