"""Register the shipped example prefixes (prefixes/examples/<task_id>/prefix.safetensors) at startup.

Plain file and registry calls, no training imports: the server can call this without peft installed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import safetensors.torch
import torch

from server.config import REPO_ROOT
from server.errors import PrefixNotFound, PrefixServerError
from server.registry.registry import PrefixRegistry
from server.registry.store import frame_of, is_task_id

log = logging.getLogger(__name__)

EXAMPLES_DIR = REPO_ROOT / "prefixes" / "examples"
PREFIX_FILE = "prefix.safetensors"


def register_examples(registry: PrefixRegistry, examples_dir: Path = EXAMPLES_DIR) -> list[str]:
    """Upload each example prefix under its folder's name, unless that task exists or ever existed.

    A task the user uploaded, or deleted (its tombstone stays), is never touched. One exception: a
    stored example from before prompt frames (the example's very tensors, no frame) gets a new version
    with the example's frame. An example that does not fit the base model (another --model) is skipped
    with a warning. Returns the task ids added or given their frame.
    """
    added = []
    for path in sorted(Path(examples_dir).glob(f"*/{PREFIX_FILE}")):
        task_id = path.parent.name
        if not is_task_id(task_id):
            log.warning("example %s skipped: folder name is not a valid task id", path)
            continue
        try:
            data = path.read_bytes()
            if registry.store.known(task_id) and not _lacks_frame(registry, task_id, data):
                continue  # a task, a deleted one, or a half upload
            registry.upload(task_id, data)
        except (OSError, PrefixServerError) as e:
            log.warning("example %s not registered: %s", path, e)
            continue
        added.append(task_id)
    if added:
        log.info("registered example prefixes: %s", ", ".join(added))
    return added


def _lacks_frame(registry: PrefixRegistry, task_id: str, example: bytes) -> bool:
    """Whether the task's latest version is this example stored before frames: no frame of its own,
    the example has one, and their keys and values are equal."""
    try:
        record = registry.get(task_id)
    except PrefixNotFound:  # deleted, or never committed
        return False
    if record.frame is not None or frame_of(example) is None:
        return False
    stored = registry.store.read(record)  # FileNotFoundError (an OSError) if an upload superseded it
    ours = safetensors.torch.load(example)
    theirs = safetensors.torch.load(stored)
    return all(torch.equal(ours[n].float(), theirs[n].float()) for n in ("keys", "values"))
