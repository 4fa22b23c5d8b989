"""One server's life, in order: load the model and the registry -> compile the decode step (first, or in
the background while serving eagerly) -> serve (the scheduler loop) -> drain -> close.

`prefix-server serve` (through the app's lifespan and its SIGTERM handler), the tests (the lifespan) and
the Ray replica (by hand: Ray has no lifespan) all drive a server through a `Runtime`; nothing else
starts or stops one. The model loads in the background so /health answers at once and /ready says when.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from server.api.state import Components, ServerState
from server.config import Settings
from server.engine.engine import Engine
from server.engine.pages import PAGE_SIZE, default_pool_bytes
from server.finetune.files import FileStore
from server.finetune.manager import FineTuning
from server.finetune.runner import JobRunner
from server.output import OutputProcessor
from server.registry.format import ModelFingerprint
from server.registry.registry import PrefixRegistry
from server.scheduler import Scheduler, SchedulerConfig
from server.threads import in_own_thread

log = logging.getLogger(__name__)
FLUSH_S = 0.2  # after a drain, before the server exits: the last replies' bytes leave


class Runtime:
    """Starts, drains and closes one server over its state; `components` given: serve them at once."""

    def __init__(self, state: ServerState, components: Components | None = None) -> None:
        self.state, self.settings = state, state.settings
        self._components = components
        self._loop: asyncio.AbstractEventLoop | None = None  # set while started
        self._tasks: list[asyncio.Task] = []  # the background load, a drain a signal asked for
        self._compile_thread: threading.Thread | None = None

    # ---- start ----
    async def start(self) -> None:
        """Serve the given components now, or load them in the background (errors: `state.load_error`,
        /ready says 503 with it). Once until close(); a call in between does nothing."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self.state.files is not None:
            await asyncio.to_thread(self._recover_files)
        if self._components is not None:
            await self._serve(self._components)
        else:
            self._tasks.append(asyncio.create_task(self._load()))

    def _recover_files(self) -> None:
        """What a killed upload or delete left in the fine-tuning files is removed (finetune/files.py)."""
        for note in self.state.files.recover():
            log.warning("fine-tuning files: %s", note)

    async def _load(self) -> None:
        settings = self.settings
        try:
            # torch work off the event loop, on threads that end afterwards (see server/threads.py)
            components = await in_own_thread(build_components, settings)
            # On CUDA the step is captured as CUDA graphs (seconds), which must not overlap serving: auto
            # waits there. On CPU, auto serves on the eager step meanwhile and switches when compiled.
            cuda = components.engine.device.type == "cuda"
            wait = settings.compile == "wait" or (settings.compile == "auto" and cuda)
            if wait:
                await in_own_thread(components.engine.try_compile)
            await self._serve(components)
            if settings.compile == "auto" and not wait:
                self._compile_thread = threading.Thread(
                    target=components.engine.try_compile, name="compile", daemon=True
                )
                self._compile_thread.start()
        except Exception as e:
            self.state.load_error = f"{type(e).__name__}: {e}"
            log.exception("startup failed")

    async def _serve(self, components: Components) -> None:
        self.state.components = components
        config = SchedulerConfig.from_settings(self.settings)
        output = OutputProcessor(components.engine.tokenizer)
        scheduler = Scheduler(components.engine, components.registry, config, output)
        await scheduler.start()
        self.state.scheduler = scheduler
        if self.state.files is not None:
            self.state.fine_tuning = start_fine_tuning(self.settings, self.state.files, components.registry)
        log.info("ready: model %s, %d prefixes", components.model_name, len(components.registry.list()))

    @property
    def compiling(self) -> bool:
        """A background compile (`--compile auto` on CPU) still runs: it cannot be interrupted."""
        return self._compile_thread is not None and self._compile_thread.is_alive()

    # ---- stop ----
    async def drain(self) -> None:
        """Stop admitting (/ready says 503); finish what was accepted, up to --shutdown-timeout-s; abort
        the rest."""
        if self.state.scheduler is not None:
            await self.state.scheduler.drain(self.settings.shutdown_timeout_s)

    def drain_soon(self, then: Callable[[], None]) -> bool:
        """From a signal handler (any thread): drain on the event loop, then call `then`. False if there
        is nothing to drain yet (still loading, or never started): the caller stops at once instead."""
        loop = self._loop
        if loop is None or self.state.scheduler is None:
            return False

        async def drain_then() -> None:
            await self.drain()
            await asyncio.sleep(FLUSH_S)
            then()

        loop.call_soon_threadsafe(lambda: self._tasks.append(loop.create_task(drain_then())))
        return True

    async def close(self) -> None:
        """Drain, then cancel what still runs in the background (a load in progress). A later start()
        serves again, on a new scheduler (an app's lifespan may run more than once, e.g. in tests)."""
        await self.drain()
        if self.state.fine_tuning is not None:  # a running job stays `running`: it resumes on the next start
            await asyncio.to_thread(self.state.fine_tuning.runner.close)
            self.state.fine_tuning = None
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        self._loop = None


