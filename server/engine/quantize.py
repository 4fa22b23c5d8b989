"""Weight-only int8 (`--quantize int8`): every linear of the decoder layers, and the lm_head, keeps its
weight as int8 with one float32 scale per output feature (symmetric: absmax / 127), so a decode step
reads a quarter of float32's weight bytes and half of bfloat16's. Activations stay in the model's dtype,
and so do the K/V pool and every prefix: prefixes need no change. The embedding stays as it is (a lookup
reads one row per token, not the whole table).

The compiled CPU step multiplies by the int8 weights directly (`prefix_server::linear_int8`, scales
applied to the finished dot products); elsewhere (prefill, the eager step, no AVX-512) the weight is
widened to the input's dtype in the forward, as gpt-fast's WeightOnlyInt8Linear does.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from server.errors import ConfigError

log = logging.getLogger(__name__)
QUANTIZE_CHOICES = ("off", "int8")
INT8_MAX = 127  # symmetric: -127..127 (-128 unused, so q and -q are both representable)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (int8 [N, K], float32 scales [N]) with weight ~= q * scales[:, None]; each row's
    largest |weight| maps to 127 (an all-zero row keeps q = 0)."""
    w = weight.detach().float()  # [N, K]
    scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / INT8_MAX  # [N]
    q = torch.round(w / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)  # [N, K]
    return q, scales


class Int8Linear(torch.nn.Module):
    """A frozen linear with an int8 weight [N, K] and float32 scales [N] (bias kept as it was)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        q, scales = quantize_int8(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", q.to(linear.weight.device))
        self.register_buffer("scales", scales.to(linear.weight.device))
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N], in x's dtype
        out = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_model(model: PreTrainedModel, mode: str) -> PreTrainedModel:
    """`mode` 'int8': every nn.Linear of the decoder layers and the lm_head replaced by an Int8Linear, in
    place (the float weights are freed, except an lm_head tied to the embedding, which the embedding
    keeps); 'off': the model as it is."""
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
                    setattr(parent, name, Int8Linear(child))
                    num += 1
    model.lm_head = Int8Linear(model.lm_head)
    num += 1
    log.info("quantized %d linears to int8 (per-channel scales); activations %s", num, model.dtype)
    return model
