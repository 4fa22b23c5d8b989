"""One Ray Serve replica: the single-server app (engine, scheduler, registry) over the shared store.

Ray's model multiplexing calls `hold(task_id)` the first time a replica serves a task and evicts the
least recently used task beyond `max_tasks_per_replica`; the router then sends a task's requests to a
replica that holds it. Here holding a task means its current prefix is in the registry's cache: it is
loaded before the request reaches the scheduler (which would otherwise load it on submit, off the
engine thread, see server/prefetch.py), and dropped from the cache when Ray evicts the task.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from ray import serve

from server.config import Settings
from server.distributed import BASE_MODEL_ID
from server.distributed.asgi import Headers, ResponseHead, call_asgi
from server.errors import NotReady, PrefixServerError
from server.threads import in_own_thread

log = logging.getLogger(__name__)

REPLICA_HEADER = b"x-replica"  # which replica served a request (for operators and the tests)


class HeldTask:
    """What Ray's multiplexer keeps per task id in one replica."""

    def __init__(self, task_id: str, registry) -> None:
        self.task_id, self.registry = task_id, registry

    async def warm(self) -> None:
        """Load the task's current version into the cache now, off the engine thread, if it is not."""
        if self.registry is None or self.task_id == BASE_MODEL_ID:
            return
        try:
            record = self.registry.get(self.task_id)
            if (record.task_id, record.version) not in self.registry.cache:
                await in_own_thread(self._load)  # not a long-lived thread: see server/threads.py
        except PrefixServerError:
            pass  # unknown task, or it does not fit now: the app answers with the very same error

    def _load(self) -> None:
        record, _ = self.registry.acquire(self.task_id)
        self.registry.release(record)

    def __del__(self) -> None:
        # Ray calls this when it evicts the task (and Python again at collection: hence the None).
        if self.registry is not None and self.task_id != BASE_MODEL_ID:
            self.registry.cache.drop(self.task_id)  # unpinned entries only: running requests keep theirs
        self.registry = None


def build_shared_components(settings: Settings):
    """`build_components`, its registry over the store every replica shares: the S3-compatible object
    store of `settings.prefix_store` if set, else the folder `settings.prefix_dir` as a shared folder
    (backends.open_store with shared=True: its recovery cleans a task only under that task's
    cross-process lock, never another replica's live upload)."""
    from server.api.app import build_components

    return build_components(settings, shared_store=True)


class PrefixServerReplica:
    """Holds `create_app(settings, components)` and serves forwarded requests through it."""

    async def __init__(self, settings: Settings, max_tasks_per_replica: int = 128) -> None:
        from server.api.app import create_app

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        components = await in_own_thread(build_shared_components, settings)
        self.registry = components.registry
        self.app = create_app(settings, components)
        self.runtime = self.app.state.runtime  # Ray sends no lifespan events: the replica drives it
        await self.runtime.start()  # the scheduler, on this replica's event loop

        async def hold(task_id: str) -> HeldTask:
            return HeldTask(task_id, self.registry)

        self._hold = serve.multiplexed(max_num_models_per_replica=max_tasks_per_replica)(hold)
        log.info("replica %s ready: %d prefixes", self.replica_id, len(self.registry.list()))

    async def forward(
        self, method: str, path: str, query_string: bytes, headers: Headers, body: bytes
    ) -> AsyncIterator[ResponseHead | bytes]:
        """Serve one HTTP request with the app: yields its head (with `x-replica`), then body chunks."""
        task_id = serve.get_multiplexed_model_id()  # "" for requests not tied to a task
        if task_id:
            held = await self._hold(task_id)
            await held.warm()
        async for item in call_asgi(self.app, method, path, query_string, headers, body):
            if isinstance(item, ResponseHead):
                item.headers.append((REPLICA_HEADER, self.replica_id.encode()))
            yield item

    async def check_health(self) -> None:
        """Ray restarts a replica whose scheduler stopped accepting work."""
        if not self.app.state.server.ready:
            raise NotReady(f"replica {self.replica_id} is not accepting requests")

    async def __del__(self) -> None:
        """Ray calls this when the replica stops: running requests finish (up to shutdown_timeout_s)."""
        await self.runtime.close()
