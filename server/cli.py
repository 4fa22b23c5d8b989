"""prefix-server: one base model, many tasks, each a prefix-tuning prefix.

  prefix-server serve      run the HTTP server (the default model needs no flags)
  prefix-server train      train a task's prefix from JSONL examples
  prefix-server convert    convert a prefix between the native and the PEFT format

`prefix-server COMMAND --help` lists each command's flags with their defaults.
"""
# argparse in, Settings out: nothing else reads the command line.

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from server.config import Settings
from server.errors import PrefixServerError


def _flag_type(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "Path": Path, "Path | None": Path}.get(f.type, str)


# flag name -> (type, help): one per Settings field, its help from the field (server/config.py).
SERVE_FLAGS = {f.name: (_flag_type(f), f.metadata["help"]) for f in dataclasses.fields(Settings)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefix-server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the HTTP server",
        description="Every flag can also be set as "
        "PREFIX_SERVER_<FLAG> in the environment (e.g. PREFIX_SERVER_PORT=9000).",
    )
    defaults = Settings()
    for name, (kind, text) in SERVE_FLAGS.items():
        if "(default" not in text:  # every flag shows its default
            value = getattr(defaults, name)
            text = f"{text} (default: {'none' if value in (None, '') else value})"
        serve.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=text)

    convert = sub.add_parser("convert", help="convert a prefix between the native and the PEFT format")
    convert.add_argument(
        "input", type=Path, help="a native prefix file, or a PEFT adapter folder / .safetensors"
    )
    convert.add_argument("output", type=Path, help="native: a .safetensors file; peft: a folder")
    convert.add_argument(
        "--to",
        choices=["native", "peft"],
        required=True,
        help="native: a PEFT adapter (folder or adapter_model.safetensors) -> one prefix file the server "
        "takes; peft: a native prefix file -> a PEFT adapter folder (adapter_model.safetensors + "
        "adapter_config.json)",
    )
    convert.add_argument("--model", default="default", help="base model (needed to read a PEFT adapter)")
    convert.add_argument("--config", type=Path, help="PEFT adapter_config.json (default: beside the input)")

    train = sub.add_parser(
        "train",
        help="train a prefix (PEFT prefix tuning, base model frozen) on JSONL prompt/completion pairs",
        description='Data: one JSON object per line, {"prompt": str, "completion": str}; the completion '
        "follows the prompt's tokens and only it carries loss. Scores: exact match of the first line of "
        "greedy output on held-out examples, before (base model) and after (the trained prefix, served "
        "by the engine).",
    )
    train.add_argument("--data", type=Path, required=True, help="training examples (JSONL)")
    train.add_argument("--task", required=True, help="task id (written into the prefix's metadata)")
    train.add_argument("--num-virtual-tokens", type=int, default=16, help="prefix length (default 16)")
    held_out = train.add_mutually_exclusive_group()
    held_out.add_argument("--eval-data", type=Path, help="held-out examples (JSONL); default: split --data")
    held_out.add_argument(
        "--eval-fraction", type=float, default=0.1, help="share of --data held out (default 0.1)"
    )
    train.add_argument("--epochs", type=int, default=3, help="passes over the data (default 3)")
    train.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (default 1e-2)")
    train.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    train.add_argument("--max-steps", type=int, help="stop after this many steps (default: all epochs)")
    train.add_argument(
        "--seed", type=int, default=0, help="seed of init, shuffling and the split (default 0)"
    )
    train.add_argument(
        "--prefix-projection", action="store_true", help="train through PEFT's reparametrizing MLP"
    )
    train.add_argument("--encoder-hidden-size", type=int, help="that MLP's width (default: PEFT's)")
    train.add_argument(
        "--init",
        choices=["examples", "random"],
        help="start from the K/V of the first training examples' text (default), or PEFT's random init "
        "(the default with --prefix-projection)",
    )
    train.add_argument("--init-text", help="start from the K/V of this text instead")
    train.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap prompts as a user turn of the model's chat template (clients must send them so too)",
    )
    train.add_argument(
        "--template",
        help="the task's prompt with {input} where a client's input goes, stored with the prefix so that "
        "/generate's `input` and chat requests fill it (default: inferred from the training prompts' "
        "common start and end, e.g. 'Review: {input}\\nSentiment:')",
    )
    train.add_argument("--description", help="what the task does, shown in GET /prefixes and /v1/models")
    train.add_argument("--output", type=Path, help="native prefix file (default <task>.safetensors)")
    train.add_argument("--peft-output", type=Path, help="also save a PEFT adapter folder here")
    train.add_argument("--model", help="base model, as for serve (default: 'default')")
    train.add_argument("--dtype", default="float32", help="float32 (default) | bfloat16 | float16 | auto")
    train.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    train.add_argument("--model-cache-dir", type=Path, help="where converted GGUF models are kept")
    return parser


