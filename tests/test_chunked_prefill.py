"""Chunked prefill: a prompt longer than the chunk budget is prefilled over several steps, each chunk
attending to the row's prefix and its earlier chunks in the pages, and the tokens stay exactly those of the
whole prompt in one prefill (and PEFT's); the decoding rows get a token between the chunks."""

from __future__ import annotations

import pytest
from conftest import make_tiny_model, peft_greedy, peft_prefix_model
from test_engine import make_requests, random_prefix

from server.engine.engine import Engine
from server.registry.format import load_prefix

PROMPTS = [70, 3, 33, 16, 1]  # around and across a chunk of 16 and the 16-token pages
PREFIXES = [17, None, 5, 16, 1]


def outputs(engine, prefixes, **sampling):
    reqs = make_requests(prefixes, PROMPTS, [9] * len(PROMPTS), **sampling)
    return [r.output_token_ids for r in engine.generate(reqs)]


@pytest.mark.parametrize("family", ["llama-gqa", "gpt2"])
@pytest.mark.parametrize("chunk", [1, 7, 16, 40])
def test_chunked_prefill_equals_the_whole_prompt(tiny_models, tokenizer, family, chunk):
    """Mixed prefixes and prompt lengths, joined together: chunks of any size (a token at a time too) give
    the tokens of every prompt prefilled whole. GPT-2 is on the eager decode path."""
    model = tiny_models(family)
    fp = Engine(model, tokenizer).fingerprint
    prefixes = [None if n is None else random_prefix(fp, n, n) for n in PREFIXES]
    whole = outputs(Engine(model, tokenizer, prefill_chunk_tokens=0), prefixes)
    assert outputs(Engine(model, tokenizer, prefill_chunk_tokens=chunk), prefixes) == whole


def test_chunked_prefill_with_seeded_sampling_equals_the_whole_prompt(tiny_models, tokenizer):
    model = tiny_models("llama-gqa")
    fp = Engine(model, tokenizer).fingerprint
    prefixes = [None if n is None else random_prefix(fp, n, n) for n in PREFIXES]
    sampling = {"temperature": 0.9, "top_p": 0.9, "seed": 5}
    whole = outputs(Engine(model, tokenizer, prefill_chunk_tokens=0), prefixes, **sampling)
    assert outputs(Engine(model, tokenizer, prefill_chunk_tokens=8), prefixes, **sampling) == whole


def test_chunked_prefill_on_another_attention_implementation(tokenizer):
    """A model on eager attention (no cascade) gets its context (prefix + earlier chunks) side by side with
    the chunk, from the same pages."""
    model = make_tiny_model("llama-gqa")
    model.config._attn_implementation = "eager"
    fp = Engine(model, tokenizer).fingerprint
    prefixes = [None if n is None else random_prefix(fp, n, n) for n in PREFIXES]
    whole = outputs(Engine(model, tokenizer, prefill_chunk_tokens=0), prefixes)
    assert outputs(Engine(model, tokenizer, prefill_chunk_tokens=10), prefixes) == whole


def test_chunked_prefill_equals_peft(tokenizer, tmp_path):
    peft_model, weights, config = peft_prefix_model(make_tiny_model("llama-gqa"), 20, 3, tmp_path)
    engine = Engine(make_tiny_model("llama-gqa"), tokenizer, prefill_chunk_tokens=6)
    prefix = load_prefix(weights, engine.fingerprint, adapter_config=config)
    [req] = engine.generate(make_requests([prefix], [45], [10]))
    assert req.output_token_ids == peft_greedy(peft_model, req.prompt_token_ids, 10)


def test_decoding_rows_get_a_token_between_the_chunks_of_a_long_prompt(tiny_models, tokenizer):
    """A 64-token prompt at 8 tokens per chunk takes 8 chunks (admit's and one per step after the next);
    the running row decodes a token in every step meanwhile, and the long row, once its prompt is in,
    decodes in the same step (its first token from the last chunk, its second from the decode)."""
    engine = Engine(tiny_models("llama-gqa"), tokenizer, prefill_chunk_tokens=8)
    short, long = make_requests([None, None], [4, 64], [30, 5])
    engine.admit([short])
    assert len(short.output_token_ids) == 1 and not engine.prefilling
    engine.admit([long])  # its first chunk
    assert engine.prefilling == [long] and long.output_token_ids == []
    counts = []
    for _ in range(8):
        engine.step()  # the first: admit ran this round's chunk, so a decode only; then a chunk + a decode
        counts.append((len(short.output_token_ids), len(long.output_token_ids)))
    assert [s for s, _ in counts] == list(range(2, 10))  # one token per step throughout
    assert [n for _, n in counts] == [0] * 7 + [2] and not engine.prefilling
    while engine.running:
        engine.step()
    alone = Engine(tiny_models("llama-gqa"), tokenizer, prefill_chunk_tokens=0)
    [again] = alone.generate(make_requests([None, None], [4, 64], [30, 5])[1:])
    assert long.output_token_ids == again.output_token_ids


def test_a_chunk_budget_is_shared_oldest_first(tiny_models, tokenizer):
    """Joiners together: the oldest prompts take the budget first, a row may be split across rounds."""
    engine = Engine(tiny_models("llama-gqa"), tokenizer, prefill_chunk_tokens=10)
    a, b, c = make_requests([None] * 3, [4, 12, 3], [5] * 3)
    engine.admit([a, b, c])  # all of a (4) and 6 of b's 12
    assert len(a.output_token_ids) == 1 and engine.prefilling == [b, c]
    engine.step()  # admit ran this round's chunk: a decodes
    assert [len(r.output_token_ids) for r in (a, b, c)] == [2, 0, 0]
    engine.step()  # the rest of b (6) and all of c (3); then every row decodes
    assert not engine.prefilling
    assert [len(r.output_token_ids) for r in (a, b, c)] == [3, 2, 2]


def test_abort_while_prefilling_gives_its_pages_back(tiny_models, tokenizer):
    engine = Engine(tiny_models("llama-gqa"), tokenizer, prefill_chunk_tokens=8)
    free = engine.pool.num_free
    [long] = make_requests([random_prefix(engine.fingerprint, 5, 1)], [60], [5])
    engine.admit([long])
    assert engine.prefilling == [long] and engine.pool.num_free < free
    engine.abort([long])
    assert not engine.prefilling and not engine.running
    assert engine.pool.num_free + engine.prefixes.idle_pages == free
    assert long.finished


def test_a_negative_chunk_budget_is_refused():
    from server.config import Settings
    from server.errors import ConfigError

    with pytest.raises(ConfigError, match="prefill_chunk_tokens must be >= 0"):
        Settings(prefill_chunk_tokens=-1)


def test_whole_prompt_engine_needs_no_chunks(tiny_models, tokenizer):
    """prefill_chunk_tokens=0: every prompt whole at admission, as before chunking."""
    engine = Engine(tiny_models("llama-gqa"), tokenizer, prefill_chunk_tokens=0)
    reqs = make_requests([None, None], [300, 2], [3, 3])
    engine.admit(reqs)
    assert not engine.prefilling and all(len(r.output_token_ids) == 1 for r in reqs)
