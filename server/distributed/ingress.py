"""The ingress: the HTTP edge in front of the replicas. No model here, and no routing of its own.

Every request goes unchanged to a replica, which answers with the single-server app, so endpoints,
errors, auth and streaming are those of `prefix-server serve`. The ingress only says *which* id Ray's
multiplexed routing should use: the stored task id for the routes that run a task's prefix (so they
land on a replica that holds it), "__base__" when they name no task, and none for everything else
(uploads, listings, /ready: any replica serves them, since the store is shared).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from server.api.auth import KeyRing, authenticate
from server.api.errors import install_error_handlers
from server.api.limits import BodySizeLimit
from server.api.quotas import Quotas
from server.api.schemas import TASK_ID_PATTERN, Health
from server.config import Settings
from server.distributed import BASE_MODEL_ID
from server.errors import NotReady, Overloaded, PrefixServerError

log = logging.getLogger(__name__)

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# path -> the JSON body field naming the task whose prefix the request runs (null: the base model)
ROUTED_FIELDS = {"/generate": "task_id", "/v1/completions": "model", "/v1/chat/completions": "model"}


def routing_id(path: str, body: bytes, keyring: KeyRing, authorization: str | None) -> str | None:
    """The multiplexed model id for a request: the registry's (tenant-namespaced) id of the task it
    runs, BASE_MODEL_ID for none, or None where any replica will do (including every request the
    replica will refuse anyway: malformed, unauthenticated)."""
    field = ROUTED_FIELDS.get(path)
    if field is None:
        return None
    try:
        named = json.loads(body).get(field)
        caller = authenticate(keyring, authorization)
        task_id = None if named is None else caller.stored_id(named)
    except (ValueError, AttributeError, TypeError, PrefixServerError):
        return None
    if task_id is None:
        return BASE_MODEL_ID
    return task_id if isinstance(task_id, str) and re.fullmatch(TASK_ID_PATTERN, task_id) else None


@serve.ingress()
class PrefixServerIngress:
    def __init__(self, replicas: DeploymentHandle, settings: Settings) -> None:
        self.replicas, self.settings = replicas, settings
        self.keyring = KeyRing.load(settings.api_keys_file, Quotas())  # to name stored ids, as replicas do

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title="prefix-server ingress", openapi_url=None, docs_url=None, redoc_url=None)
        # The same limit as the replicas' app, enforced here too so an oversized body never travels on.
        app.add_middleware(BodySizeLimit, max_bytes=self.settings.max_upload_bytes + (1 << 20))
        install_error_handlers(app)
        app.add_api_route("/health", health, methods=["GET"], response_model=Health)
        app.add_route("/{path:path}", self.forward, methods=METHODS, include_in_schema=False)
        return app

    async def forward(self, request: Request) -> Response:
        """Send the request to a replica (by task id where it runs a task) and relay its reply."""
        path = request.scope["path"].removeprefix(request.scope.get("root_path", "")) or "/"
        body = await request.body()
        model_id = routing_id(path, body, self.keyring, request.headers.get("authorization"))
        options = {"stream": True} | ({"multiplexed_model_id": model_id} if model_id else {})
        stream = self.replicas.forward.options(**options).remote(
            request.method, path, request.scope.get("query_string", b""), request.headers.raw, body
        )
        try:
            head = await stream.__anext__()
        except BackPressureError as e:
            raise Overloaded("every replica's queue is full; retry later") from e
        except (DeploymentUnavailableError, RayActorError) as e:
            raise NotReady(f"no replica could take the request: {type(e).__name__}") from e
        if head.more_body:
            response = StreamingResponse(_rest(head.body, stream), status_code=head.status)
        else:
            response = Response(head.body, status_code=head.status)
        # The replica's headers, content-length included; Ray's proxy adds x-request-id (the same id).
        response.raw_headers = [(k, v) for k, v in head.headers if k.lower() != b"x-request-id"]
        return response


async def health() -> Health:
    """This process is alive (whether replicas are ready is /ready's question)."""
    return Health(status="ok")


async def _rest(first: bytes, stream: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    """The body of a streamed reply (server-sent events); a client that goes away cancels the replica's
    side, which aborts the request as on the single server."""
    done = False
    try:
        if first:
            yield first
        async for chunk in stream:
            yield chunk
        done = True
    finally:
        if not done:
            stream.cancel()