def serve(args: argparse.Namespace) -> None:
    settings = Settings.from_env({name: getattr(args, name) for name in SERVE_FLAGS})
    # torch.compile's artifacts beside the converted models, so a restart reuses them (see --compile).
    # Before the imports below: importing the engine makes inductor fix its folder for good.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.model_cache_dir / "inductor"))
    from server.threads import set_openmp_env

    set_openmp_env()  # before torch is imported: its OpenMP reads the environment then

    import uvicorn

    from server.api.app import create_app
    from server.api.connections import guarded_protocol
    from server.api.logs import configure_logging

    if settings.prefix_store:  # an unreachable bucket fails here, naming its URL, not in the model load
        from server.registry.s3_store import S3PrefixStore

        S3PrefixStore.from_url(settings.prefix_store)
    configure_logging(settings.log_level, settings.log_format)
    logging.getLogger(__name__).info("settings", extra={"settings": dataclasses.asdict(settings)})
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # keep our (JSON) handlers
        access_log=False,  # the request-id middleware logs every request
        timeout_keep_alive=settings.keep_alive_s,
        # uvicorn has no deadline for a request head nor a cap on idle sockets: see api/connections.py
        http=guarded_protocol(settings.header_timeout_s, settings.max_connections),
    )
    try:
        _make_draining_server()(config, app.state.runtime).run()
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down and re-raises it; no traceback for that
        logging.getLogger(__name__).info("interrupted (SIGINT): stopped")
    _exit_now_if_compiling(app.state.runtime)


def _exit_now_if_compiling(runtime) -> None:
    """After the server drained and stopped: a decode-step compile still running on its background
    thread (`--compile auto`, minutes on a cold cache) cannot be interrupted, and the interpreter's
    teardown under it aborts the process (libstdc++'s "terminate called without an active exception",
    exit 134). Leave without that teardown, exit 0: requests have drained, prefix files are written
    atomically, the compile cache keeps what finished."""
    if runtime.compiling:
        logging.getLogger(__name__).info("exiting with the decode step's compile unfinished")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _make_draining_server():
    import signal

    import uvicorn

    class DrainingServer(uvicorn.Server):
        """SIGTERM: the runtime drains (stop admitting, /ready says 503; accepted requests finish for up
        to --shutdown-timeout-s), then exit 0. A second signal, SIGINT, or SIGTERM while the model is
        still loading exits at once."""

        def __init__(self, config, runtime):
            super().__init__(config)
            self.runtime = runtime
            self._draining = False

        def handle_exit(self, sig, frame) -> None:
            if sig != signal.SIGTERM or self._draining or not self.runtime.drain_soon(self._stop):
                return super().handle_exit(sig, frame)
            self._draining = True
            logging.getLogger(__name__).info(
                "SIGTERM: draining for up to %.0f s", self.runtime.settings.shutdown_timeout_s
            )

        def _stop(self) -> None:
            self.should_exit = True

    return DrainingServer


