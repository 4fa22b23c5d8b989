"""The batched sampler: each row as if it were alone (its own generator, its own parameters), the right
distribution, filtering per row, greedy fallbacks."""

from __future__ import annotations

import torch

from server.engine.sampling import filter_logits, make_generator, sample
from server.request import SamplingParams

CPU = torch.device("cpu")


def params(**kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=4, **kw)


def test_a_row_samples_the_same_in_any_batch():
    torch.manual_seed(0)
    logits = torch.randn(5, 300) * 3
    ps = [
        params(temperature=0.8, seed=1),
        params(),  # greedy
        params(temperature=1.3, top_p=0.9, top_k=50, seed=2),
        params(temperature=0.5, top_k=7, seed=3),
        params(temperature=1.0, top_p=0.5, seed=4),
    ]
    together = sample(logits, ps, [make_generator(p, CPU) for p in ps])
    alone = [sample(logits[i : i + 1], [p], [make_generator(p, CPU)])[0] for i, p in enumerate(ps)]
    assert together == alone
    assert together[1] == int(logits[1].argmax())


def test_samples_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = params(temperature=1.0, seed=7)
    gen = make_generator(p, CPU)
    draws = torch.tensor([sample(logits, [p], [gen])[0] for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)


def test_top_p_and_top_k_keep_only_their_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2))
    ps = [params(temperature=1.0, top_p=0.7, seed=8), params(temperature=1.0, top_k=3, seed=9)]
    gens = [make_generator(p, CPU) for p in ps]
    draws = torch.tensor([sample(logits, ps, gens) for _ in range(2000)])  # [draws, 2]
    assert set(draws[:, 0].tolist()) == {0, 1}  # 0.5 < 0.7: the nucleus needs the second token too
    assert set(draws[:, 1].tolist()) == {0, 1, 2}


def test_filter_logits_per_row():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]] * 3)
    out = filter_logits(logits, torch.tensor([2, 0, 0]), torch.tensor([1.0, 1.0, 1e-9]))
    inf = float("-inf")
    assert out.tolist() == [[4.0, 3.0, inf, inf], [4.0, 3.0, 2.0, 1.0], [4.0, inf, inf, inf]]


def test_a_row_of_nan_logits_takes_the_greedy_token_and_spares_the_others():
    logits = torch.tensor([[float("nan")] * 4, [0.0, 0.0, 9.0, 0.0]])
    ps = [params(temperature=1.0, seed=1), params(temperature=0.01, seed=2)]
    assert sample(logits, ps, [make_generator(p, CPU) for p in ps])[1] == 2


def reference_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p over one row by sorting the whole vocabulary (the definition)."""
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
    drop[0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))


def test_top_p_over_a_large_vocabulary_equals_sorting_it_whole():
    """Past the ranked candidates (512) the nucleus needs the full sort: a flat row's nucleus has
    thousands of tokens, a peaked row's a few; in one batch, each row as its definition says."""
    torch.manual_seed(3)
    flat, peaked = torch.randn(4000) * 0.1, torch.randn(4000) * 8
    logits = torch.stack([flat, peaked, flat])
    top_p = torch.tensor([0.9, 0.9, 1.0])
    out = filter_logits(logits, torch.zeros(3, dtype=torch.long), top_p)
    assert torch.isfinite(out[0]).sum() > 512 and torch.isfinite(out[1]).sum() < 512
    assert torch.equal(out[0], reference_filter(flat, 0.9)) and torch.equal(
        out[1], reference_filter(peaked, 0.9)
    )
    assert torch.equal(out[2], flat)  # top_p 1.0: off
    only_peaked = filter_logits(peaked[None], torch.zeros(1, dtype=torch.long), torch.tensor([0.9]))
    assert torch.equal(only_peaked[0], reference_filter(peaked, 0.9))  # the candidates alone suffice


def test_greedy_takes_argmaxs_token_with_ties_nan_and_inf():
    """The greedy pick (max's indices, faster than argmax on CPU) is torch.argmax's token: the first of tied
    maxima, a NaN over any number, a row of -inf at 0."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(-3, 3, (6, 1000), generator=g).float()  # many ties at the top
    logits[2, 500] = float("nan")
    logits[3] = float("-inf")
    logits[4, 10] = float("inf")
    logits[5, 999] = 3.0  # the maximum last
    picked = sample(logits, [SamplingParams()] * 6, [None] * 6)
    assert picked == torch.argmax(logits, dim=-1).tolist()
    assert picked[2] == 500 and picked[3] == 0 and picked[4] == 10 and picked[5] == 999
