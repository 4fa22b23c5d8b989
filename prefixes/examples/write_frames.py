"""Write each shipped example's prompt frame (template, description, max_new_tokens, stop) into its
prefix.safetensors metadata and its prefix.json summary, without retraining: the tensors are read and
written back byte for byte (checked), only the metadata changes. `make examples` runs it after training.

The frame is what `prefix-server train` writes (server/training/frame.py: the template inferred from
train.jsonl's prompts, the defaults from its completions) plus a description from DESCRIPTIONS.

Usage: python prefixes/examples/write_frames.py
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch

from server.config import Settings
from server.engine.model import load_model
from server.registry.format import ModelFingerprint, PrefixKV, read_metadata, save_native
from server.registry.frame import FRAME_KEYS, TaskScores
from server.training.data import read_jsonl
from server.training.frame import frame_from_data

HERE = Path(__file__).resolve().parent
DESCRIPTIONS = {
    "sentiment": "The sentiment of a review: answers positive or negative.",
    "booking": "A restaurant table request as one line of JSON: name, guests, day, time.",
}


def write_frame(folder: Path, tokenizer) -> dict:
    """Rewrite folder/prefix.safetensors and folder/prefix.json with the frame; returns the frame."""
    path = folder / "prefix.safetensors"
    data = path.read_bytes()
    metadata = read_metadata(data)
    tensors = safetensors.torch.load(data)  # as stored: no dtype change
    fingerprint = ModelFingerprint.from_metadata(metadata)
    prefix = PrefixKV(tensors["keys"], tensors["values"], fingerprint)
    scores = TaskScores(
        float(metadata["eval_before"]), float(metadata["eval_after"]), int(metadata["num_eval"])
    )
    frame = frame_from_data(
        read_jsonl(folder / "train.jsonl"),
        tokenizer,
        chat_template=metadata.get("chat_template") == "true",
        description=DESCRIPTIONS.get(folder.name),
        scores=scores,
    )
    written_by_save = {"format", "num_virtual_tokens", *fingerprint.to_metadata()}
    kept = {k: v for k, v in metadata.items() if k not in written_by_save and k not in FRAME_KEYS}
    new = save_native(prefix, {**kept, **frame.to_metadata()})
    rewritten = safetensors.torch.load(new)
    for name, tensor in tensors.items():
        same = tensor.dtype == rewritten[name].dtype and torch.equal(
            tensor.view(torch.uint8), rewritten[name].view(torch.uint8)
        )
        if not same:
            raise SystemExit(f"{path}: tensor {name} would change; nothing written")
    path.write_bytes(new)
    summary_path = folder / "prefix.json"
    summary = json.loads(summary_path.read_text())
    summary["frame"] = frame.to_dict()
    summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return frame.to_dict()


def main() -> None:
    tokenizer = load_model("default", dtype="float32", cache_dir=Settings().model_cache_dir).tokenizer
    for folder in sorted(p.parent for p in HERE.glob("*/prefix.safetensors")):
        print(folder.name, json.dumps(write_frame(folder, tokenizer), ensure_ascii=False))


if __name__ == "__main__":
    main()
