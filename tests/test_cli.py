"""`prefix-server convert`: native <-> PEFT, through the real command-line entry point."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_model

from server.cli import main
from server.engine.engine import Engine
from server.registry.format import load_prefix, save_native


def test_convert_native_to_peft_and_back(tmp_path, tokenizer, capsys):
    model = make_tiny_model("llama-gqa")
    model.save_pretrained(tmp_path / "model")
    engine = Engine(model, tokenizer)
    prefix = engine.encode_prefix([3, 4, 5, 6, 7])
    (tmp_path / "p.safetensors").write_bytes(save_native(prefix))

    main(["convert", str(tmp_path / "p.safetensors"), str(tmp_path / "peft"), "--to", "peft"])
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    main(
        [
            "convert",
            str(tmp_path / "peft"),
            str(tmp_path / "back.safetensors"),
            "--to",
            "native",
            "--model",
            str(tmp_path / "model"),
        ]
    )
    back = load_prefix((tmp_path / "back.safetensors").read_bytes(), engine.fingerprint)
    assert torch.equal(back.keys, prefix.keys) and torch.equal(back.values, prefix.values)
    assert "5 virtual tokens" in capsys.readouterr().out


def test_convert_reports_a_bad_file_cleanly(tmp_path, capsys):
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(tmp_path / "junk.safetensors"), str(tmp_path / "out"), "--to", "peft"])
    assert exc.value.code == 2
    assert "prefix-server: error:" in capsys.readouterr().err


def test_every_serve_flag_shows_its_default():
    from server.cli import SERVE_FLAGS, build_parser

    serve = next(
        a for a in build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("serve")
    )
    helps = {a.dest: a.help for a in serve._actions if a.dest in SERVE_FLAGS}
    assert set(helps) == set(SERVE_FLAGS)
    missing = [name for name, text in helps.items() if "default" not in text]
    assert missing == []


def test_the_prefix_store_is_the_checkouts_only_when_run_from_it(tmp_path, monkeypatch):
    from server.config import REPO_ROOT, Settings

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.chdir(REPO_ROOT)
    assert Settings().prefix_dir == REPO_ROOT / "prefixes"  # make serve
    monkeypatch.chdir(tmp_path)
    assert Settings().prefix_dir == tmp_path / "data" / "prefix-server" / "prefixes"
    monkeypatch.setenv("PREFIX_SERVER_PREFIX_DIR", str(tmp_path / "mine"))
    assert Settings.from_env().prefix_dir == tmp_path / "mine"


def test_serve_keeps_inductors_cache_beside_the_converted_models(tmp_path):
    """Inductor fixes its cache folder the first time anything asks for it (importing the engine does):
    `serve` must name it before that, or the cache silently lands in /tmp/torchinductor_<user>."""
    code = f"""
import sys
import server.cli as cli

class Stub:
    def __init__(self, *args):
        pass
    def run(self):
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        print(cache_dir())

cli._make_draining_server = lambda: Stub
cli.main(["serve", "--model-cache-dir", {str(tmp_path / "models")!r}, "--prefix-dir", {str(tmp_path / "p")!r}])
"""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == str(tmp_path / "models" / "inductor")


def test_serve_sets_openmps_spin_before_torch_is_imported(tmp_path):
    """server/threads.py's OPENMP_ENV is in the environment when torch's OpenMP reads it (at torch's import),
    and a value the user set wins."""
    code = f"""
import os
import sys
import server.cli as cli

seen = {{}}

class Stub:
    def __init__(self, *args):
        pass
    def run(self):
        print(os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT"), seen["torch_at_import"])

import builtins
original_import = builtins.__import__
def watch(name, *args, **kwargs):
    if name == "torch" and "torch_at_import" not in seen:
        seen["torch_at_import"] = os.environ.get("OMP_WAIT_POLICY")
    return original_import(name, *args, **kwargs)
builtins.__import__ = watch
cli._make_draining_server = lambda: Stub
cli.main(["serve", "--model-cache-dir", {str(tmp_path / "models")!r}, "--prefix-dir", {str(tmp_path / "p")!r}])
"""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "ACTIVE 300000 ACTIVE"
    env["GOMP_SPINCOUNT"] = "1000"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.stdout.strip().splitlines()[-1] == "ACTIVE 1000 ACTIVE"


def test_the_operations_table_names_every_setting_and_no_other():
    """docs/operations.md's flag table is checked against the one source of the flags (Settings)."""
    import dataclasses
    import re

    from server.config import REPO_ROOT, Settings

    rows = [
        line
        for line in (REPO_ROOT / "docs" / "operations.md").read_text().splitlines()
        if line.startswith("| `--")
    ]
    documented = {name for row in rows for name in re.findall(r"`--([a-z0-9-]+)`", row.split("|")[1])}
    flags = {f.name.replace("_", "-") for f in dataclasses.fields(Settings)}
    assert sorted(flags - documented) == [] and sorted(documented - flags) == []
    assert all(f.metadata.get("help") for f in dataclasses.fields(Settings))
