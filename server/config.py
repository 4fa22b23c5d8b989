"""One frozen Settings object; the only place that reads PREFIX_SERVER_* environment variables."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.errors import ConfigError

ENV_PREFIX = "PREFIX_SERVER_"
REPO_ROOT = Path(__file__).resolve().parent.parent
QUANTIZE_CHOICES = ("off", "int8", "w8a8")  # --quantize (server/engine/quantize.py)
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


def setting(default: Any = dataclasses.MISSING, *, help: str, factory: Callable[[], Any] | None = None):
    """A Settings field: its default (or a factory of it) and the help of its `prefix-server serve` flag.
    The flags, the PREFIX_SERVER_* variables and Ray Serve's app arguments are all made from the fields."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    # base model
    model: str = setting(
        "default", help="'default' (SmolLM2-135M-Instruct), a Hugging Face folder, a .gguf file, or a hub id"
    )
    dtype: str = setting(
        "auto", help="auto | float32 | bfloat16 | float16 (auto: float32 on CPU, bfloat16 on CUDA)"
    )
    device: str = setting("auto", help="auto | cpu | cuda | cuda:N")
    quantize: str = setting(
        "off",
        help="off | int8 | w8a8: int8 weights for every linear and the lm_head (a float32 scale per 32 "
        "weights, Llama-family models); K/V and prefixes stay in --dtype. About half of bfloat16's weight "
        "reads. int8: outputs change about as much as bfloat16's; w8a8: activations rounded to int8 too "
        "(llama.cpp's Q8_0 arithmetic; faster for many rows, further from float32). docs/internals.md",
    )
    compile: str = setting(
        "auto",
        help="auto | wait | off: compile the decode step with torch.compile (Llama, Mistral, Qwen2/3 models). "
        "auto (default): serve at once on the eager step and switch when compiled (minutes on a small "
        "CPU; cached for later starts); wait: compile before /ready; off: always eager. On CUDA the step "
        "is captured as CUDA graphs instead, before /ready (auto = wait there)",
    )
    model_cache_dir: Path = setting(factory=_default_cache_dir, help="where converted GGUF models are kept")
    # HTTP
    host: str = setting("127.0.0.1", help="bind address (default 127.0.0.1)")
    port: int = setting(8000, help="port (default 8000)")
    # slow and idle clients (api/connections.py, api/limits.py)
    keep_alive_s: float = setting(
        5.0, help="seconds an idle keep-alive connection stays open after a reply (default 5)"
    )
    header_timeout_s: float = setting(
        10.0,
        help="seconds a connection has to send a complete request line and headers, from its opening or its "
        "previous reply; then it is closed (408 if it sent part of one) (default 10)",
    )
    body_timeout_s: float = setting(
        60.0,
        help="seconds the whole request body has to arrive after its headers; then 408 and the connection is "
        "closed. A 64 MiB upload needs ~1.1 MB/s at the default; 0 = none (default 60)",
    )
    max_connections: int = setting(
        1000,
        help="open connections; a new one beyond this closes the oldest connection still waiting for its "
        "request head, or gets 503 if every one is running a request (default 1000)",
    )
    # prefix registry
    prefix_dir: Path = setting(
        factory=_default_prefix_dir,
        help="prefix store folder (default: prefixes/ of the source checkout when run from inside it, as `make"
        " serve` does; else $XDG_DATA_HOME/prefix-server/prefixes, i.e. ~/.local/share/...)",
    )
    prefix_store: str = setting(
        "",
        help="s3://bucket[/key/prefix]: keep prefixes in an S3-compatible object store shared by every server "
        "instead of --prefix-dir (pip install '.[s3]'; endpoint and credentials from AWS_ENDPOINT_URL, "
        "AWS_ACCESS_KEY_ID, ... as boto3 reads them)",
    )
    prefix_store_ttl_s: float = setting(
        1.0,
        help="S3 store: seconds a server trusts what it knows of a task before checking the bucket; a new "
        "version reaches every server within this (default 1.0)",
    )
    store_read_delay_ms: float = setting(
        0.0,
        help="for benchmarks and tests: every read of a prefix file from the store first sleeps this long "
        "(simulates a slow object store) (default 0)",
    )
    prefix_cache_bytes: int = setting(
        512 * 1024 * 1024, help="in-memory prefix cache budget in bytes (LRU beyond it)"
    )
    kv_cache_bytes: int = setting(
        0,
        help="bytes of the K/V page pool (running rows and resident prefixes); 0 (default): room for "
        "max-batch-tokens plus a longest prefix per row, at most a quarter of free memory",
    )
    max_virtual_tokens: int = setting(256, help="largest prefix accepted, in virtual tokens")
    max_upload_bytes: int = setting(64 * 1024 * 1024, help="largest prefix upload accepted (413 beyond it)")
    # fine-tuning through the API (server/finetune/, api/files.py)
    fine_tune_dir: Path | None = setting(
        None,
        help="where fine-tuning files (POST /v1/files) are kept (default: <prefix-dir>/fine-tune, so they "
        "live beside the tasks they train and a server given its own --prefix-dir gets its own)",
    )
    max_file_bytes: int = setting(
        50 * 1024 * 1024, help="largest fine-tuning file accepted by POST /v1/files (413 beyond it)"
    )
    max_file_bytes_per_tenant: int = setting(
        100 * 1024 * 1024,
        help="bytes of fine-tuning files each tenant may keep (open mode and admins share one allowance); "
        "429 quota_exceeded beyond it (0 = unlimited)",
    )
    max_jobs_per_tenant: int = setting(
        2, help="fine-tuning jobs each tenant may have queued or running (429 beyond it; 0 = unlimited)"
    )
    fine_tune_threads: int = setting(1, help="torch threads of a fine-tuning run (its own process)")
    fine_tune_nice: int = setting(
        10,
        help="CPU niceness added to a fine-tuning run's process: it takes the cores serving leaves idle "
        "(0: an equal share)",
    )
    examples: str = setting(
        "off",
        help="on: register the shipped example tasks (prefixes/examples/: sentiment, booking) at start, unless "
        "those task ids exist or ever existed; off: the store is served as it is (`make serve` and the Docker "
        "image set on)",
    )
    # batching and limits
    # Rows decoded together. 32: on a 2-core CPU 32 and 64 concurrent requests gave 1.27-1.29x and 1.20-1.31x
    # the tokens/s of 16 (two runs of loadtest/bench_pool.py): 64 is no better within noise, and costs one
    # more compiled bucket and more padding.
    max_batch_size: int = setting(32, help="most rows decoded together (the running batch's row limit)")
    max_batch_wait_ms: float = setting(5.0, help="how long an idle engine waits for a first batch to fill")
    max_batch_tokens: int = setting(
        32768, help="token budget of the running batch (prefix + prompt + max_new_tokens per row)"
    )
    prefill_chunk_tokens: int = setting(
        512,  # engine.PREFILL_CHUNK_TOKENS
        help="most prompt tokens one prefill forward takes (default 512): a longer prompt is prefilled in "
        "chunks, the running rows decoding a token between them; 0 = every prompt whole",
    )
    max_queue: int = setting(256, help="most waiting requests; beyond it 429 with Retry-After")
    batching: str = setting("continuous", help="continuous (default) | static")
    request_timeout_s: float = setting(0.0, help="per-request timeout in seconds (0 = none)")
    shutdown_timeout_s: float = setting(30.0, help="on SIGTERM, how long running requests may take to finish")
    max_prompt_tokens: int = setting(2048, help="longest prompt accepted")
    max_new_tokens: int = setting(1024, help="largest max_new_tokens accepted")
    log_level: str = setting("info", help="debug | info | warning | error")
    log_format: str = setting("json", help="json (one JSON object per line) | text")
    # tenants (api/auth.py): no keys file = open mode
    api_keys_file: Path | None = setting(
        None, help="JSON file of API keys -> tenants (absent: open mode, no auth)"
    )
    tenant_max_prefixes: int = setting(0, help="per-tenant quota: number of prefixes (0 = unlimited)")
    tenant_max_prefix_bytes: int = setting(
        0, help="per-tenant quota: bytes of stored prefixes (0 = unlimited)"
    )
    tenant_max_concurrent: int = setting(0, help="per-tenant quota: concurrent requests (0 = unlimited)")
    tenant_rate: float = setting(
        0.0, help="per-tenant quota: requests per second, token bucket (0 = unlimited)"
    )
    tenant_burst: int = setting(0, help="per-tenant quota: token bucket size (0 = max(1, rate))")

    def __post_init__(self) -> None:
        positive = [
            "port",
            "prefix_cache_bytes",
            "max_virtual_tokens",
            "max_upload_bytes",
            "max_file_bytes",
            "fine_tune_threads",
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
                raise ConfigError(f"setting {name} must be a positive integer, got {value!r}")
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
            "max_file_bytes_per_tenant",
            "max_jobs_per_tenant",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"setting {name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("keep_alive_s", "header_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"setting {name} must be > 0 seconds, got {getattr(self, name)!r}")
        if not 0 <= self.fine_tune_nice <= 19:
            raise ConfigError(f"setting fine_tune_nice must be in [0, 19], got {self.fine_tune_nice!r}")
        if self.body_timeout_s < 0:
            raise ConfigError(f"setting body_timeout_s must be >= 0 (0 = none), got {self.body_timeout_s!r}")
        if self.log_format not in ("json", "text"):
            raise ConfigError(f"setting log_format must be 'json' or 'text', got {self.log_format!r}")
        if self.prefix_store and not S3_URL_RE.fullmatch(self.prefix_store):
            raise ConfigError(
                "setting prefix_store must be empty (the folder prefix_dir) or s3://bucket[/key/prefix] "
                f"(bucket: 3-63 of a-z 0-9 . -), got {self.prefix_store!r:.200}"
            )
        if self.quantize not in QUANTIZE_CHOICES:
            raise ConfigError(
                f"setting quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize!r}"
            )
        if self.compile not in ("auto", "wait", "off"):
            raise ConfigError(f"setting compile must be 'auto', 'wait' or 'off', got {self.compile!r}")
        if self.examples not in ("on", "off"):
            raise ConfigError(f"setting examples must be 'on' or 'off', got {self.examples!r}")
        if self.batching not in ("continuous", "static"):
            raise ConfigError(f"setting batching must be 'continuous' or 'static', got {self.batching!r}")

    @property
    def fine_tune_path(self) -> Path:
        """The folder of fine-tuning files and jobs: --fine-tune-dir, else <prefix-dir>/fine-tune."""
        return self.fine_tune_dir if self.fine_tune_dir is not None else self.prefix_dir / "fine-tune"

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
        for name in ("prefix_dir", "model_cache_dir", "api_keys_file", "fine_tune_dir"):
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
        raise ConfigError(f"{ENV_PREFIX}{f.name.upper()} must be {what}, got {raw!r}") from e
    return raw
