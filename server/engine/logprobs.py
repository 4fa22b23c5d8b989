"""Logprobs of the tokens a step picked, for the rows that asked: from the same logits the sampler saw.

They are the model's raw next-token distribution (log_softmax in float32 over the whole vocabulary),
before temperature, top-k and top-p, as OpenAI and vLLM report them by default: a classifier reads
P(' positive') whatever a request samples with. One log_softmax, one gather and one `torch.topk` over
the asking rows only; rows that did not ask cost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.request import TokenLogprob


def token_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], num_top: Sequence[int | None]
) -> list[TokenLogprob | None]:
    """Each asking row's chosen token's logprob and its `num_top[i]` most likely tokens (None: the row
    did not ask). logits: [batch, vocab] (any float dtype); tokens: the batch's picked ids."""
    asking = [i for i, k in enumerate(num_top) if k is not None]
    out: list[TokenLogprob | None] = [None] * len(tokens)
    if not asking:
        return out
    device = logits.device
    index = torch.tensor(asking, device=device)  # [r]
    logprobs = torch.log_softmax(logits[index].float(), dim=-1)  # [r, vocab]
    picked = torch.tensor([tokens[i] for i in asking], device=device)  # [r]
    chosen = logprobs.gather(1, picked[:, None])[:, 0].tolist()  # [r]
    k = min(max(num_top[i] for i in asking), logprobs.shape[-1])
    top_values, top_ids = [], []
    if k > 0:
        values, ids = torch.topk(logprobs, k, dim=-1)  # [r, k] each, most likely first
        top_values, top_ids = values.tolist(), ids.tolist()
    for row, i in enumerate(asking):
        n = num_top[i]
        top = tuple(zip(top_ids[row][:n], top_values[row][:n], strict=True)) if n else ()
        out[i] = TokenLogprob(tokens[i], chosen[row], top)
    return out
