"""Mixed-prefix batched generation: each row equals the same request alone, and PEFT's own forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import EOS_ID, make_tiny_model, peft_greedy, peft_prefix_model, random_prompt

from server.engine.engine import Engine
from server.errors import InvalidRequest, PrefixFormatError
from server.output import finish_texts
from server.registry.format import ModelFingerprint, PrefixKV, load_prefix
from server.request import FinishReason, Request, SamplingParams


def random_prefix(fp: ModelFingerprint, num_virtual_tokens: int, seed: int) -> PrefixKV:
    gen = torch.Generator().manual_seed(seed)
    shape = (fp.num_layers, fp.kv_heads, num_virtual_tokens, fp.head_dim)
    return PrefixKV(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), fp)


def make_requests(prefixes, prompt_lens, new_tokens, **sampling) -> list[Request]:
    return [
        Request(
            prompt_token_ids=random_prompt(torch.Generator().manual_seed(100 + i), t),
            prefix=p,
            sampling=SamplingParams(max_new_tokens=n, ignore_eos=True, **sampling),
        )
        for i, (p, t, n) in enumerate(zip(prefixes, prompt_lens, new_tokens, strict=True))
    ]


@pytest.fixture
def engine(family, tiny_models, tokenizer):
    return Engine(tiny_models(family), tokenizer)


def test_mixed_batch_equals_each_request_alone(engine):
    fp = engine.fingerprint
    p3, p8, p5 = random_prefix(fp, 3, 1), random_prefix(fp, 8, 2), random_prefix(fp, 5, 3)
    prefixes = [p3, p8, None, p5, p8, None]
    prompt_lens, new_tokens = [5, 17, 9, 1, 12, 30], [12, 4, 9, 16, 7, 10]
    batch = engine.generate(make_requests(prefixes, prompt_lens, new_tokens))
    alone = [engine.generate([r])[0] for r in make_requests(prefixes, prompt_lens, new_tokens)]
    for b, a, n in zip(batch, alone, new_tokens, strict=True):
        assert len(b.output_token_ids) == n
        assert b.output_token_ids == a.output_token_ids
        assert b.finish_reason is FinishReason.LENGTH
    # The prefixes really act: the same prompt without its prefix gives other tokens.
    bare = engine.generate(make_requests([None], [17], [4]))[0]
    assert bare.output_token_ids != batch[1].output_token_ids


def test_rows_without_prefix_match_hf_generate(engine):
    """An external oracle for the padding/position logic: plain `generate` of the base model."""
    reqs = make_requests([None, None], [6, 11], [8, 8])
    engine.generate(reqs)
    for r in reqs:
        ids = torch.tensor([r.prompt_token_ids])
        ref = engine.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, eos_token_id=None
        )
        assert r.output_token_ids == ref[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "mlp"])
def test_rows_equal_peft_reference(family, tokenizer, tmp_path, projection):
    base = make_tiny_model(family)
    engine = Engine(base, tokenizer)
    adapters = []
    for seed, num_virtual_tokens in ((11, 4), (12, 9)):
        peft_model, weights, config = peft_prefix_model(
            make_tiny_model(family), num_virtual_tokens, seed, tmp_path, projection
        )
        prefix = load_prefix(weights, engine.fingerprint, adapter_config=config)
        assert prefix.num_virtual_tokens == num_virtual_tokens
        adapters.append((peft_model, prefix))
    rows = [adapters[0], adapters[1], (None, None), adapters[0]]
    prompt_lens, new_tokens = [7, 3, 10, 15], [10, 10, 6, 8]
    reqs = make_requests([p for _, p in rows], prompt_lens, new_tokens)
    engine.generate(reqs)
    for (peft_model, _), r, n in zip(rows, reqs, new_tokens, strict=True):
        if peft_model is None:
            continue
        assert r.output_token_ids == peft_greedy(peft_model, r.prompt_token_ids, n)


def test_finished_rows_give_their_pages_back(engine):
    fp = engine.fingerprint
    reqs = make_requests([random_prefix(fp, 4, 1), None, random_prefix(fp, 6, 2)], [5, 8, 3], [2, 9, 5])
    engine.admit(reqs)
    sizes = [len(engine.running)]
    while engine.running:
        engine.step()
        sizes.append(len(engine.running))
    assert sizes[:2] == [3, 2]  # the 2-token row is gone after its second token
    assert sizes[4] == 1 and sizes[-1] == 0
    assert [len(r.output_token_ids) for r in reqs] == [2, 9, 5]
    # Only the two prefixes stay resident (idle, evictable): every row's own pages are back.
    assert engine.kv_stats()["pages_used"] == engine.prefixes.resident_pages == 2
    assert engine.num_available_pages == engine.pool.num_usable


def test_requests_joining_mid_flight_equal_alone(engine):
    """Continuous batching: rows join a running batch at later steps and still match running alone."""
    fp = engine.fingerprint
    prefixes = [random_prefix(fp, 3, 1), None, random_prefix(fp, 9, 2), random_prefix(fp, 5, 3), None]
    prompt_lens, new_tokens = [6, 14, 2, 9, 21], [20, 5, 12, 7, 9]
    joins_at = [0, 0, 3, 4, 10]  # decode step at which each request is admitted
    reqs = make_requests(prefixes, prompt_lens, new_tokens)
    step = 0
    while step <= max(joins_at) or engine.running:
        joining = [r for r, at in zip(reqs, joins_at, strict=True) if at == step]
        engine.admit(joining)
        engine.step()
        step += 1
    alone = [engine.generate([r])[0] for r in make_requests(prefixes, prompt_lens, new_tokens)]
    assert [r.output_token_ids for r in reqs] == [a.output_token_ids for a in alone]
    assert all(len(r.output_token_ids) == n for r, n in zip(reqs, new_tokens, strict=True))


def test_more_requests_than_rows(family, tiny_models, tokenizer):
    engine = Engine(tiny_models(family), tokenizer, max_rows=3)
    fp = engine.fingerprint
    prefixes = [random_prefix(fp, 4 + i, i) if i % 2 else None for i in range(7)]
    prompt_lens, new_tokens = [3, 40, 7, 12, 1, 30, 5], [9, 60, 4, 30, 11, 50, 2]  # rows up to 100 columns
    batch = engine.generate(make_requests(prefixes, prompt_lens, new_tokens))
    assert engine.running == []
    alone = [
        Engine(tiny_models(family), tokenizer, max_rows=1).generate([r])[0]
        for r in make_requests(prefixes, prompt_lens, new_tokens)
    ]
    assert [b.output_token_ids for b in batch] == [a.output_token_ids for a in alone]


def test_abort_frees_the_row(engine):
    reqs = make_requests([None, None], [40, 6], [30, 30])
    engine.admit(reqs)
    engine.step()
    engine.abort([reqs[0]])
    assert engine.running == [reqs[1]] and reqs[0].finish_reason is FinishReason.ABORT
    while engine.running:
        engine.step()
    assert len(reqs[1].output_token_ids) == 30


def test_seeded_sampling_is_reproducible_in_any_batch(engine):
    fp = engine.fingerprint
    prefix = random_prefix(fp, 5, 7)
    params = dict(temperature=1.3, top_p=0.9, top_k=50, seed=1234)
    alone = engine.generate(make_requests([prefix], [9], [12], **params))[0]
    mixed = make_requests([None, prefix, random_prefix(fp, 2, 8)], [4, 9, 13], [5, 12, 3], **params)
    mixed[0] = Request(mixed[0].prompt_token_ids, SamplingParams(max_new_tokens=5, temperature=0.7, seed=9))
    mixed[1].input = dataclasses.replace(mixed[1].input, prompt_token_ids=alone.prompt_token_ids)
    engine.generate(mixed)
    assert mixed[1].output_token_ids == alone.output_token_ids
    other_seed = engine.generate(
        make_requests([prefix], [9], [12], temperature=1.3, top_p=0.9, top_k=50, seed=99)
    )[0]
    assert other_seed.output_token_ids != alone.output_token_ids


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate(make_requests([None], [8], [10]))[0]
    sampled = engine.generate(make_requests([None], [8], [10], temperature=2.0, top_k=1, seed=5))[0]
    assert sampled.output_token_ids == greedy.output_token_ids


def test_stop_string_and_eos(engine, tokenizer):
    """The engine stops on EOS and max_new_tokens; stop strings cut the text (server/output.py)."""
    full = finish_texts(engine.generate(make_requests([None], [8], [12])), tokenizer)[0]
    tokens = full.output_token_ids
    # Stop string: the text of tokens 3..4 -> text stops right before it.
    stop = tokenizer.decode(tokens[3:5])
    if stop.strip() == "" or full.text.find(stop) < 0:
        pytest.skip("generated tokens have no printable text to use as a stop string")
    req = make_requests([None], [8], [12], stop=(stop,))[0]
    req.input = dataclasses.replace(req.input, prompt_token_ids=full.prompt_token_ids)
    finish_texts(engine.generate([req]), tokenizer)
    assert req.finish_reason is FinishReason.STOP
    assert req.text == full.text[: full.text.find(stop)]
    # EOS: make the 4th generated token an EOS id; the row stops there unless ignore_eos.
    engine.eos_token_ids = frozenset({tokens[3]})
    try:
        stop_req = Request(full.prompt_token_ids, SamplingParams(max_new_tokens=12))
        ignore_req = Request(full.prompt_token_ids, SamplingParams(max_new_tokens=12, ignore_eos=True))
        engine.generate([stop_req, ignore_req])
    finally:
        engine.eos_token_ids = frozenset({EOS_ID})
    first = tokens.index(tokens[3])
    assert stop_req.output_token_ids == tokens[: first + 1] and stop_req.finish_reason is FinishReason.STOP
    assert ignore_req.output_token_ids == tokens and ignore_req.finish_reason is FinishReason.LENGTH


def test_validate_names_the_problem(engine):
    fp = engine.fingerprint
    too_long = Request([5] * 10, SamplingParams(max_new_tokens=600))
    with pytest.raises(
        InvalidRequest, match=r"10\) \+ max_new_tokens \(600\) = 610 tokens, model context is 512"
    ):
        engine.validate(too_long)
    with pytest.raises(InvalidRequest, match="prompt is empty"):
        engine.validate(Request([]))
    with pytest.raises(InvalidRequest, match="token ids must be in"):
        engine.validate(Request([10_000]))
    wrong = ModelFingerprint(fp.architecture, fp.num_layers + 1, fp.kv_heads, fp.head_dim)
    with pytest.raises(
        PrefixFormatError, match=f"prefix has {fp.num_layers + 1} layers, model has {fp.num_layers}"
    ):
        engine.validate(Request([5], prefix=random_prefix(wrong, 2, 0)))


def test_prefix_from_text_equals_prepending_the_text(engine):
    text_ids = random_prompt(torch.Generator().manual_seed(5), 11)
    prompt = random_prompt(torch.Generator().manual_seed(6), 7)
    prefix = engine.encode_prefix(text_ids)
    assert prefix.num_virtual_tokens == 11
    with_prefix = Request(prompt, SamplingParams(max_new_tokens=10, ignore_eos=True), prefix=prefix)
    prepended = Request(text_ids + prompt, SamplingParams(max_new_tokens=10, ignore_eos=True))
    engine.generate([with_prefix, prepended])
    assert with_prefix.output_token_ids == prepended.output_token_ids


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
        (dict(temperature=-1.0), "temperature must be a finite number >= 0, got -1.0"),
        (dict(temperature=float("nan")), "temperature must be a finite number"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(top_k=-2), r"top_k must be an integer in \[0, 2147483647\] \(0 = off.*got -2"),
        (dict(top_k=17553672784685947682816), r"top_k must be an integer in \[0, 2147483647\].*got 1755367"),
        (dict(seed=-1), "seed must be in"),
        (dict(stop=("",)), "stop strings must be non-empty"),
    ],
)
def test_sampling_params_are_validated(params, message):
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams(**params)
