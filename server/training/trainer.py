"""Prefix tuning with PEFT on the frozen base model; held-out evaluation through the serving Engine.

Training runs `PeftModel.forward` (correct under transformers 5). The trained prefix is exported the
way PEFT saves it and read back with the server's own `load_prefix`; the "after" score is that
prefix decoded by the Engine, so it is the score of what the server will serve.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import safetensors.torch
import torch
from transformers import PreTrainedModel

from server.engine.engine import Engine
from server.errors import InvalidRequest, PrefixServerError
from server.registry.format import ModelFingerprint, PrefixKV, load_prefix, to_peft
from server.training.data import IGNORE_INDEX, Batch, Example, collate, encode
from server.training.evaluate import EvalResult, evaluate
from server.training.progress import Progress, quiet_deprecations

try:
    from peft import PeftModel, PrefixTuningConfig, get_peft_model
except ImportError as e:  # peft is in the dev extra; serving does not need it
    raise PrefixServerError("training needs peft: pip install 'peft>=0.21' (make install has it)") from e

ADAPTER = "default"  # PEFT's adapter name
INIT_CHOICES = ("examples", "text", "random")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one prefix-tuning run; lr is AdamW's peak (linear warmup, then linear decay)."""

    num_virtual_tokens: int = 16
    prefix_projection: bool = False  # train through PEFT's reparametrizing MLP
    encoder_hidden_size: int | None = None  # that MLP's width (default: PEFT's, kv_heads * head_dim)
    epochs: int = 3
    lr: float = 1e-2
    batch_size: int = 8
    max_steps: int | None = None  # stop early after this many optimizer steps
    warmup_fraction: float = 0.1
    seed: int = 0
    chat_template: bool = False  # prompts are wrapped as one user turn of the model's chat template
    # Where the prefix starts: "examples" = the K/V of the first training examples' text, "text" = the
    # K/V of init_text (both cycled/cut to num_virtual_tokens), "random" = PEFT's own initialization.
    # None: "random" with prefix_projection (the MLP's input is not K/V), else "examples".
    init: str | None = None
    init_text: str | None = None
    eval_batch_size: int = 32

    def __post_init__(self) -> None:
        for name in ("num_virtual_tokens", "epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise InvalidRequest(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise InvalidRequest(f"max_steps must be >= 1, got {self.max_steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InvalidRequest(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.warmup_fraction < 1:
            raise InvalidRequest(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.init is None:
            object.__setattr__(self, "init", "random" if self.prefix_projection else "examples")
        if self.init not in INIT_CHOICES:
            raise InvalidRequest(f"init must be one of {', '.join(INIT_CHOICES)}, got {self.init!r}")
        if (self.init == "text") != bool(self.init_text):
            raise InvalidRequest("init='text' needs a non-empty init_text, and init_text needs init='text'")
        if self.init != "random" and self.prefix_projection:
            raise InvalidRequest(
                f"init={self.init!r} sets the prefix itself; with prefix_projection use init='random'"
            )


@dataclass
class TrainResult:
    prefix: PrefixKV  # what the server serves: keys, values [num_layers, kv_heads, P, head_dim]
    peft_model: PeftModel  # for save_pretrained (the PEFT export)
    before: EvalResult  # base model, no prefix
    after: EvalResult  # the trained prefix through the Engine
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    train_seconds: float = 0.0  # the optimizer loop
    eval_seconds: float = 0.0  # both held-out evaluations


class TrainingStopped(PrefixServerError):
    """A run stopped from outside (a fine-tuning job cancelled); its last checkpoint stays."""

    code = "training_stopped"


@dataclass
class TrainHooks:
    """How a fine-tuning job (server/finetune/run.py) watches and steers a run; the CLI passes none.

    on_step(step, total, loss) after every optimizer step; every `checkpoint_every` steps `save(state)`
    gets what `resume` takes back (the prefix's parameters, the optimizer and schedule, the losses and the
    base model's score), so a resumed run continues exactly where the saved one stood; `stop()` is asked
    before each step (True: raise TrainingStopped)."""

    on_step: Callable[[int, int, float], None] | None = None
    checkpoint_every: int = 0
    save: Callable[[dict], None] | None = None
    resume: dict | None = None
    stop: Callable[[], bool] | None = None


def initial_text(train: Sequence[Example], config: TrainConfig) -> str | None:
    """The text whose K/V starts the prefix (None: PEFT's random initialization)."""
    if config.init == "examples":
        return "".join(ex.prompt + ex.completion + "\n" for ex in train[:8])
    return config.init_text


def make_peft_model(engine: Engine, config: TrainConfig, text: str | None) -> PeftModel:
    """Wrap the frozen base model for prefix tuning; only the prefix (and its MLP) can learn.

    text: start from its K/V under the base model (a real prefix: the model reading that text), which
    trains faster and more stably than random noise (Li & Liang 2021); None: PEFT's init.
    """
    peft_config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=config.num_virtual_tokens,
        prefix_projection=config.prefix_projection,
        **({"encoder_hidden_size": config.encoder_hidden_size} if config.encoder_hidden_size else {}),
    )
    torch.manual_seed(config.seed)  # PEFT's own initialization of the prefix
    peft_model = get_peft_model(engine.model, peft_config)
    peft_model.eval()  # no dropout: the base model must behave as it does when serving
    if text is not None:
        ids = list(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise InvalidRequest(f"init text {text!r:.40} is empty after tokenization")
        ids = (ids * math.ceil(config.num_virtual_tokens / len(ids)))[: config.num_virtual_tokens]
        blob, _ = to_peft(engine.encode_prefix(ids))  # PEFT's layout: [P, num_layers*2*kv_heads*head_dim]
        with torch.no_grad():
            embedding = peft_model.prompt_encoder[ADAPTER].embedding.weight  # [P, L*2*kv*D]
            embedding.copy_(safetensors.torch.load(blob)["prompt_embeddings"])
    return peft_model


def trained_prefix(peft_model: PeftModel, fingerprint: ModelFingerprint) -> PrefixKV:
    """The prefix exactly as PEFT saves it (the MLP's output if any), read by the server's own loader."""
    with torch.no_grad():
        embeddings = peft_model.get_prompt_embedding_to_save(ADAPTER)  # [P, L*2*kv*D]
    blob = safetensors.torch.save({"prompt_embeddings": embeddings.float().contiguous()})
    adapter_config = json.dumps(peft_model.peft_config[ADAPTER].to_dict(), default=str).encode()
    return load_prefix(blob, fingerprint, adapter_config=adapter_config, max_virtual_tokens=1 << 20)


def completion_loss(peft_model: PeftModel, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over completion tokens (prompt and padding carry no loss)."""
    targets = batch.labels[:, 1:]  # [batch, seq - 1] the token each position predicts
    # Only positions that predict some row's completion need logits: the vocab projection is costly.
    positions = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # [num_kept]
    out = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=positions)
    logits = out.logits  # [batch, num_kept, vocab]
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets[:, positions].flatten(), ignore_index=IGNORE_INDEX
    )


def step_plan(num_examples: int, config: TrainConfig) -> list[list[int]]:
    """Example indices of every optimizer step: a seeded shuffle per epoch, cut at max_steps."""
    gen = torch.Generator().manual_seed(config.seed)
    plan = []
    for _ in range(config.epochs):
        order = torch.randperm(num_examples, generator=gen).tolist()
        plan += [order[i : i + config.batch_size] for i in range(0, num_examples, config.batch_size)]
    return plan[: config.max_steps] if config.max_steps else plan


def train_prefix(
    model: PreTrainedModel,
    tokenizer,
    train: Sequence[Example],
    held_out: Sequence[Example],
    config: TrainConfig,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    hooks: TrainHooks | None = None,
) -> TrainResult:
    """Evaluate the base model, train a prefix on `train`, evaluate the prefix; the model stays frozen.
    `hooks`: progress, checkpoints, resuming and stopping for a fine-tuning job."""
    if not train or not held_out:
        raise InvalidRequest(f"need training and held-out examples, got {len(train)} and {len(held_out)}")
    hooks = hooks or TrainHooks()
    engine = Engine(model, tokenizer, max_virtual_tokens=max(256, config.num_virtual_tokens))
    eval_kwargs = {"chat_template": config.chat_template, "batch_size": config.eval_batch_size}
    started = time.perf_counter()
    if hooks.resume is not None:
        before = EvalResult(*hooks.resume["before"])
    else:
        before = evaluate(engine, held_out, None, **eval_kwargs)
    eval_seconds = time.perf_counter() - started
    log(f"held-out exact match before training (base model): {before.score:.1%} of {len(held_out)}")

    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(engine.eos_token_ids)
    encoded = encode(train, tokenizer, config.chat_template, eos_id)
    with quiet_deprecations():
        peft_model = make_peft_model(engine, config, initial_text(train, config))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    plan = step_plan(len(encoded), config)
    warmup = max(1, round(config.warmup_fraction * len(plan)))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, (len(plan) - s) / max(1, len(plan) - warmup))
    )
    log(
        f"training {sum(p.numel() for p in params):,} prefix parameters: {len(encoded)} examples, "
        f"{len(plan)} steps of {config.batch_size}, lr {config.lr}"
    )
    losses: list[float] = []
    encoder = peft_model.prompt_encoder[ADAPTER]
    if hooks.resume is not None:  # continue a saved run exactly: same parameters, moments, schedule
        encoder.load_state_dict(hooks.resume["prompt_encoder"])
        optimizer.load_state_dict(hooks.resume["optimizer"])
        schedule.load_state_dict(hooks.resume["schedule"])
        losses = list(hooks.resume["losses"])
        log(f"resuming at step {len(losses)} of {len(plan)}")

    def state() -> dict:
        return {
            "prompt_encoder": encoder.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "losses": list(losses),
            "before": (before.score, before.outputs),
        }

    started = time.perf_counter()
    with Progress(len(plan) - len(losses), progress, log) as bar, quiet_deprecations():
        for indices in plan[len(losses) :]:
            if hooks.stop is not None and hooks.stop():
                raise TrainingStopped(f"training stopped at step {len(losses)} of {len(plan)}")
            loss = completion_loss(peft_model, collate([encoded[i] for i in indices], engine.pad_token_id))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(losses[-1])
            if hooks.on_step is not None:
                hooks.on_step(len(losses), len(plan), losses[-1])
            if (
                hooks.save is not None
                and hooks.checkpoint_every
                and len(losses) % hooks.checkpoint_every == 0
            ):
                hooks.save(state())
    train_seconds = time.perf_counter() - started

    prefix = trained_prefix(peft_model, engine.fingerprint)
    started = time.perf_counter()
    after = evaluate(engine, held_out, prefix, **eval_kwargs)
    eval_seconds += time.perf_counter() - started
    log(f"held-out exact match after training: {after.score:.1%} (before: {before.score:.1%})")
    return TrainResult(prefix, peft_model, before, after, losses, train_seconds, eval_seconds)
