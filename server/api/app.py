"""The app factory. The model loads in the background so /health answers at once and /ready says when."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from fastapi import FastAPI

from server.api.auth import KeyRing
from server.api.errors import install_error_handlers
from server.api.forms import Utf8Forms
from server.api.limits import BodySizeLimit, BodyTimeout
from server.api.logs import RequestIdMiddleware
from server.api.metrics import Metrics
from server.api.openai import router as openai_router
from server.api.prefixes import router as prefix_router
from server.api.quotas import Quotas, TenantLimits
from server.api.routes import router
from server.api.state import Components, ServerState
from server.config import Settings
from server.engine.engine import Engine
from server.engine.pages import PAGE_SIZE, default_pool_bytes
from server.output import OutputProcessor
from server.registry.format import ModelFingerprint
from server.registry.registry import PrefixRegistry
from server.scheduler import Scheduler, SchedulerConfig
from server.threads import in_own_thread

COMPILE_THREAD = "compile"  # --compile auto: the background compile's thread (cli.py looks for it at exit)
log = logging.getLogger(__name__)


def build_components(settings: Settings) -> Components:
    """Load the base model and open the prefix registry (blocking; seconds once the model is cached)."""
    from server.engine.model import load_model

    loaded = load_model(
        settings.model, dtype=settings.dtype, device=settings.device, cache_dir=settings.model_cache_dir
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
    registry = PrefixRegistry.open(
        settings.prefix_store or settings.prefix_dir,  # an s3:// URL, else the folder
        engine.fingerprint,
        cache_bytes=settings.prefix_cache_bytes,
        dtype=engine.dtype,
        device=engine.device,
        max_virtual_tokens=settings.max_virtual_tokens,
        store_ttl_s=settings.prefix_store_ttl_s,
        store_read_delay_ms=settings.store_read_delay_ms,
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


def create_app(settings: Settings | None = None, components: Components | None = None) -> FastAPI:
    """An app serving `components`, or loading them from `settings` in the background at startup."""
    settings = settings or Settings.from_env()
    quotas = Quotas.from_settings(settings)
    keyring = KeyRing.load(settings.api_keys_file, quotas)
    if keyring.open:
        log.warning(
            "\n%s\n  NO API KEYS CONFIGURED: the server is OPEN. Anyone who can reach it can upload,\n"
            "  delete and use prefixes. Fine on localhost; set --api-keys-file anywhere else.\n%s",
            "!" * 78,
            "!" * 78,
        )
    else:
        log.info("auth: %d keys, tenants %s", len(keyring.entries), sorted(keyring.quotas))
    state = ServerState(
        settings=settings, keyring=keyring, limits=TenantLimits(keyring), components=components
    )

    async def start_serving(components: Components) -> None:
        state.components = components
        config = SchedulerConfig.from_settings(settings)
        output = OutputProcessor(components.engine.tokenizer)
        scheduler = Scheduler(components.engine, components.registry, config, output)
        await scheduler.start()
        state.scheduler = scheduler
        log.info("ready: model %s, %d prefixes", components.model_name, len(components.registry.list()))

    async def load_in_background() -> None:
        try:
            # torch work off the event loop, on threads that end afterwards (see server/threads.py)
            components = await in_own_thread(build_components, settings)
            # On CUDA the step is captured as CUDA graphs (seconds), which must not overlap serving: auto
            # waits there.
            cuda = components.engine.device.type == "cuda"
            wait = settings.compile == "wait" or (settings.compile == "auto" and cuda)
            if wait:
                await in_own_thread(components.engine.try_compile)
            await start_serving(components)
            if (
                settings.compile == "auto" and not wait
            ):  # serves on the eager step meanwhile; switches when done
                threading.Thread(
                    target=components.engine.try_compile, name=COMPILE_THREAD, daemon=True
                ).start()
        except Exception as e:
            state.load_error = f"{type(e).__name__}: {e}"
            log.exception("startup failed")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop = asyncio.get_running_loop()
        if components is not None:
            await start_serving(components)
        else:
            state.background.append(asyncio.create_task(load_in_background()))
        yield
        if state.scheduler is not None:
            await state.scheduler.drain(settings.shutdown_timeout_s)
        for task in state.background:
            task.cancel()

    app = FastAPI(
        title="prefix-server",
        version="0.1.0",
        description="One frozen base model, many prefix-tuned tasks, mixed in every batch.",
        lifespan=lifespan,
    )
    app.state.server = state
    state.metrics = Metrics(state)
    app.add_middleware(Utf8Forms)  # innermost: the size limit counts the bytes as they arrived
    # Bodies are limited while they stream in (413 before a large upload is read into memory).
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + (1 << 20))  # + form and config
    app.add_middleware(BodyTimeout, timeout_s=settings.body_timeout_s)  # a body sent a byte a second: 408
    app.add_middleware(RequestIdMiddleware)  # outermost: every response carries X-Request-ID
    install_error_handlers(app)
    app.include_router(router)  # /health, /ready, /metrics, /generate
    app.include_router(prefix_router)  # /prefixes
    app.include_router(openai_router)  # /v1/models, /v1/completions, /v1/chat/completions
    return app
