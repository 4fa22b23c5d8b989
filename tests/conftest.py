"""Shared fixtures: tiny random models of several families, a byte-level tokenizer, PEFT helpers, the app
in-process on a tiny engine.

Nothing is downloaded: every model is built from a config with a fixed seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os

import httpx
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from server.engine.engine import Engine
from server.engine.model import freeze
from server.registry.format import ModelFingerprint, PrefixKV, save_native

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded in tests
# Servers that tests start (in process or as processes, which inherit this) keep the eager decode step:
# compiling takes minutes of CPU. tests/test_compiled.py compiles on purpose.
os.environ.setdefault("PREFIX_SERVER_COMPILE", "off")

EOS_ID, PAD_ID = 0, 1
VOCAB = 258  # 2 specials + 256 byte symbols


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer with no merges: one token per byte, offline."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": EOS_ID, "<pad>": PAD_ID} | {ch: i + 2 for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")


_COMMON = dict(vocab_size=VOCAB, eos_token_id=EOS_ID, pad_token_id=PAD_ID, bos_token_id=EOS_ID)
_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=512)

TINY_CONFIGS = {
    "llama-gqa": lambda: LlamaConfig(**_COMMON, **_LLAMA, num_attention_heads=4, num_key_value_heads=2),
    "llama-mha": lambda: LlamaConfig(**_COMMON, **_LLAMA, num_attention_heads=4, num_key_value_heads=4),
    "qwen2": lambda: Qwen2Config(**_COMMON, **_LLAMA, num_attention_heads=4, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(
        **_COMMON, **_LLAMA, num_attention_heads=4, num_key_value_heads=1, sliding_window=None
    ),
    "gpt2": lambda: GPT2Config(**_COMMON, n_embd=64, n_layer=2, n_head=4, n_positions=512),
}


def make_tiny_model(family: str, seed: int = 0):
    """A frozen float32 tiny random model of the given family."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[family]()
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init is small; scale it so different prefixes give visibly different greedy outputs.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    return freeze(model)


# A chat template for the byte tokenizer (which has none; the chat routes need one): each message as
# <role>content and a newline, then <assistant>.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def chat_engine(family: str = "llama-gqa") -> Engine:
    """An Engine on the tiny model of `family`, its byte tokenizer carrying CHAT_TEMPLATE."""
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return Engine(make_tiny_model(family), tokenizer)


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session", params=list(TINY_CONFIGS))
def family(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_models():
    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = make_tiny_model(family)
        return cache[family]

    return get


def random_prompt(gen: torch.Generator, length: int) -> list[int]:
    """Token ids that avoid the special tokens (so no row stops early on EOS by accident)."""
    return torch.randint(2, VOCAB, (length,), generator=gen).tolist()


def peft_prefix_model(base_model, num_virtual_tokens: int, seed: int, tmp_path, projection: bool = False):
    """A PEFT PrefixTuning model with random prefix weights, saved the way PEFT saves it.

    Returns (peft_model, adapter_model.safetensors bytes, adapter_config.json bytes).
    """
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, prefix_projection=projection
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(base_model, config)
    with torch.no_grad():
        for p in peft_model.prompt_encoder["default"].parameters():
            torch.nn.init.normal_(p, std=1.0)
    peft_model.eval()
    out = tmp_path / f"adapter-{seed}"
    peft_model.save_pretrained(out)
    return (
        peft_model,
        (out / "adapter_model.safetensors").read_bytes(),
        (out / "adapter_config.json").read_bytes(),
    )


@torch.inference_mode()
def peft_greedy(peft_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Reference: a greedy loop over PeftModel.forward (PeftModel.generate ignores the prefix with
    transformers 5, see PREFIX-FACTS), recomputing the whole sequence each step."""
    ids = list(prompt_ids)
    out = []
    for _ in range(max_new_tokens):
        input_ids = torch.tensor([ids])
        logits = peft_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
        token = int(logits[0, -1].argmax())
        out.append(token)
        ids.append(token)
    return out


# The prefix stores' tests (folder, shared folder, S3) store these small native prefixes.
STORE_FP = ModelFingerprint("llama", 2, 2, 16)


@functools.cache  # safetensors orders metadata differently per call: keep one blob per seed
def native_bytes(seed: int, num_virtual_tokens: int = 4) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    shape = (STORE_FP.num_layers, STORE_FP.kv_heads, num_virtual_tokens, STORE_FP.head_dim)
    keys, values = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    return save_native(PrefixKV(keys, values, STORE_FP))


def put_prefix(store, task_id: str, seed: int):
    """Store `native_bytes(seed)` as the task's next version; returns its PrefixRecord."""
    return store.put(task_id, lambda version: native_bytes(seed), num_virtual_tokens=4, source="native")


async def wait_for_load_error(app, timeout_s: float = 5.0) -> str:
    """The app's startup failure message, once its background load has failed ("" if it did not)."""
    for _ in range(int(timeout_s / 0.02)):
        if app.state.server.load_error:
            break
        await asyncio.sleep(0.02)
    return app.state.server.load_error or ""


def save_model_folder(engine, folder):
    """The engine's model and tokenizer saved as a Hugging Face folder (a server process loads it in
    seconds); returns the folder."""
    engine.model.save_pretrained(folder)
    engine.tokenizer.save_pretrained(folder)
    return folder


def run_joining(engine, requests, joins_at) -> None:
    """Continuous batching by hand: each request is admitted at its decode step in `joins_at` (or as soon
    after as a slot is free), and the engine steps until every request is done."""
    pending, step = list(zip(requests, joins_at, strict=True)), 0
    while pending or engine.running:
        joining = [r for r, at in pending if at <= step][: engine.num_free_rows]
        pending = [(r, at) for r, at in pending if r not in joining]
        engine.admit(joining)
        engine.step()
        step += 1


def tiny_app(engine, prefix_dir, model_name: str = "tiny", **settings):
    """The real app serving `engine` (already built, so it is ready at once), its prefixes in a
    PrefixRegistry over the folder `prefix_dir`; `settings`: other Settings fields."""
    from server.api.app import Components, create_app
    from server.config import Settings
    from server.registry.registry import PrefixRegistry

    config = Settings(prefix_dir=prefix_dir, **settings)
    registry = PrefixRegistry.open(
        config.prefix_dir,
        engine.fingerprint,
        cache_bytes=10_000_000,
        dtype=engine.dtype,
        device=engine.device,
        store_read_delay_ms=config.store_read_delay_ms,
    )
    return create_app(config, Components(engine=engine, registry=registry, model_name=model_name))


@contextlib.asynccontextmanager
async def app_client(app, base_url: str = "http://t"):
    """An httpx client of `app` in process (ASGITransport), inside the app's lifespan; `.app` is the app,
    `.root` its prefix folder."""
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url) as client,
    ):
        client.app = app
        client.root = app.state.server.settings.prefix_dir
        yield client


def use_s3_endpoint(monkeypatch, endpoint_url: str, tmp_path) -> None:
    """boto3 (here and in child processes) talks to `endpoint_url` with test credentials, and reads
    nothing from this machine's ~/.aws."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }.items():
        monkeypatch.setenv(name, value)
