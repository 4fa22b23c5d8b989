"""The Ray Serve application: an ingress in front of N replicas of the single-server app.

    serve run server.distributed.app:build_app num_replicas=2 prefix_dir=/shared/prefixes model=default

Arguments (key=value, or a dict in Python): every Settings field (as `prefix-server serve` flags, e.g.
`max_batch_size=16`; unset ones come from PREFIX_SERVER_* variables, then the defaults), and
`num_replicas` (2), `replica_cpus` (1), `replica_gpus` (0), `max_tasks_per_replica` (128: tasks whose
prefixes one replica keeps and Ray routes to it), `max_ongoing_requests` (per replica; default 2 x
max_batch_size: beyond it Ray sends a task's requests to another replica as well),
`max_queued_requests` (waiting in the ingress for a replica; default max_queue; beyond it 429).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ray import serve
from ray.serve import Application

from server.config import ENV_PREFIX, Settings
from server.distributed.ingress import PrefixServerIngress
from server.distributed.replica import PrefixServerReplica
from server.errors import ConfigError
from server.threads import openmp_env

APP_OPTIONS = {
    "num_replicas": (int, 2),
    "replica_cpus": (float, 1.0),
    "replica_gpus": (float, 0.0),
    "ingress_cpus": (float, 0.1),
    "max_tasks_per_replica": (int, 128),
    "max_ongoing_requests": (int, 0),  # 0: 2 x max_batch_size
    "max_queued_requests": (int, 0),  # 0: max_queue
}


def replica_actor_options(opts: dict[str, Any]) -> dict[str, Any]:
    """A replica's Ray actor: its CPUs and GPUs, and the engine's OpenMP spin (server/threads.py) in its
    environment from the start, before its process imports torch."""
    return {
        "num_cpus": opts["replica_cpus"],
        "num_gpus": opts["replica_gpus"],
        "runtime_env": {"env_vars": openmp_env()},
    }


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The application `serve run` / `serve.run` deploys; `args` as described in the module doc."""
    args = dict(args or {})
    fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = set(args) - fields - set(APP_OPTIONS)
    if unknown:
        raise ConfigError(
            f"unknown arguments {sorted(unknown)}; expected Settings fields or {sorted(APP_OPTIONS)}"
        )
    # Arguments arrive as strings from `serve run`: they go through the same parsing as the environment.
    environ = dict(os.environ)
    environ.update({ENV_PREFIX + k.upper(): str(v) for k, v in args.items() if k in fields})
    settings = Settings.from_env(environ=environ)
    opts = {name: kind(args.get(name, default)) for name, (kind, default) in APP_OPTIONS.items()}
    replicas = serve.deployment(PrefixServerReplica).options(
        name="PrefixServerReplica",
        num_replicas=opts["num_replicas"],
        ray_actor_options=replica_actor_options(opts),
        max_ongoing_requests=opts["max_ongoing_requests"] or 2 * settings.max_batch_size,
        max_queued_requests=opts["max_queued_requests"] or settings.max_queue,
        # Ray waits this long for __del__, which lets running requests finish first.
        graceful_shutdown_timeout_s=settings.shutdown_timeout_s + 5,
    )
    ingress = serve.deployment(PrefixServerIngress).options(
        name="PrefixServerIngress",
        ray_actor_options={"num_cpus": opts["ingress_cpus"]},
        max_ongoing_requests=10_000,  # it only waits on replicas; their limits apply there
    )
    return ingress.bind(replicas.bind(settings, opts["max_tasks_per_replica"]), settings)
