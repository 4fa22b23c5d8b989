"""Eight-bit weights (`--quantize int8` or `w8a8`): every linear of the decoder layers, and the lm_head,
keeps its weight as int8 with a float32 scale per 32 weights along K (symmetric: absmax / 127; llama.cpp's
Q8_0 grid), so a decode step reads ~28% of float32's weight bytes and ~56% of bfloat16's. The K/V pool and
every prefix stay in the model's dtype: prefixes need no change. The embedding stays as it is (a lookup
reads one row per token, not the whole table).

How each linear multiplies, on a CPU with AVX-512 VNNI (where the kernels build), in every forward
(prefill, eager and compiled decode alike):
  - int8: `prefix_server::linear_a16`: the input rounded to int16 per row and 32 k (a relative error of
    ~1e-5: the result is weight-only int8's), int8 x int16 into int32, two pairs per lane per instruction.
  - w8a8: `prefix_server::linear_q8`: llama.cpp's Q8_0 x Q8_0: the input rounded to int8 per row and 32 k,
    int8 x int8, four pairs per lane per instruction: faster for many rows, further from float32.
On CUDA both are weight-only on a Triton kernel (`kernels/triton_int8.py`: each group's integer tile
times its rows, scaled once per 32 products; prefill-sized inputs widen the weight once for cuBLAS).
Elsewhere both are weight-only: the compiled AVX-512 step widens each weight vector in registers
(`linear_int8`), other paths widen the weight in the forward (gpt-fast's WeightOnlyInt8Linear).
How far each is from float32, and how fast, is measured by `python -m loadtest.bench_int8`
(docs/internals.md).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from server.config import QUANTIZE_CHOICES
from server.engine import kernels
from server.engine.kernels import triton_int8
from server.errors import ConfigError

log = logging.getLogger(__name__)
INT8_MAX = 127  # symmetric: -127..127 (-128 unused, so q and -q are both representable)
# Weights per scale along K, as llama.cpp's Q8_0 blocks (one scale per output feature if K is no multiple).
GROUP_SIZE = 32


def quantize_int8(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (int8 [N, K], float32 scales [N, G]) with weight ~= q * scales per group of
    K / G consecutive weights (G = K / group_size, or 1 when group_size does not divide K); each group's
    largest |weight| maps to 127 (an all-zero group keeps q = 0)."""
    n, k = weight.shape
    groups = k // group_size if k % group_size == 0 else 1
    w = weight.detach().float().reshape(n, groups, k // groups)  # [N, G, K / G]
    scales = w.abs().amax(dim=2).clamp(min=torch.finfo(torch.float32).tiny) / INT8_MAX  # [N, G]
    q = torch.round(w / scales[:, :, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.reshape(n, k), scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [N, K] and scales [N, G] -> the weight [N, K] in `dtype` (computed in float32)."""
    n, k = q.shape
    groups = scales.shape[1]
    return (q.reshape(n, groups, k // groups).float() * scales[:, :, None]).reshape(n, k).to(dtype)


# --quantize mode -> the kernel its Int8Linears run on where the CPU has AVX-512 VNNI
VNNI_KERNELS = {"int8": "a16", "w8a8": "q8"}
KERNELS = (None, "a16", "q8", "triton")  # Int8Linear's: weight-only in torch, the two VNNI ones, CUDA's


class Int8Linear(torch.nn.Module):
    """A frozen linear with an int8 weight, float32 scales per group of 32 along K (bias kept as it was).

    `kernel` 'a16' or 'q8' (asked for, the output features a multiple of 16, the input features of 32, on a
    CPU with VNNI where the kernels load): the weight as `pack_a16` / `pack_q8` lay it out, the scales
    [N / 16, G, 16], and the forward is `linear_a16` / `linear_q8`. 'triton' (asked for, on CUDA with
    Triton installed, or under Triton's interpreter on the CPU): weight int8 [N, K], scales [N, G], and the
    forward is `triton_int8.linear`. Otherwise (kernel None): the same layout, and the forward widens the
    weight to the input's dtype."""

    def __init__(
        self,
        linear: torch.nn.Linear,
        kernel: str | None = None,
        blocks: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """`blocks`: the int8 weight [N, K] and its scales [N, K / 32] as they are (a GGUF's Q8_0,
        engine/gguf_int8.py), instead of rounding the linear's float weight. A linear on the meta device
        (built without weights: engine/gguf_int8.py `load_from_blocks`) needs them, and the layer lives on
        their device; its bias, if any, must be real."""
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be None, 'a16', 'q8' or 'triton', got {kernel!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight  # [N, K], float; shape only when on the meta device
        if weight.is_meta and (blocks is None or (linear.bias is not None and linear.bias.is_meta)):
            raise ValueError(
                f"a linear [{self.out_features}, {self.in_features}] on the meta device needs its int8 "
                f"blocks and a real bias, got {'no blocks' if blocks is None else 'a meta bias'}"
            )
        if blocks is None:
            q, scales = quantize_int8(weight)
        else:
            q, scales = (t.to(blocks[0].device if weight.is_meta else weight.device) for t in blocks)
            want = (self.out_features, self.in_features // GROUP_SIZE)
            if q.shape != weight.shape or q.dtype != torch.int8 or tuple(scales.shape) != want:
                raise ValueError(
                    f"int8 blocks for a linear [{self.out_features}, {self.in_features}]: expected int8 "
                    f"{tuple(weight.shape)} and scales {want}, got {q.dtype} {tuple(q.shape)} and "
                    f"{tuple(scales.shape)}"
                )
        if kernel == "triton":
            usable = triton_int8.available(q.device)
        else:
            usable = (
                kernel is not None
                and self.out_features % 16 == 0
                and self.in_features % GROUP_SIZE == 0
                and q.device.type == "cpu"
                and kernels.vnni()  # loads (and once per machine builds) the kernels: only when asked for
            )
        self.kernel = kernel if usable else None
        if self.kernel in ("a16", "q8"):
            ops = torch.ops.prefix_server
            pack = ops.pack_a16 if self.kernel == "a16" else ops.pack_q8
            q, scales = pack(q), ops.pack_linear(scales)
        self.register_buffer("weight", q)  # on the linear's device, as its weight was (or the blocks')
        self.register_buffer("scales", scales)
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N], in x's dtype
        if self.kernel == "a16":
            return torch.ops.prefix_server.linear_a16(x, self.weight, self.scales, self.bias)
        if self.kernel == "q8":
            return torch.ops.prefix_server.linear_q8(x, self.weight, self.scales, self.bias)
        if self.kernel == "triton":
            return triton_int8.linear(x, self.weight, self.scales, self.bias)
        return F.linear(x, dequantize(self.weight, self.scales, x.dtype), self.bias)

    def extra_repr(self) -> str:
        groups = self.scales.shape[1]
        how = {"a16": "int8 x int16", "q8": "int8 x int8", "triton": "Triton int8", None: "int8 weights"}[
            self.kernel
        ]
        return f"in_features={self.in_features}, out_features={self.out_features}, {how}, {groups} scales per row"


@torch.inference_mode()
def warm_up_kernels(model: PreTrainedModel) -> int:
    """Compile the Triton int8 kernel for every distinct linear of `model` at every rows bucket, on zeros,
    so that no request (a prefill of up to 256 tokens, a decode batch) waits on a compile and no CUDA
    graph capture meets one. Returns the launches run (0 where no linear is on Triton)."""
    started = time.perf_counter()
    seen: set[tuple] = set()
    launches = 0
    for module in model.modules():
        if not isinstance(module, Int8Linear) or module.kernel != "triton":
            continue
        key = (module.out_features, module.in_features, module.scales.shape[1], module.bias is not None)
        if key in seen:
            continue
        seen.add(key)
        for rows in triton_int8.warm_up_rows():
            module(torch.zeros(rows, module.in_features, dtype=model.dtype, device=module.weight.device))
            launches += 1
    if launches:
        log.info("int8 Triton kernel: %d warm-up launches (%.1f s)", launches, time.perf_counter() - started)
    return launches


def quantize_model(
    model: PreTrainedModel,
    mode: str,
    vnni: bool = True,
    blocks: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    triton: bool | None = None,
) -> PreTrainedModel:
    """`mode` 'int8' or 'w8a8': every nn.Linear of the decoder layers and the lm_head replaced by an
    Int8Linear, in place (the float weights are freed, except an lm_head tied to the embedding, which the
    embedding keeps), on the mode's VNNI kernel where the CPU runs it, on the Triton kernel on CUDA (both
    modes weight-only there); 'off': the model as it is. `vnni` False: weight-only in torch everywhere (for
    comparisons). `triton`: None, on CUDA (and on a CPU where TRITON_INTERPRET=1 asks for Triton's
    interpreter); True, asked for anywhere (a CPU runs it only under the interpreter); False, never.
    `blocks`: module name -> int8 weight and scales to take as they are (a GGUF's Q8_0 linears); the others
    are rounded from their float weights. The blocks are taken out of the dict as they are used, so each is
    freed once its layer has packed it."""
    if mode not in QUANTIZE_CHOICES:
        raise ConfigError(f"setting quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {mode!r}")
    if mode == "off":
        return model
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        raise ConfigError(
            f"--quantize int8 needs a Llama-family model (decoder layers of nn.Linear and an lm_head), "
            f"got {type(model).__name__}"
        )
    if triton is None:  # CUDA's kernel; on a CPU under Triton's interpreter too (a rehearsal of the GPU path)
        triton = model.device.type == "cuda" or triton_int8.interpreting()
    kernel = None if not vnni else "triton" if triton else VNNI_KERNELS[mode]
    blocks = blocks or {}
    names = {id(module): name for name, module in model.named_modules()}
    taken = len(blocks.keys() & set(names.values()))
    num = 0
    for layer in layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, Int8Linear(child, kernel, blocks.pop(names[id(child)], None)))
                    num += 1
    model.lm_head = Int8Linear(model.lm_head, kernel, blocks.pop("lm_head", None))
    num += 1
    on_kernel = sum(isinstance(m, Int8Linear) and m.kernel is not None for m in model.modules())
    how = {
        "a16": "int8 x int16 (activations rounded to int16 per 32) on AVX-512 VNNI",
        "q8": "int8 x int8 (activations rounded to int8 per 32, llama.cpp's Q8_0 arithmetic) on AVX-512 VNNI",
        "triton": "weight-only on the Triton kernel",
        None: "weight-only",
    }[kernel]
    log.info(
        "quantized %d linears to int8 (a scale per %d weights; %d blocks taken as they were); %d of them %s, "
        "the others weight-only in torch; activations %s",
        num,
        GROUP_SIZE,
        taken,
        on_kernel,
        how,
        model.dtype,
    )
    if mode == "w8a8" and kernel != "q8":
        log.warning(
            "--quantize w8a8 rounds activations on CPUs with AVX-512 VNNI only; here it runs weight-only, as int8 does"
        )
    elif mode == "w8a8" and on_kernel == 0:
        log.warning("--quantize w8a8 needs a CPU with AVX-512 VNNI; here it runs weight-only, as int8 does")
    if model.device.type != "cpu" and on_kernel < num:  # e.g. CUDA without Triton: every step widens weights
        log.warning(
            "--quantize %s on %s: %d of %d linears widen their int8 weights in every step (no Triton "
            "here?): expect them slower than %s",
            mode,
            model.device.type,
            num - on_kernel,
            num,
            model.dtype,
        )
    return model
