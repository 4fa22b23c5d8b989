"""Which prefix store a server opens: one factory over the three backends (LoRAX's model sources).

    settings.prefix_store = "s3://bucket[/key/prefix]"  -> S3PrefixStore (s3_store.py), every server's
    settings.prefix_dir, shared                         -> SharedFolderStore (shared_store.py), Ray replicas
    settings.prefix_dir                                 -> FolderStore (folder_store.py), this server's alone

`shared` says that other servers write the folder at the same time (the Ray replicas of
server/distributed): their store re-reads a task whenever its folder changed and writes under a
cross-process lock, and its recovery never removes what may be another server's live upload.
"""

from __future__ import annotations

import logging
from pathlib import Path

from server.config import Settings
from server.registry.folder_store import FolderStore
from server.registry.shared_store import SharedFolderStore
from server.registry.store import PrefixStore

log = logging.getLogger(__name__)


def open_store(settings: Settings, *, shared: bool = False) -> PrefixStore:
    """The store `settings` name, not yet recovered (see `recovered`); PrefixServerError naming an
    S3 URL whose bucket cannot be reached."""
    if settings.prefix_store:  # shared by design: its recovery never removes a live upload
        return store_at(settings.prefix_store, ttl_s=settings.prefix_store_ttl_s)
    return store_at(settings.prefix_dir, shared=shared)


def store_at(where: Path | str, *, ttl_s: float = 1.0, shared: bool = False) -> PrefixStore:
    """The store at `where`: an s3://bucket[/key/prefix] string (`ttl_s`: see s3_store.py), else a folder."""
    if isinstance(where, str) and where.startswith("s3://"):
        from server.registry.s3_store import S3PrefixStore  # boto3 only where S3 is used

        return S3PrefixStore.from_url(where, ttl_s=ttl_s)
    return SharedFolderStore(Path(where)) if shared else FolderStore(Path(where))


def recovered(store: PrefixStore) -> list[str]:
    """Recover `store`'s index (once, at startup) and log each warning; returns the warnings."""
    warnings = store.recover()
    for line in warnings:
        log.warning("prefix store %s: %s", store.root, line)
    return warnings
