"""The output processor (server/output.py): text made off the engine thread, incrementally, equal to one
decode of all the tokens; stop strings cut the text and take the row out of the engine at once."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from conftest import byte_tokenizer, random_prompt
from test_engine import make_requests

from server.engine.engine import Engine
from server.output import OutputProcessor, finish_text
from server.request import FinishReason, Request, RequestStatus, SamplingParams
from server.scheduler import Scheduler, SchedulerConfig

# Byte-level tokens: "é" and "→" and an emoji are 2, 3 and 4 tokens, so text arrives in partial characters.
TEXT = "naïve café → 🙂 done; ünïcode ✓ and plain ascii. " * 3


def stream_text(processor: OutputProcessor, tokenizer, ids: list[int], stop=()) -> tuple[str, Request]:
    """Feed ids one token per step as the scheduler does; returns the concatenated deltas."""
    request = Request([1], SamplingParams(max_new_tokens=len(ids), stop=stop), stream=True)
    request.status = RequestStatus.RUNNING
    sent = ""
    for token in ids:
        request.output_token_ids.append(token)
        if processor.update(request):
            break
        sent += request.take_delta()[1]
    if not request.finished:
        request.finish(FinishReason.LENGTH)
        processor.update(request)
    return sent + request.take_delta()[1], request


def test_incremental_text_equals_one_decode_with_partial_characters():
    tokenizer = byte_tokenizer()
    ids = tokenizer(TEXT)["input_ids"]
    text, request = stream_text(OutputProcessor(tokenizer), tokenizer, ids)
    assert text == request.text == tokenizer.decode(ids, skip_special_tokens=True) == TEXT


def test_random_tokens_stream_to_the_final_text():
    tokenizer = byte_tokenizer()
    for seed in range(20):
        ids = random_prompt(torch.Generator().manual_seed(seed), 40)
        text, request = stream_text(OutputProcessor(tokenizer), tokenizer, ids)
        assert text == request.text == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("stop", ["café", "🙂", "e;", "ascii. naïve"])
def test_stop_string_across_tokens_cuts_the_text_and_finishes(stop):
    tokenizer = byte_tokenizer()
    ids = tokenizer(TEXT)["input_ids"]
    text, request = stream_text(OutputProcessor(tokenizer), tokenizer, ids, stop=(stop,))
    assert request.finish_reason is FinishReason.STOP
    assert text == request.text == TEXT[: TEXT.find(stop)]
    # No token past the one that completed the stop string.
    assert stop in tokenizer.decode(request.output_token_ids)
    assert stop not in tokenizer.decode(request.output_token_ids[:-1])


def test_finish_text_finds_a_stop_in_the_last_tokens():
    tokenizer = byte_tokenizer()
    request = Request([1], SamplingParams(max_new_tokens=9, stop=("xyz", "fé")))
    request.output_token_ids = tokenizer("café au lait")["input_ids"]
    request.finish(FinishReason.LENGTH)
    finish_text(request, tokenizer)
    assert request.text == "ca" and request.finish_reason is FinishReason.STOP


async def test_a_stop_string_takes_the_row_out_of_the_engine(tiny_models, tokenizer):
    """Through the real scheduler and engine: the stopped row decodes no further token, its stream's deltas
    are the cut text, and another row of the batch goes on exactly as alone."""
    engine = Engine(tiny_models("llama-gqa"), tokenizer, max_rows=4)
    full = make_requests([None, None], [8, 5], [24, 24])
    engine.generate(full)
    texts = [tokenizer.decode(r.output_token_ids, skip_special_tokens=True) for r in full]
    # A stop string: the first printable ASCII character that appears only after a few tokens.
    stop = next(
        (
            c
            for i, c in enumerate(texts[0])
            if i >= 3 and c.isascii() and c.isprintable() and c.strip() and texts[0].find(c) == i
        ),
        None,
    )
    if stop is None:
        pytest.skip("no printable text to use as a stop string")
    cut = texts[0].find(stop)
    sched = Scheduler(engine, None, SchedulerConfig(max_batch_size=4), OutputProcessor(tokenizer))
    await sched.start()
    try:
        stopped, other = make_requests([None, None], [8, 5], [24, 24])
        sampling = SamplingParams(max_new_tokens=24, ignore_eos=True, stop=(stop,))
        stopped.input = dataclasses.replace(stopped.input, sampling=sampling, stream=True)
        sched.submit(stopped)
        sched.submit(other)

        async def events(request):
            return [e async for e in sched.events(request)]

        deltas, _ = await asyncio.gather(events(stopped), events(other))
    finally:
        await sched.stop()
    assert stopped.finish_reason is FinishReason.STOP and stopped.text == texts[0][:cut]
    assert "".join(e.text for e in deltas) == texts[0][:cut] and deltas[-1].kind == "done"
    # It stopped at the token that completed the stop string: its tokens are a prefix of the full run's.
    n = len(stopped.output_token_ids)
    assert stopped.output_token_ids == full[0].output_token_ids[:n] and n < 24
    assert stop not in tokenizer.decode(stopped.output_token_ids[:-1], skip_special_tokens=True)
    assert other.output_token_ids == full[1].output_token_ids and other.text == texts[1]
    assert not engine.running and engine.pool.num_free + engine.prefixes.idle_pages == engine.pool.num_usable
