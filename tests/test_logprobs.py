"""Logprobs in the engine: for every row of a mixed batch (its own prefix or none, sampled or greedy,
joining mid-flight, first token and later ones) they equal log_softmax of the model's own forward over
the same sequence, computed step by step for the request alone; rows that do not ask get none."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompt, run_joining
from test_engine import random_prefix
from transformers import DynamicCache

import server.engine.logprobs as logprobs_module
from server.engine.engine import Engine
from server.engine.logprobs import token_logprobs
from server.errors import InvalidRequest
from server.request import Request, SamplingParams, TokenLogprob

ATOL = 1e-4


@torch.inference_mode()
def reference_logprobs(model, prefix, prompt: list[int], output: list[int]) -> torch.Tensor:
    """log_softmax [len(output), vocab] of the model's next-token logits before each generated token:
    the request alone through the model, its prefix as the cache, the prompt in one forward, then one
    generated token per forward (positions start after the prefix, as PEFT's PrefixTuning has them)."""
    config = model.config
    if prefix is None:
        num_virtual_tokens, cache = 0, DynamicCache(config=config)
    else:
        num_virtual_tokens = prefix.num_virtual_tokens
        layers = [(k[None], v[None]) for k, v in zip(prefix.keys, prefix.values, strict=True)]
        cache = DynamicCache(layers, config=config)  # each [1, kv_heads, P, head_dim]
    position, rows = num_virtual_tokens, []
    for chunk in [prompt] + [[t] for t in output[:-1]]:
        out = model(
            input_ids=torch.tensor([chunk]),
            attention_mask=torch.ones(1, position + len(chunk), dtype=torch.long),
            position_ids=torch.arange(position, position + len(chunk))[None],
            cache=cache,
            use_cache=True,
        )
        rows.append(torch.log_softmax(out.logits[0, -1].float(), dim=-1))  # [vocab]
        position += len(chunk)
    return torch.stack(rows)  # [len(output), vocab]


def assert_matches_reference(entries: list[TokenLogprob], output: list[int], ref: torch.Tensor, k: int):
    """Token for token: the chosen token's logprob, and the true top k of the reference, in order."""
    assert [e.token_id for e in entries] == output
    for e, row in zip(entries, ref, strict=True):  # row: [vocab]
        assert abs(e.logprob - row[e.token_id].item()) < ATOL
        assert len(e.top) == k
        want = torch.topk(row, k)
        got_ids = [t for t, _ in e.top]
        got_values = torch.tensor([lp for _, lp in e.top])
        assert torch.allclose(got_values, want.values, atol=ATOL)  # the k largest, most likely first
        assert torch.allclose(row[got_ids], got_values, atol=ATOL)  # ... and each is its token's own
        assert len(set(got_ids)) == k


# ---- the batched function ----
def test_token_logprobs_are_log_softmax_and_the_true_top_k():
    torch.manual_seed(0)
    logits = torch.randn(5, 300) * 4  # [batch, vocab]
    tokens = [7, 3, 299, 0, 150]
    num_top = [3, None, 0, 20, None]
    out = token_logprobs(logits, tokens, num_top)
    ref = torch.log_softmax(logits, dim=-1)
    assert out[1] is None and out[4] is None
    for i in (0, 2, 3):
        assert_matches_reference([out[i]], [tokens[i]], ref[i : i + 1], num_top[i])
    assert out[2].top == ()


def test_bfloat16_logits_are_read_in_float32():
    logits = (torch.randn(2, 50, generator=torch.Generator().manual_seed(1)) * 3).bfloat16()
    out = token_logprobs(logits, [4, 9], [2, 2])
    ref = torch.log_softmax(logits.float(), dim=-1)
    for i, token in enumerate((4, 9)):
        assert_matches_reference([out[i]], [token], ref[i : i + 1], 2)


def test_rows_that_do_not_ask_cost_nothing():
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"the logits were read ({name})")

        def __getitem__(self, index):
            raise AssertionError("the logits were read")

    assert token_logprobs(Untouchable(), [1, 2, 3], [None, None, None]) == [None, None, None]


def test_one_log_softmax_and_one_topk_over_the_asking_rows_only(monkeypatch):
    calls = []
    real_log_softmax, real_topk = torch.log_softmax, torch.topk

    def log_softmax(x, dim):
        calls.append(("log_softmax", tuple(x.shape)))
        return real_log_softmax(x, dim=dim)

    def topk(x, k, dim):
        calls.append(("topk", tuple(x.shape), k))
        return real_topk(x, k, dim=dim)

    monkeypatch.setattr(logprobs_module.torch, "log_softmax", log_softmax)
    monkeypatch.setattr(logprobs_module.torch, "topk", topk)
    logits = torch.randn(6, 40)
    token_logprobs(logits, [0] * 6, [None, 2, None, 5, 0, None])
    assert calls == [("log_softmax", (3, 40)), ("topk", (3, 40), 5)]
    calls.clear()
    token_logprobs(logits, [0] * 6, [None, 0, None, 0, None, None])  # no alternatives: no topk
    assert calls == [("log_softmax", (2, 40))]


