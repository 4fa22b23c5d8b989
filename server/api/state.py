"""What a running app holds, typed: the components (engine, registry), the scheduler, auth, metrics and
the fine-tuning files.

Every route reaches it through `serving(request)`, which also answers 503 while the model loads or
the server shuts down. Its own module so that the app factory and the routes do not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.requests import Request

from server.errors import NotReady

if TYPE_CHECKING:
    from server.api.auth import KeyRing
    from server.api.metrics import Metrics
    from server.api.quotas import TenantLimits
    from server.config import Settings
    from server.engine.engine import Engine
    from server.finetune.files import FileStore
    from server.finetune.manager import FineTuning
    from server.registry.registry import PrefixRegistry
    from server.scheduler import Scheduler


@dataclass
class Components:
    """What a running server holds; tests build it from a tiny model, `serve` from the real one."""

    engine: Engine
    registry: PrefixRegistry
    model_name: str


@dataclass
class ServerState:
    settings: Settings
    keyring: KeyRing
    limits: TenantLimits
    components: Components | None = None
    scheduler: Scheduler | None = None
    load_error: str | None = None
    metrics: Metrics | None = None
    files: FileStore | None = None  # fine-tuning files (api/files.py); they need no model
    fine_tuning: FineTuning | None = None  # fine-tuning jobs (api/fine_tuning.py), once the model is loaded

    @property
    def ready(self) -> bool:
        return self.scheduler is not None and self.scheduler.accepting


def app_state(request: Request) -> ServerState:
    """The app's state, ready or not (/health and /metrics answer while the model loads)."""
    return request.app.state.server


def serving(request: Request) -> ServerState:
    """The server state, or 503 while the model is loading (or failed to load) or shutting down."""
    state = app_state(request)
    if not state.ready:
        if state.scheduler is not None:
            why = "shutting down"
        elif state.load_error:
            why = f"startup failed: {state.load_error}"
        else:
            why = "the model is still loading"
        raise NotReady(f"not ready: {why}")
    return state
