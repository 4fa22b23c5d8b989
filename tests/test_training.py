"""Prefix training: data handling, PEFT prefix tuning on a tiny model, exports, CLI, example registration."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer, make_tiny_model, peft_greedy
from peft import PeftModel

from server.cli import main
from server.engine.engine import Engine
from server.errors import InvalidRequest
from server.output import finish_texts
from server.registry.format import ModelFingerprint, PrefixKV, load_prefix, read_metadata, save_native
from server.registry.frame import TaskFrame, TaskScores
from server.registry.registry import PrefixRegistry
from server.request import Request, SamplingParams
from server.training.data import (
    IGNORE_INDEX,
    EncodedExample,
    Example,
    TrainingDataError,
    answer,
    collate,
    prompt_token_ids,
    read_jsonl,
    split_examples,
)
from server.training.examples import register_examples
from server.training.trainer import TrainConfig, step_plan, train_prefix

EXAMPLES = Path(__file__).resolve().parent.parent / "prefixes" / "examples"


def synthetic(n: int, seed: int) -> list[Example]:
    """Random letter strings -> the fixed answer "ok": learnable by a prefix on any base model."""
    rng = random.Random(seed)
    words = ("".join(rng.choices("abcdefghij", k=rng.randint(3, 6))) for _ in range(n))
    return [Example(f"{w}=", " ok") for w in words]


def write_jsonl(path: Path, examples: list[Example]) -> Path:
    path.write_text(
        "".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n" for e in examples)
    )
    return path


# ---- data ----
@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not valid JSON"),
        ('["a", "b"]', "expected"),
        ('{"prompt": "a"}', 'no "completion" field'),
        ('{"prompt": "a", "completion": "  "}', "completion must be a non-empty string"),
        ('{"completion": "b"}', "expected"),
    ],
)
def test_read_jsonl_names_the_bad_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "x", "completion": "y"}\n\n' + line + "\n")
    with pytest.raises(TrainingDataError, match=rf"d\.jsonl:3: .*{message}"):
        read_jsonl(path)


def test_read_jsonl_lines_end_at_newlines_only(tmp_path):
    """U+2028 and U+0085 inside a string (json.dumps(ensure_ascii=False) writes them as is) are no breaks."""
    rows = [{"prompt": "a\u2028b\x85c", "completion": "d"}, {"prompt": "e", "completion": "f"}]
    path = tmp_path / "u.jsonl"
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    assert read_jsonl(path) == [Example("a\u2028b\x85c", "d"), Example("e", "f")]


def test_read_jsonl_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(TrainingDataError, match="no examples"):
        read_jsonl(tmp_path / "e.jsonl")


def test_collate_puts_loss_on_completion_only():
    batch = collate([EncodedExample([5, 6, 7, 8, 0], 3), EncodedExample([5, 9, 0], 2)], pad_id=1)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 0], [5, 9, 0, 1, 1]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    x = IGNORE_INDEX
    assert batch.labels.tolist() == [[x, x, x, 8, 0], [x, x, 0, x, x]]


def test_split_and_step_plan_are_seeded():
    examples = synthetic(20, 0)
    train, held_out = split_examples(examples, 0.25, seed=3)
    assert (len(train), len(held_out)) == (15, 5) and set(train).isdisjoint(held_out)
    assert split_examples(examples, 0.25, seed=3) == (train, held_out)
    plan = step_plan(10, TrainConfig(epochs=2, batch_size=4, seed=1))
    assert [len(s) for s in plan] == [4, 4, 2, 4, 4, 2] and sorted(
        i for step in plan[:3] for i in step
    ) == list(range(10))
    assert plan == step_plan(10, TrainConfig(epochs=2, batch_size=4, seed=1))
    assert len(step_plan(10, TrainConfig(epochs=5, batch_size=4, max_steps=7))) == 7


@pytest.mark.parametrize(
    "kwargs",
    [{"num_virtual_tokens": 0}, {"lr": 0.0}, {"init": "zeros"}, {"init": "text"}, {"init_text": "hi"}],
)
def test_train_config_rejects(kwargs):
    with pytest.raises(InvalidRequest):
        TrainConfig(**kwargs)


def test_train_config_init_default_follows_projection():
    assert TrainConfig().init == "examples" and TrainConfig(prefix_projection=True).init == "random"
    with pytest.raises(InvalidRequest, match="prefix_projection"):
        TrainConfig(prefix_projection=True, init="examples")


def test_chat_template_wraps_the_prompt_as_a_user_turn():
    tokenizer = byte_tokenizer()
    with pytest.raises(TrainingDataError, match="no chat template"):
        prompt_token_ids("hi", tokenizer, chat_template=True)
    tokenizer.chat_template = "{% for m in messages %}[{{ m.role }}: {{ m.content }}]{% endfor %}>"
    assert prompt_token_ids("hi", tokenizer, chat_template=True) == tokenizer("[user: hi]>")["input_ids"]
    assert prompt_token_ids("hi", tokenizer, chat_template=False) == tokenizer("hi")["input_ids"]


def test_answer_is_first_stripped_line():
    assert answer("  negative\nmore text") == "negative" == answer(" negative")
    assert answer("\n\n positive ") == "positive"


# ---- training on a tiny random model ----
@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(num_virtual_tokens=8, epochs=4, batch_size=8, lr=1e-1),
        TrainConfig(num_virtual_tokens=8, epochs=4, batch_size=8, lr=1e-1, init="random"),
        TrainConfig(num_virtual_tokens=8, epochs=4, batch_size=8, lr=1e-2, prefix_projection=True),
    ],
    ids=["init-examples", "init-random", "projection"],
)
def test_training_learns_and_serves_what_peft_computes(config):
    model, tokenizer = make_tiny_model("llama-gqa"), byte_tokenizer()
    train, held_out = synthetic(96, seed=1), synthetic(16, seed=2)
    result = train_prefix(model, tokenizer, train, held_out, config, progress=False, log=lambda _: None)

    assert len(result.losses) == 48
    assert sum(result.losses[-5:]) / 5 < 0.5 * sum(result.losses[:5]) / 5
    assert result.before.score <= 0.1 and result.after.score >= 0.9
    assert all(p.requires_grad is False for p in model.parameters())  # the base stayed frozen
    # The engine, fed the exported prefix, decodes what PEFT's own forward computes with its prefix.
    prompt = tokenizer(held_out[0].prompt)["input_ids"]
    [request] = Engine(model, tokenizer).generate(
        [Request(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True), prefix=result.prefix)]
    )
    assert request.output_token_ids == peft_greedy(result.peft_model, prompt, 4)


@pytest.mark.parametrize("flags", [[], ["--prefix-projection", "--lr", "1e-2"]], ids=["direct", "projection"])
def test_cli_train_writes_native_summary_and_peft(tmp_path, capsys, flags):
    model, tokenizer = make_tiny_model("llama-gqa"), byte_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", synthetic(64, seed=1))
    held = write_jsonl(tmp_path / "eval.jsonl", synthetic(12, seed=2))
    out = tmp_path / "out" / "demo.safetensors"
    argv = ["train", "--data", str(data), "--eval-data", str(held), "--task", "demo"]
    argv += ["--num-virtual-tokens", "8", "--epochs", "5", "--lr", "1e-1", "--model", str(tmp_path / "model")]
    main([*argv, *flags, "--output", str(out), "--peft-output", str(tmp_path / "peft"), "--description", "d"])
    printed = capsys.readouterr().out
    assert "held-out exact match after training" in printed
    assert "template: '{input}=' (inferred from the training prompts)" in printed

    fp = ModelFingerprint.from_config(model.config)
    native = load_prefix(out.read_bytes(), fp)
    metadata = read_metadata(out.read_bytes())
    assert metadata["task_id"] == "demo" and (metadata["num_train"], metadata["num_eval"]) == ("64", "12")
    assert float(metadata["eval_before"]) <= 0.1 and float(metadata["eval_after"]) >= 0.9
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["eval_after"] == float(metadata["eval_after"]) and summary["num_steps"] == 40
    # the prompt frame: prompts "<letters>=", completions " ok" (3 tokens, + EOS, + a margin of 4)
    frame = TaskFrame.from_metadata(metadata)
    assert (frame.template, frame.description, frame.max_new_tokens, frame.stop) == ("{input}=", "d", 8, None)
    assert frame.scores == TaskScores(summary["eval_before"], summary["eval_after"], 12)
    assert summary["frame"] == frame.to_dict()

    peft_dir = tmp_path / "peft"
    adapter = (peft_dir / "adapter_model.safetensors").read_bytes()
    from_peft = load_prefix(adapter, fp, adapter_config=(peft_dir / "adapter_config.json").read_bytes())
    peft_model = PeftModel.from_pretrained(make_tiny_model("llama-gqa"), peft_dir)
    # Loaded for inference, PEFT feeds this table as the prefix (the MLP's output, if one was trained).
    embeddings = peft_model.prompt_encoder["default"].embedding.weight.detach()  # [P, L*2*kv*D]
    kv = embeddings.view(8, fp.num_layers * 2, fp.kv_heads, fp.head_dim)  # [P, L*2, kv, D]
    kv = kv.permute(1, 2, 0, 3)  # [L*2, kv, P, D]
    for prefix in (native, from_peft):
        torch.testing.assert_close(prefix.keys, kv[0::2], rtol=0, atol=0)
        torch.testing.assert_close(prefix.values, kv[1::2], rtol=0, atol=0)
    # And PEFT, running its own export, decodes what the engine decodes with the native file.
    prompt = byte_tokenizer()("abcd=")["input_ids"]
    sampling = SamplingParams(max_new_tokens=4, ignore_eos=True)
    [request] = Engine(model, tokenizer).generate([Request(prompt, sampling, prefix=native)])
    assert request.output_token_ids == peft_greedy(peft_model, prompt, 4)


def test_cli_train_rejects_bad_task_id(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", synthetic(4, seed=1))
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--task", "no/slash"])
    assert "task_id must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # before any training
        main(["train", "--data", str(data), "--task", "t", "--template", "no slot"])
    assert "template must contain {input} exactly once" in capsys.readouterr().err


# ---- registration of the shipped examples ----
def test_register_examples_never_overwrites_or_resurrects(tmp_path):
    fp = ModelFingerprint("llama", 2, 2, 16)
    registry = PrefixRegistry.open(
        tmp_path / "store", fp, cache_bytes=1 << 20, dtype=torch.float32, device="cpu"
    )

    def prefix_bytes(seed: int, fingerprint: ModelFingerprint = fp) -> bytes:
        gen = torch.Generator().manual_seed(seed)
        shape = (fingerprint.num_layers, fingerprint.kv_heads, 4, fingerprint.head_dim)
        keys, values = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        return save_native(PrefixKV(keys, values, fingerprint))

    examples = tmp_path / "examples"
    for task, seed in (("new", 1), ("taken", 2), ("gone", 3)):
        (examples / task).mkdir(parents=True)
        (examples / task / "prefix.safetensors").write_bytes(prefix_bytes(seed))
    (examples / "other-model").mkdir()
    (examples / "other-model" / "prefix.safetensors").write_bytes(
        prefix_bytes(4, ModelFingerprint("llama", 3, 2, 16))
    )
    users = registry.upload("taken", prefix_bytes(9))
    registry.upload("gone", prefix_bytes(3))
    registry.delete("gone")

    assert register_examples(registry, examples) == ["new"]
    assert registry.get("taken") == users  # the user's version, untouched
    assert [r.task_id for r in registry.list()] == ["new", "taken"]
    assert register_examples(registry, examples) == []  # idempotent across restarts


# ---- the shipped examples on the real default model ----
@pytest.mark.slow
def test_shipped_examples_change_the_default_model():
    from server.config import Settings
    from server.engine.model import load_model

    loaded = load_model("default", dtype="float32", cache_dir=Settings().model_cache_dir)
    engine = Engine(loaded.model, loaded.tokenizer)
    folders = sorted(p.parent for p in EXAMPLES.glob("*/prefix.safetensors"))
    assert len(folders) >= 2
    for folder in folders:
        example = read_jsonl(folder / "eval.jsonl")[0]
        summary = json.loads((folder / "prefix.json").read_text())
        prefix = load_prefix((folder / "prefix.safetensors").read_bytes(), engine.fingerprint)
        prompt = prompt_token_ids(example.prompt, loaded.tokenizer, summary["chat_template"])
        sampling = SamplingParams(max_new_tokens=len(loaded.tokenizer(example.completion)["input_ids"]) + 2)
        requests = [Request(prompt, sampling), Request(prompt, sampling, prefix=prefix)]
        base, tuned = finish_texts(engine.generate(requests), loaded.tokenizer)
        assert answer(tuned.text) == answer(example.completion), folder.name
        assert answer(base.text) != answer(tuned.text), folder.name
        assert summary["eval_after"] >= 0.9 and summary["eval_before"] <= 0.5, folder.name


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (
            '{"prompt": "a", "output": "b"}',
            "no \"completion\" field (expected {\"prompt\": str, \"completion\": str}; this line has 'prompt', 'output'); rename 'output' to 'completion'",
        ),
        ('{"question": "a", "completion": "b"}', "rename 'question' to 'prompt'"),
        ('{"prompt": "a"}', "this line has 'prompt')"),
        ('["a", "b"]', "expected an object"),
        ('{"prompt": 3, "completion": "b"}', "prompt must be a string, got int"),
    ],
)
def test_bad_training_data_is_named_before_anything_loads(tmp_path, line, says):
    """The data file is read first: its error comes before torch, the model or PEFT are imported."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "ok", "completion": "fine"}\n' + line + "\n")
    code = (
        "import sys\nfrom server.cli import main\n"
        f"try:\n    main(['train', '--task', 't', '--data', {str(data)!r}])\n"
        "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.split() == ["2", "False"], run.stdout + run.stderr
    assert f"{data}:2: " in run.stderr and says in run.stderr, run.stderr


async def test_a_freshly_trained_task_answers_by_input_and_by_openai_chat(tmp_path):
    """`prefix-server train` on a tiny model, the file it wrote uploaded as it is: the task answers its
    held-out examples through /generate with `input` (its inferred frame) and through the official openai
    client's chat call exactly as the training's own held-out evaluation scored them."""
    import openai
    from conftest import app_client, tiny_app

    model, tokenizer = make_tiny_model("llama-gqa"), byte_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    held_out = synthetic(12, seed=2)
    data = write_jsonl(tmp_path / "train.jsonl", synthetic(64, seed=1))
    held = write_jsonl(tmp_path / "eval.jsonl", held_out)
    out = tmp_path / "demo.safetensors"
    argv = ["train", "--data", str(data), "--eval-data", str(held), "--task", "demo", "--output", str(out)]
    main(
        [
            *argv,
            "--num-virtual-tokens",
            "8",
            "--epochs",
            "5",
            "--lr",
            "1e-1",
            "--model",
            str(tmp_path / "model"),
        ]
    )
    eval_after = float(read_metadata(out.read_bytes())["eval_after"])
    assert eval_after >= 0.9

    app = tiny_app(Engine(model, tokenizer), tmp_path / "prefixes")
    async with app_client(app) as api:
        files = {"file": ("demo.safetensors", out.read_bytes())}
        assert (await api.post("/prefixes", data={"task_id": "demo"}, files=files)).status_code == 201
        client = openai.AsyncOpenAI(base_url="http://t/v1", api_key="none", http_client=api, max_retries=0)
        right = 0
        for example in held_out:
            word = example.prompt.removesuffix("=")
            reply = (await api.post("/generate", json={"task_id": "demo", "input": word})).json()
            messages = [{"role": "user", "content": word}]
            chat = await client.chat.completions.create(model="demo", messages=messages, temperature=0)
            assert chat.choices[0].message.content == reply["text"]
            right += answer(reply["text"]) == answer(example.completion)
    assert right / len(held_out) == eval_after


def test_the_examples_are_registered_only_when_asked(tmp_path):
    """`--examples on` (make serve, the Docker image) registers the shipped tasks; off (the default, e.g. an
    S3 fleet or a Ray replica) leaves the store as it is."""
    from server.api.app import register_shipped_examples
    from server.config import Settings

    smollm2 = ModelFingerprint("llama", 30, 3, 64)  # the default model's, which the examples fit

    def registry(name):
        return PrefixRegistry.open(
            tmp_path / name, smollm2, cache_bytes=1 << 26, dtype=torch.float32, device="cpu"
        )

    off = registry("off")
    assert register_shipped_examples(Settings(), off) == [] and off.list() == []
    on = registry("on")
    shipped = sorted(p.parent.name for p in EXAMPLES.glob("*/prefix.safetensors"))
    assert register_shipped_examples(Settings(examples="on"), on) == shipped == ["booking", "sentiment"]
    assert [r.task_id for r in on.list()] == shipped