# ---- the engine ----
@pytest.fixture
def engine(family, tiny_models, tokenizer):
    return Engine(tiny_models(family), tokenizer, max_rows=4)


def request(prompt_seed: int, prompt_len: int, prefix, new_tokens: int, **sampling) -> Request:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, **sampling)
    return Request(
        random_prompt(torch.Generator().manual_seed(prompt_seed), prompt_len), params, prefix=prefix
    )


def test_mixed_batch_logprobs_equal_the_models_own_forward(engine):
    """Six rows through four slots, joining at different steps: other prefixes, no prefix, a text
    prefix, sampled and greedy rows, rows without logprobs, a row that ends at its first token."""
    fp = engine.fingerprint
    text_prefix = engine.encode_prefix(random_prompt(torch.Generator().manual_seed(9), 6))
    rows = [
        request(1, 5, random_prefix(fp, 3, 1), 9, logprobs=5),
        request(2, 11, None, 7),  # no logprobs
        request(3, 4, random_prefix(fp, 8, 2), 10, logprobs=0, temperature=1.5, top_k=20, seed=3),
        request(4, 7, text_prefix, 6, logprobs=20),
        request(5, 3, None, 1, logprobs=2),  # done at its first token
        request(6, 9, random_prefix(fp, 5, 3), 8, logprobs=3, temperature=0.7, top_p=0.8, seed=4),
    ]
    prefixes = [r.prefix for r in rows]  # the engine drops a request's prefix when it leaves its slot
    run_joining(engine, rows, joins_at=[0, 0, 0, 2, 3, 5])
    assert rows[1].output_logprobs == []
    for r, prefix in zip(rows, prefixes, strict=True):
        assert len(r.output_token_ids) == r.sampling.max_new_tokens
        if r.sampling.logprobs is None:
            continue
        ref = reference_logprobs(engine.model, prefix, r.prompt_token_ids, r.output_token_ids)
        assert_matches_reference(r.output_logprobs, r.output_token_ids, ref, r.sampling.logprobs)


def test_text_prefix_logprobs_equal_one_forward_over_text_and_sequence(engine):
    """An external oracle: a prefix made from a text acts as the text prepended, so one plain forward
    over text + prompt + output gives every position's distribution."""
    text = random_prompt(torch.Generator().manual_seed(7), 8)
    r = request(8, 6, engine.encode_prefix(text), 7, logprobs=4)
    engine.generate([r, request(9, 3, None, 5)])
    ids = [*text, *r.prompt_token_ids, *r.output_token_ids[:-1]]
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([ids])).logits[0]  # [len(ids), vocab]
    ref = torch.log_softmax(logits.float(), dim=-1)[len(text) + len(r.prompt_token_ids) - 1 :]
    assert_matches_reference(r.output_logprobs, r.output_token_ids, ref, 4)


def test_greedy_outputs_are_unchanged_by_logprobs(engine):
    fp = engine.fingerprint
    prefixes = [random_prefix(fp, 4, 5), None, random_prefix(fp, 7, 6)]
    plain = engine.generate([request(10 + i, 6 + i, p, 8) for i, p in enumerate(prefixes)])
    asked = engine.generate([request(10 + i, 6 + i, p, 8, logprobs=3) for i, p in enumerate(prefixes)])
    assert [r.output_token_ids for r in asked] == [r.output_token_ids for r in plain]
    for r in asked:  # greedy: the chosen token is the most likely one
        assert all(e.top[0][0] == e.token_id and e.top[0][1] == e.logprob for e in r.output_logprobs)
    assert all(r.output_logprobs == [] for r in plain)


def test_sampled_logprobs_ignore_temperature(engine):
    """The raw distribution: the same tokens at another temperature have the same logprobs."""
    hot = engine.generate([request(20, 5, None, 6, logprobs=2, temperature=3.0, seed=1)])[0]
    forced = Request(hot.prompt_token_ids, SamplingParams(max_new_tokens=1, logprobs=2))
    engine.generate([forced])
    assert abs(forced.output_logprobs[0].logprob - hot.output_logprobs[0].top[0][1]) < ATOL


@pytest.mark.parametrize("value", [-1, 21, True, 2.0])
def test_logprobs_out_of_range_are_refused(value):
    with pytest.raises(InvalidRequest, match=f"logprobs must be null or 0-20, got {value!r}"):
        SamplingParams(logprobs=value)
