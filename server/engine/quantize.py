"""Eight-bit weights (`--quantize int8`): every linear of the decoder layers, and the lm_head, keeps its
weight as int8 with a float32 scale per 32 weights along K (symmetric: absmax / 127; llama.cpp's Q8_0
grid), so a decode step reads ~28% of float32's weight bytes and ~56% of bfloat16's. The K/V pool and
every prefix stay in the model's dtype: prefixes need no change. The embedding stays as it is (a lookup
reads one row per token, not the whole table).

Two ways to multiply, chosen per linear when the model is quantized:
  - q8, on a CPU with AVX-512 VNNI (where the kernels build): llama.cpp's Q8_0 x Q8_0. Each linear's input is
    rounded to int8 too, per row and 32 k (a float32 scale each), and `prefix_server::linear_q8` multiplies
    int8 by int8 into exact int32 sums, 64 pairs per instruction, in every forward (prefill, eager and
    compiled decode alike). Measured: the lone decode step 1.3-1.6x faster than weight-only, 8 rows 1.6x.
  - weight-only elsewhere: activations stay in the model's dtype; the compiled CPU step widens each weight
    vector in registers (`linear_int8`), other paths widen the weight in the forward (gpt-fast's
    WeightOnlyInt8Linear).
How far each is from float32 is measured by `python -m loadtest.bench_int8` (docs/internals.md).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from server.config import QUANTIZE_CHOICES
from server.engine import kernels
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


class Int8Linear(torch.nn.Module):
    """A frozen linear with an int8 weight, float32 scales per group of 32 along K (bias kept as it was).

    q8 (asked for, the output features a multiple of 16, the input features of 32, on a CPU with VNNI
    where the kernels load): the weight as
    `pack_q8` lays it out, uint8 [N / 16, K / 4, 16, 4], the scales [N / 16, G, 16], and the forward is
    `linear_q8` (input rounded to int8 as well). Otherwise weight int8 [N, K], scales [N, G], and the forward
    widens the weight to the input's dtype."""

    def __init__(self, linear: torch.nn.Linear, q8: bool = False):
        super().__init__()
        q, scales = quantize_int8(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.q8 = (
            q8
            and self.out_features % 16 == 0
            and self.in_features % GROUP_SIZE == 0
            and linear.weight.device.type == "cpu"
            and kernels.vnni()
        )
        if self.q8:
            q, scales = torch.ops.prefix_server.pack_q8(q), torch.ops.prefix_server.pack_linear(scales)
        self.register_buffer("weight", q)  # on the linear's device, as its weight was
        self.register_buffer("scales", scales)
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N], in x's dtype
        if self.q8:
            return torch.ops.prefix_server.linear_q8(x, self.weight, self.scales, self.bias)
        return F.linear(x, dequantize(self.weight, self.scales, x.dtype), self.bias)

    def extra_repr(self) -> str:
        groups = self.scales.shape[1]
        how = "int8 x int8 (q8)" if self.q8 else "int8 weights"
        return f"in_features={self.in_features}, out_features={self.out_features}, {how}, {groups} scales per row"


def quantize_model(model: PreTrainedModel, mode: str, q8: bool = True) -> PreTrainedModel:
    """`mode` 'int8': every nn.Linear of the decoder layers and the lm_head replaced by an Int8Linear, in
    place (the float weights are freed, except an lm_head tied to the embedding, which the embedding
    keeps); 'off': the model as it is. `q8`: int8 x int8 wherever the CPU kernel for it runs (see above);
    False: weight-only everywhere."""
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
    num = 0
    for layer in layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, Int8Linear(child, q8))
                    num += 1
    model.lm_head = Int8Linear(model.lm_head, q8)
    num += 1
    num_q8 = sum(isinstance(m, Int8Linear) and m.q8 for m in model.modules())
    log.info(
        "quantized %d linears to int8 (a scale per %d weights); %d of them int8 x int8 (activations rounded "
        "to int8 per %d, AVX-512 VNNI), the others on %s activations",
        num,
        GROUP_SIZE,
        num_q8,
        GROUP_SIZE,
        model.dtype,
    )
    if model.device.type != "cpu":  # no int8 kernel there yet: each step widens every weight first
        log.warning(
            "--quantize int8 on %s widens the int8 weights in every step: expect it slower than "
            "bfloat16 there (the int8 kernel is CPU-only so far)",
            model.device.type,
        )
    return model
