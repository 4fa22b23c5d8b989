"""Per-row sampling: greedy, temperature, top-k, top-p, each row with its own generator."""

from __future__ import annotations

import torch

from server.request import SamplingParams

_MIN_TEMPERATURE = torch.finfo(torch.float32).tiny


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request generator, so a seeded request samples the same tokens whatever shares its batch."""
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside top-k and the top-p nucleus with -inf. logits: [vocab] float32."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # [vocab]
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already cover top_p; the first token always stays.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop_sorted[0] = False  # also when top_p is below float32's range (it compares as 0)
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """Pick one token per row. logits: [batch, vocab] (any float dtype); returns `batch` token ids."""
    logits = logits.float()
    tokens = torch.argmax(logits, dim=-1).tolist()  # greedy for every row; sampled rows overwrite below
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        # Top logit shifted to 0, and a temperature of at least float32's smallest normal number: a tiny
        # temperature then gives -inf (probability 0), never inf - inf = NaN in the softmax.
        scaled = (logits[row] - logits[row].max()) / max(p.temperature, _MIN_TEMPERATURE)  # [vocab]
        row_logits = filter_logits(scaled, p.top_k, p.top_p)  # [vocab]
        probs = torch.softmax(row_logits, dim=-1)
        if not bool(torch.isfinite(probs).all()):
            # NaN logits (e.g. a prefix of huge values overflowed attention): this row gets the greedy
            # token, as a greedy row does; multinomial would raise and fail every row of the batch.
            continue
        tokens[row] = int(torch.multinomial(probs, 1, generator=gen).item())
    return tokens
