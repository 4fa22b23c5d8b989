"""`prefix-server convert`: native <-> PEFT, through the real command-line entry point."""

from __future__ import annotations

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
