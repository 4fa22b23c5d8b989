"""The prefill on the packed linears (server/engine/prefill_step.py) gives the tokens of transformers'
prefill: prefixes of every page alignment, mixed prompt lengths, chunks continuing a row, shared prefixes,
seeded sampling, the K/V it writes into the pages, and PEFT's tokens.

The engine's step here is the packed DecodeStep run uncompiled (as CompiledDecode holds it, without the
minutes of compiling): the prefill path is the same once a compiled step is warm."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, peft_greedy, peft_prefix_model, run_joining
from test_engine import make_requests, random_prefix

from server.engine import kernels, prefill_step
from server.engine.compiled import CompiledDecode
from server.engine.engine import Engine
from server.registry.format import load_prefix

pytestmark = pytest.mark.skipif(not kernels.avx512(), reason="the packed linears need an AVX-512 CPU")

PROMPTS = [70, 3, 33, 16, 1, 29]
PREFIXES = [17, None, 15, 16, 1, 15]  # rows 2 and 5 share one prefix object: its pages


def packed_engine(model, tokenizer, **kwargs) -> Engine:
    """An engine whose prefills (and decode steps) run on the packed DecodeStep, eagerly."""
    engine = Engine(model, tokenizer, **kwargs)
    decoder = CompiledDecode(model, engine.max_rows)
    decoder._compiled, decoder.ready = decoder.step, True  # the step as it is, uncompiled
    assert decoder.packed
    engine.decoder = decoder
    return engine


@pytest.fixture
def spy(monkeypatch):
    """Counts the packed prefills (a test that passed without one would prove nothing)."""
    calls = []
    real = prefill_step.prefill_logits

    def counted(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(prefill_step, "prefill_logits", counted)
    return calls


def prefixes_for(engine):
    fp = engine.fingerprint
    made = {n: random_prefix(fp, n, n) for n in set(PREFIXES) if n is not None}
    return [None if n is None else made[n] for n in PREFIXES]


@pytest.mark.parametrize("family", ["llama-gqa", "llama-mha", "qwen2", "mistral"])
@pytest.mark.parametrize("chunk", [0, 7])
def test_packed_prefill_gives_the_tokens_of_the_transformers_prefill(tokenizer, spy, family, chunk):
    model = make_tiny_model(family)
    eager = Engine(model, tokenizer, prefill_chunk_tokens=chunk)
    packed = packed_engine(model, tokenizer, prefill_chunk_tokens=chunk)
    prefixes = prefixes_for(eager)
    want = make_requests(prefixes, PROMPTS, [8] * len(PROMPTS), logprobs=0)
    got = make_requests(prefixes, PROMPTS, [8] * len(PROMPTS), logprobs=0)
    joins = [0, 0, 1, 1, 3, 3]  # rows join a batch that is decoding
    run_joining(eager, want, joins)
    run_joining(packed, got, joins)
    assert spy and (chunk == 0 or max(spy) > 1)
    for w, g in zip(want, got, strict=True):
        assert g.output_token_ids == w.output_token_ids
        first = (w.output_logprobs[0].logprob, g.output_logprobs[0].logprob)  # from the prefill's logits
        assert first[0] == pytest.approx(first[1], abs=1e-4)


def test_packed_prefill_writes_the_same_kv_into_the_pages(tokenizer, spy):
    model = make_tiny_model("llama-gqa")
    engines = [
        Engine(model, tokenizer, prefill_chunk_tokens=5),
        packed_engine(model, tokenizer, prefill_chunk_tokens=5),
    ]
    prefixes = prefixes_for(engines[0])
    for engine in engines:
        engine.admit(make_requests(prefixes, PROMPTS, [4] * len(PROMPTS)))  # the first chunk of each
        while engine.prefilling:
            engine.step()  # the later chunks (and decode steps of the rows done prefilling)
    assert spy
    torch.testing.assert_close(engines[1].pool.keys, engines[0].pool.keys, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(engines[1].pool.values, engines[0].pool.values, rtol=1e-4, atol=1e-4)


def test_packed_prefill_with_seeded_sampling(tokenizer, spy):
    model = make_tiny_model("qwen2")
    prefixes = prefixes_for(Engine(model, tokenizer))
    sampling = {"temperature": 0.9, "top_p": 0.9, "seed": 3}
    want = Engine(model, tokenizer).generate(make_requests(prefixes, PROMPTS, [6] * 6, **sampling))
    got = packed_engine(model, tokenizer).generate(make_requests(prefixes, PROMPTS, [6] * 6, **sampling))
    assert spy
    assert [r.output_token_ids for r in got] == [r.output_token_ids for r in want]


def test_packed_prefill_equals_peft(tokenizer, tmp_path, spy):
    peft_model, weights, config = peft_prefix_model(make_tiny_model("llama-gqa"), 20, 3, tmp_path)
    engine = packed_engine(make_tiny_model("llama-gqa"), tokenizer, prefill_chunk_tokens=6)
    prefix = load_prefix(weights, engine.fingerprint, adapter_config=config)
    [req] = engine.generate(make_requests([prefix], [45], [10]))
    assert spy
    assert req.output_token_ids == peft_greedy(peft_model, req.prompt_token_ids, 10)


def test_bfloat16_packed_prefill_is_close(tokenizer, spy):
    model = make_tiny_model("llama-gqa").to(torch.bfloat16)
    prefixes = [
        None if p is None else p.to(dtype=torch.bfloat16) for p in prefixes_for(Engine(model, tokenizer))
    ]
    want = make_requests(prefixes, PROMPTS, [1] * 6, logprobs=0)
    got = make_requests(prefixes, PROMPTS, [1] * 6, logprobs=0)
    Engine(model, tokenizer).generate(want)
    packed_engine(model, tokenizer).generate(got)
    assert spy
    for w, g in zip(want, got, strict=True):  # bfloat16 rounds in other places: close, not equal
        assert g.output_logprobs[0].logprob == pytest.approx(w.output_logprobs[0].logprob, abs=0.1)


def test_packed_prefill_off_uses_the_models_forward(tokenizer, spy):
    engine = packed_engine(make_tiny_model("llama-gqa"), tokenizer)
    engine.packed_prefill = False  # what loadtest/bench_prefill.py compares against
    engine.generate(make_requests([None], [12], [2]))
    assert spy == []