def convert(args: argparse.Namespace) -> None:
    from server.registry.format import ModelFingerprint, load_prefix, read_metadata, save_native, to_peft

    source = args.input / "adapter_model.safetensors" if args.input.is_dir() else args.input
    data = source.read_bytes()
    metadata = read_metadata(data)
    if args.to == "peft":
        fingerprint = ModelFingerprint.from_metadata(metadata)
        prefix = load_prefix(data, fingerprint)
        weights, config = to_peft(prefix, base_model_name=metadata.get("base_model"))
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "adapter_model.safetensors").write_bytes(weights)
        (args.output / "adapter_config.json").write_text(json.dumps(config, indent=2))
        print(f"wrote PEFT adapter to {args.output}/ ({prefix.num_virtual_tokens} virtual tokens)")
        return
    from transformers import AutoConfig

    from server.engine.model import DEFAULT_MODEL, default_gguf_path

    if args.model == DEFAULT_MODEL or args.model.endswith(".gguf"):
        gguf = default_gguf_path() if args.model == DEFAULT_MODEL else Path(args.model)
        model_config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        model_config = AutoConfig.from_pretrained(args.model)
    config_path = args.config or source.with_name("adapter_config.json")
    adapter_config = config_path.read_bytes() if config_path.is_file() else None
    prefix = load_prefix(data, ModelFingerprint.from_config(model_config), adapter_config=adapter_config)
    args.output.write_bytes(save_native(prefix))
    print(f"wrote native prefix to {args.output} ({prefix.num_virtual_tokens} virtual tokens)")


def train(args: argparse.Namespace) -> None:
    import time

    from server.training.data import read_jsonl

    started = time.perf_counter()
    # The data first: a file with a wrong field is reported in a second, not after torch and the model load.
    examples = read_jsonl(args.data)
    eval_examples = read_jsonl(args.eval_data) if args.eval_data is not None else None

    from server.engine.model import load_model
    from server.errors import ConfigError
    from server.registry.frame import TaskFrame, TaskScores
    from server.registry.store import validate_task_id
    from server.training.data import split_examples
    from server.training.export import summarize, write_outputs
    from server.training.frame import frame_from_data
    from server.training.trainer import TrainConfig, train_prefix

    validate_task_id(args.task)
    TaskFrame(template=args.template, description=args.description)  # refused now, not after training
    output = args.output or Path(f"{args.task}.safetensors")
    if output.suffix != ".safetensors":
        raise ConfigError(f"--output must end in .safetensors (a .json summary goes beside it), got {output}")
    config = TrainConfig(
        num_virtual_tokens=args.num_virtual_tokens,
        prefix_projection=args.prefix_projection,
        encoder_hidden_size=args.encoder_hidden_size,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        seed=args.seed,
        chat_template=args.chat_template,
        init="text" if args.init_text else args.init,
        init_text=args.init_text,
    )
    if eval_examples is not None:
        train_set, held_out = examples, eval_examples
    else:
        train_set, held_out = split_examples(examples, args.eval_fraction, args.seed)
    overrides = {"model": args.model, "device": args.device, "model_cache_dir": args.model_cache_dir}
    settings = Settings.from_env(overrides)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    loaded = load_model(
        settings.model, dtype=args.dtype, device=settings.device, cache_dir=settings.model_cache_dir
    )
    print(
        f"task {args.task!r}: {len(train_set)} training and {len(held_out)} held-out examples, {loaded.name}"
    )
    result = train_prefix(loaded.model, loaded.tokenizer, train_set, held_out, config)
    summary = summarize(
        result, config, task_id=args.task, base_model=loaded.name, num_train=len(train_set), held_out=held_out
    )
    summary["command_seconds"] = round(time.perf_counter() - started, 1)  # with model load and evals
    scores = TaskScores(float(summary["eval_before"]), float(summary["eval_after"]), len(held_out))
    frame = frame_from_data(
        train_set,
        loaded.tokenizer,
        chat_template=args.chat_template,
        template=args.template,
        description=args.description,
        scores=scores,
    )
    how = "given" if args.template is not None else "inferred from the training prompts"
    print(f"template: {frame.template!r} ({how}); max_new_tokens {frame.max_new_tokens}; stop {frame.stop}")
    for path in write_outputs(result, summary, output, args.peft_output, frame):
        print(f"wrote {path}")
    print(f"serve it: curl -F task_id={args.task} -F file=@{output} http://HOST:PORT/prefixes")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        {"serve": serve, "convert": convert, "train": train}[args.command](args)
    except PrefixServerError as e:
        print(f"prefix-server: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()