def build_components(settings: Settings, *, shared_store: bool = False) -> Components:
    """Load the base model and open the prefix registry (blocking; seconds once the model is cached).
    `shared_store`: other servers write `settings.prefix_dir` at the same time (the Ray replicas)."""
    from server.engine.model import load_model

    loaded = load_model(
        settings.model,
        dtype=settings.dtype,
        device=settings.device,
        cache_dir=settings.model_cache_dir,
        quantize=settings.quantize,
    )
    fingerprint = ModelFingerprint.from_config(loaded.model.config)
    kv_cache_bytes = settings.kv_cache_bytes or default_pool_bytes(
        fingerprint,
        loaded.model.dtype,
        loaded.model.device,
        tokens=settings.max_batch_tokens
        + settings.max_batch_size * (settings.max_virtual_tokens + PAGE_SIZE),
        other_bytes=settings.prefix_cache_bytes,
    )
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        max_rows=settings.max_batch_size,
        max_seq_len=settings.max_virtual_tokens + settings.max_prompt_tokens + settings.max_new_tokens,
        max_virtual_tokens=settings.max_virtual_tokens,
        kv_cache_bytes=kv_cache_bytes,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
    )
    tokens = engine.pool.num_usable * engine.page_size
    log.info(
        "K/V pool: %d pages of %d tokens (%.2f GiB, %d tokens); row limit %d, batch token budget %d",
        engine.pool.num_usable,
        engine.page_size,
        kv_cache_bytes / 2**30,
        tokens,
        settings.max_batch_size,
        settings.max_batch_tokens,
    )
    if tokens > 2 * settings.max_batch_tokens:  # a GPU's pool: the batch limits leave most of it idle
        log.info(
            "the pool holds %d tokens, the batch limits use %d: raise --max-batch-size (e.g. 256) and "
            "--max-batch-tokens (up to %d) to serve more rows (docs/operations.md)",
            tokens,
            settings.max_batch_tokens,
            tokens,
        )
    registry = PrefixRegistry.from_settings(
        settings, engine.fingerprint, dtype=engine.dtype, device=engine.device, shared=shared_store
    )
    register_shipped_examples(settings, registry)
    return Components(engine=engine, registry=registry, model_name=loaded.name)


def register_shipped_examples(settings: Settings, registry: PrefixRegistry) -> list[str]:
    """`--examples on`: the shipped example tasks, unless those task ids exist or ever existed (an S3 fleet
    or a Ray replica leaves it off, so no server uploads demo tasks into a shared store by itself)."""
    if settings.examples != "on":
        return []
    from server.training.examples import register_examples

    return register_examples(registry)


def start_fine_tuning(settings: Settings, files: FileStore, registry: PrefixRegistry) -> FineTuning:
    """The fine-tuning jobs under --fine-tune-dir, their runs started (a job a previous server left running
    resumes from its checkpoint); a finished run's prefix becomes a new version of its task."""
    run_args = [
        *("--model", settings.model, "--model-cache-dir", str(settings.model_cache_dir)),
        *("--dtype", "float32", "--device", "cpu"),
        *("--threads", str(settings.fine_tune_threads), "--nice", str(settings.fine_tune_nice)),
    ]
    runner = JobRunner(
        settings.fine_tune_path / "jobs",
        lambda task_id, data: registry.upload(task_id, data).version,
        run_args,
    )
    runner.start()
    return FineTuning(
        settings.fine_tune_path / "jobs", files, runner, max_active_per_owner=settings.max_jobs_per_tenant
    )
