"""The app factory: middleware, routes and error handlers over a server's state; its lifespan starts and
closes the server's Runtime (api/runtime.py: load, compile, serve, drain)."""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI

from server.api.auth import KeyRing
from server.api.errors import install_error_handlers
from server.api.files import router as files_router
from server.api.fine_tuning import router as fine_tuning_router
from server.api.forms import Utf8Forms
from server.api.limits import BodySizeLimit, BodyTimeout
from server.api.logs import RequestIdMiddleware
from server.api.metrics import Metrics
from server.api.openai import router as openai_router
from server.api.prefixes import router as prefix_router
from server.api.quotas import Quotas, TenantLimits
from server.api.routes import router
from server.api.runtime import Runtime, build_components, register_shipped_examples
from server.api.state import Components, ServerState
from server.config import Settings
from server.finetune.files import FileStore

# build_components and register_shipped_examples are the runtime's; named here too for the callers
# that build an app's components themselves (tests, the Ray replica).
__all__ = ["Components", "build_components", "create_app", "register_shipped_examples"]
log = logging.getLogger(__name__)


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
    files = FileStore(
        settings.fine_tune_path / "files",
        max_file_bytes=settings.max_file_bytes,
        max_bytes_per_owner=settings.max_file_bytes_per_tenant,
    )  # nothing is read or written before the runtime starts
    state = ServerState(
        settings=settings, keyring=keyring, limits=TenantLimits(keyring), components=components, files=files
    )

    runtime = Runtime(state, components)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await runtime.start()
        yield
        await runtime.close()

    app = FastAPI(
        title="prefix-server",
        version="0.1.0",
        description="One frozen base model, many prefix-tuned tasks, mixed in every batch.",
        lifespan=lifespan,
    )
    app.state.server, app.state.runtime = state, runtime
    state.metrics = Metrics(state)
    app.add_middleware(Utf8Forms)  # innermost: the size limit counts the bytes as they arrived
    # Bodies are limited while they stream in (413 before a large upload is read into memory): a
    # prefix's or a fine-tuning file's limit, + 1 MiB for the form and a PEFT config.
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_upload_bytes + (1 << 20),
        path_limits={"/v1/files": settings.max_file_bytes + (1 << 20)},
    )
    app.add_middleware(BodyTimeout, timeout_s=settings.body_timeout_s)  # a body sent a byte a second: 408
    app.add_middleware(RequestIdMiddleware)  # outermost: every response carries X-Request-ID
    install_error_handlers(app)
    app.include_router(router)  # /health, /ready, /metrics, /generate
    app.include_router(prefix_router)  # /prefixes
    app.include_router(openai_router)  # /v1/models, /v1/completions, /v1/chat/completions
    app.include_router(files_router)  # /v1/files
    app.include_router(fine_tuning_router)  # /v1/fine_tuning/jobs
    return app
