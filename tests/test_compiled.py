"""The compiled decode step (torch.compile over the page pool) gives the eager engine's tokens, PEFT's
reference tokens, and never recompiles as rows join and leave or their block tables grow.

Compiling costs ~10 s per batch bucket even for a 2-layer model, so each family's engine compiles once
(3 buckets: 4 rows) and is shared by the tests of this module; it runs with on_new_shape="fail", so a
shape the warm-up did not foresee raises instead of silently running eagerly.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from conftest import app_client, make_tiny_model, peft_greedy, peft_prefix_model, run_joining
from test_engine import make_requests, random_prefix
from test_logprobs import assert_matches_reference, reference_logprobs
from torch._dynamo.utils import counters

import server.engine.compiled as compiled_module
from server.engine import kernels
from server.engine.compiled import batch_buckets, bucket_for, supports
from server.engine.engine import Engine
from server.registry.format import load_prefix
from server.request import SamplingParams

pytestmark = pytest.mark.slow
FAMILIES = ["llama-gqa", "qwen2"]  # GQA without and with q/k/v biases


# "packed": the CPU kernels (server/engine/kernels) where this CPU has AVX-512; "torch": the
# step on torch's own linears and SDPA, as it runs in bfloat16, on CUDA or without AVX-512. The biases
# matter to the packed kernels (their own bias add); torch's linears take them natively, so the torch
# step runs on one family (each variant costs ~20 s of compiling).
VARIANTS = [(family, "packed") for family in FAMILIES] + [("llama-gqa", "torch")]


@pytest.fixture(scope="module", params=VARIANTS, ids=["-".join(v) for v in VARIANTS])
def compiled(request, tokenizer):
    family, kind = request.param
    model = make_tiny_model(family)
    engine = Engine(model, tokenizer, max_rows=4)
    with pytest.MonkeyPatch.context() as mp:
        if kind == "torch":
            mp.setattr(compiled_module, "kernel_choice", lambda model: (False, False))
        engine.compile(on_new_shape="fail")
    ours = kind == "packed" and kernels.avx512()
    assert (engine.decoder.packed, engine.decoder.attention_kernel) == (ours, ours)
    return family, engine


def run_with_joins(engine, prefixes, prompt_lens, new_tokens, joins_at, **sampling):
    reqs = make_requests(prefixes, prompt_lens, new_tokens, **sampling)
    run_joining(engine, reqs, joins_at)
    return reqs


def test_buckets():
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(1) == [1]
    assert [bucket_for(n, [1, 2, 4, 6]) for n in (1, 2, 3, 5, 6)] == [1, 2, 4, 6, 6]


def test_compiled_equals_eager_as_rows_join_and_leave(compiled, tokenizer):
    _, engine = compiled
    eager = Engine(engine.model, tokenizer, max_rows=4)
    fp = engine.fingerprint
    # 6 requests through 4 rows: the batch goes 2 -> 3 (padded to 4) -> 4 -> 1, rows up to 110 tokens
    # (block tables from 1 to 7 pages wide: a new width must not recompile either).
    prefixes = [random_prefix(fp, 3, 1), None, random_prefix(fp, 9, 2), random_prefix(fp, 5, 3), None, None]
    prompt_lens, new_tokens = [6, 14, 2, 40, 21, 5], [20, 5, 12, 60, 9, 30]
    joins_at = [0, 0, 3, 4, 10, 11]
    graphs = counters["stats"]["unique_graphs"]
    got = run_with_joins(engine, prefixes, prompt_lens, new_tokens, joins_at)
    want = run_with_joins(eager, prefixes, prompt_lens, new_tokens, joins_at)
    assert [r.output_token_ids for r in got] == [r.output_token_ids for r in want]
    assert all(len(r.output_token_ids) == n for r, n in zip(got, new_tokens, strict=True))
    assert counters["stats"]["unique_graphs"] == graphs  # nothing was compiled after the warm-up


def test_compiled_shared_prefix_pages_and_odd_lengths_equal_eager(compiled, tokenizer):
    """Rows of one task sharing its pages (the kernel reads them once per group), and prefixes of 1, 15, 16,
    17 and 255 tokens (last pages partly empty), joining and leaving: the eager engine's tokens."""
    _, engine = compiled
    eager = Engine(engine.model, tokenizer, max_rows=4)
    fp = engine.fingerprint
    shared = random_prefix(fp, 17, 5)
    prefixes = [shared, shared, random_prefix(fp, 1, 6), shared, random_prefix(fp, 255, 7)]
    prefixes += [random_prefix(fp, 16, 8), shared, random_prefix(fp, 15, 9)]
    prompt_lens, new_tokens = [4, 9, 2, 16, 7, 30, 1, 5], [12, 20, 6, 9, 14, 8, 17, 10]
    joins_at = [0, 0, 0, 2, 3, 5, 6, 6]
    graphs = counters["stats"]["unique_graphs"]
    runs = []
    for e in (engine, eager):
        reqs = make_requests(prefixes, prompt_lens, new_tokens)
        for r in reqs:
            r.prefix_key = ("shared", 1, "x") if r.prefix is shared else None
        run_joining(e, reqs, joins_at)
        runs.append([r.output_token_ids for r in reqs])
    assert runs[0] == runs[1]
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_logits_are_close_to_eager(compiled, tokenizer):
    _, engine = compiled
    eager = Engine(engine.model, tokenizer, max_rows=4)
    fp = engine.fingerprint
    prefixes = [random_prefix(fp, 4, 7), None, random_prefix(fp, 11, 8)]
    for e in (engine, eager):
        e.admit(make_requests(prefixes, [5, 9, 3], [8, 8, 8]))
    got, want = engine.decode_logits(), eager.decode_logits()  # [3, vocab] each; one step each
    assert got.shape == want.shape == (3, engine.model.config.vocab_size)
    assert (got - want).abs().max().item() < 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    engine.abort(list(engine.running))


