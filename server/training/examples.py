"""Register the shipped example prefixes (prefixes/examples/<task_id>/prefix.safetensors) at startup.

Plain file and registry calls, no training imports: the server can call this without peft installed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from server.config import REPO_ROOT
from server.errors import PrefixServerError
from server.registry.registry import PrefixRegistry
from server.registry.store import is_task_id

log = logging.getLogger(__name__)

EXAMPLES_DIR = REPO_ROOT / "prefixes" / "examples"
PREFIX_FILE = "prefix.safetensors"


def register_examples(registry: PrefixRegistry, examples_dir: Path = EXAMPLES_DIR) -> list[str]:
    """Upload each example prefix under its folder's name, unless that task exists or ever existed.

    A task the user uploaded, or deleted (its tombstone stays), is never touched. An example that does
    not fit the base model (another --model) is skipped with a warning. Returns the task ids added.
    """
    added = []
    for path in sorted(Path(examples_dir).glob(f"*/{PREFIX_FILE}")):
        task_id = path.parent.name
        if not is_task_id(task_id):
            log.warning("example %s skipped: folder name is not a valid task id", path)
            continue
        if registry.store.known(task_id):  # a task, a deleted one, or a half upload
            continue
        try:
            registry.upload(task_id, path.read_bytes())
        except (OSError, PrefixServerError) as e:
            log.warning("example %s not registered: %s", path, e)
            continue
        added.append(task_id)
    if added:
        log.info("registered example prefixes: %s", ", ".join(added))
    return added