def test_compiled_seeded_sampling_equals_eager(compiled, tokenizer):
    _, engine = compiled
    eager = Engine(engine.model, tokenizer, max_rows=4)
    fp = engine.fingerprint
    args = ([random_prefix(fp, 6, 4), None, random_prefix(fp, 2, 5)], [4, 7, 12], [10, 10, 10], [0, 1, 2])
    sampling = dict(temperature=0.8, top_p=0.9, seed=1234)
    got = run_with_joins(engine, *args, **sampling)
    want = run_with_joins(eager, *args, **sampling)
    assert [r.output_token_ids for r in got] == [r.output_token_ids for r in want]


def test_compiled_equals_peft_reference(compiled, tokenizer, tmp_path):
    family, engine = compiled
    rows = []
    for seed, num_virtual_tokens in ((21, 4), (22, 7)):
        peft_model, weights, config = peft_prefix_model(
            make_tiny_model(family), num_virtual_tokens, seed, tmp_path
        )
        rows.append((peft_model, load_prefix(weights, engine.fingerprint, adapter_config=config)))
    reqs = make_requests([p for _, p in rows], [8, 3], [10, 10])
    engine.generate(reqs)
    for (peft_model, _), r in zip(rows, reqs, strict=True):
        assert r.output_token_ids == peft_greedy(peft_model, r.prompt_token_ids, 10)


def test_compiled_logprobs_equal_the_models_own_forward(compiled):
    """Logprobs come from the compiled step's logits (padded rows cut off) for the rows that ask."""
    _, engine = compiled
    fp = engine.fingerprint
    prefixes = [random_prefix(fp, 3, 1), None, random_prefix(fp, 6, 2)]
    reqs = make_requests(prefixes, [5, 9, 4], [8, 6, 8], logprobs=4)
    reqs[1].input = dataclasses.replace(
        reqs[1].input, sampling=SamplingParams(max_new_tokens=6, ignore_eos=True)
    )
    # 3 rows: bucket 4, one asks not
    engine.generate(reqs)
    assert reqs[1].output_logprobs == [] and len(reqs[1].output_token_ids) == 6
    for r, prefix in ((reqs[0], prefixes[0]), (reqs[2], prefixes[2])):
        ref = reference_logprobs(engine.model, prefix, r.prompt_token_ids, r.output_token_ids)
        assert_matches_reference(r.output_logprobs, r.output_token_ids, ref, 4)


@pytest.mark.skipif(not kernels.avx512(), reason="the packed linears need AVX-512")
def test_compiled_bfloat16_is_close_to_eager(tokenizer):
    """bfloat16 on the packed linears (float32 products, one rounding, like oneDNN) and paged attention:
    next-token logits within bfloat16 rounding of the eager step's (greedy tokens can part at near-ties,
    as eager bfloat16 itself does between batch shapes)."""
    model = make_tiny_model("llama-gqa").to(torch.bfloat16)
    engine = Engine(model, tokenizer, max_rows=2)
    engine.compile(on_new_shape="fail")
    assert (engine.decoder.packed, engine.decoder.attention_kernel) == (True, True)
    eager = Engine(model, tokenizer, max_rows=2)
    fp = engine.fingerprint
    prefixes = [random_prefix(fp, 4, 7), None]
    for e in (engine, eager):
        e.admit(make_requests(prefixes, [5, 9], [8, 8]))
    got, want = engine.decode_logits(), eager.decode_logits().float()  # [2, vocab]
    torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)
    top2 = want.topk(2, dim=-1).values  # where eager's choice is clear of bfloat16 rounding, the same choice
    clear = top2[:, 0] - top2[:, 1] > 0.1
    assert clear.any() and torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_models_outside_the_compiled_loop_stay_eager(tokenizer):
    gpt2 = make_tiny_model("gpt2")
    assert "gpt2" in supports(gpt2)
    engine = Engine(gpt2, tokenizer)
    with pytest.raises(ValueError, match="does not cover this model"):
        engine.compile()
    assert engine.try_compile() is False and engine.decoder is None
    reqs = engine.generate(make_requests([None], [5], [3]))  # still serves, eagerly
    assert len(reqs[0].output_token_ids) == 3


async def test_server_compile_modes(tmp_path, tokenizer):
    """--compile through the real start-up path (model loaded from a folder): `wait` compiles before
    /ready, `auto` is ready at once and switches when compiled, `off` never compiles; /metrics says
    which step runs, and the compiled servers' tokens equal the eager server's."""
    from server.api.app import create_app
    from server.config import Settings

    model_dir = tmp_path / "model"
    make_tiny_model("llama-gqa").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    body = {"prompt": "hello prefixes", "max_new_tokens": 12, "ignore_eos": True}
    replies = {}
    for mode in ("wait", "auto", "off"):
        settings = Settings(
            model=str(model_dir), compile=mode, max_batch_size=2, prefix_dir=tmp_path / f"prefixes-{mode}"
        )
        app = create_app(settings)
        async with app_client(app) as client:
            for _ in range(600):
                if (await client.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            engine = app.state.server.components.engine
            assert (engine.decoder is not None) is (mode == "wait")  # auto: still compiling when ready
            if mode == "auto":
                for _ in range(1200):
                    if engine.decoder is not None:
                        break
                    await asyncio.sleep(0.1)
            resp = await client.post("/generate", json=body)
            assert resp.status_code == 200, resp.text
            replies[mode] = resp.json()["token_ids"]
            gauge = [
                ln
                for ln in (await client.get("/metrics")).text.splitlines()
                if ln.startswith("prefix_server_compiled_decode ")
            ]
            assert gauge == [f"prefix_server_compiled_decode {1.0 if mode != 'off' else 0.0}"]
    assert replies["wait"] == replies["auto"] == replies["off"] and len(replies["off"]) == 12
