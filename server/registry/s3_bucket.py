"""The object layer of the S3 prefix store (s3_store.py): one task's objects in a bucket, through boto3.

Endpoint, region and credentials come from boto3's standard sources: AWS_ENDPOINT_URL (or
AWS_ENDPOINT_URL_S3) for MinIO and other S3-compatible stores, AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, AWS_REGION or AWS_DEFAULT_REGION, AWS_PROFILE, an instance role, ...
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from server.config import S3_URL_RE
from server.errors import ConfigError, PrefixServerError, StoreUnavailable
from server.registry.store import is_task_id

logger = logging.getLogger(__name__)
T = TypeVar("T")

_CONFLICT = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")
_MISSING = ("NoSuchKey", "NoSuchBucket", "404", "NotFound")
# Every call is bounded: a connection within CONNECT_TIMEOUT_S, each socket read within READ_TIMEOUT_S,
# MAX_ATTEMPTS tries in all (botocore's standard retries; its jittered backoff before the 2nd try is at
# most 1 s, unless a store that answers asks for more with x-amz-retry-after). So a call to an endpoint
# that accepts and never answers fails within CALL_BOUND_S; a refused connection fails in milliseconds.
# After such a failure no call waits at all: each fails at once with StoreUnavailable until a background
# HEAD of the bucket, every PROBE_INTERVAL_S, gets an answer.
CONNECT_TIMEOUT_S = 2
READ_TIMEOUT_S = 5
MAX_ATTEMPTS = 2
CALL_BOUND_S = MAX_ATTEMPTS * (CONNECT_TIMEOUT_S + READ_TIMEOUT_S) + 1
PROBE_INTERVAL_S = 1.0

Listing = dict[str, tuple[str, int]]  # object name under a task's prefix -> (ETag, size)


class TaskObjects:
    """Objects under s3://bucket/<key prefix>/tasks/<task_id>/, by task id and name."""

    def __init__(self, client, url: str) -> None:
        m = S3_URL_RE.fullmatch(url)
        if m is None:
            raise ConfigError(f"prefix store URL must be s3://bucket[/key/prefix], got {url!r:.200}")
        self.client, self.url, self.bucket = client, url, m["bucket"]
        key_prefix = (m["key_prefix"] or "").strip("/")
        self.prefix = f"{key_prefix}/tasks/" if key_prefix else "tasks/"
        self._down_since: float | None = None  # monotonic time the endpoint stopped answering, if it has
        self._down_why = ""
        self._down_lock = threading.Lock()

    @classmethod
    def connect(cls, url: str) -> TaskObjects:
        """A boto3 client from the standard sources; PrefixServerError naming `url` unless the bucket answers."""
        try:
            import boto3
            from botocore.config import Config
        except ImportError as e:
            raise PrefixServerError(f"prefix store {url} needs boto3: pip install 'prefix-server[s3]'") from e
        # Checksums only where S3 requires them (some S3-compatible stores reject the newer defaults);
        # the store checks every file against its sha256 anyway.
        config = Config(
            retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        objects = cls(boto3.client("s3", config=config), url)
        objects.check()
        return objects

    def check(self) -> None:
        """HEAD the bucket: PrefixServerError naming the URL, the endpoint and the reason if it fails."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:  # ClientError (404, 403, ...), BotoCoreError (no endpoint, no credentials)
            why = {"404": "no such bucket; ", "403": "access denied (credentials?); "}.get(error_code(e), "")
            raise PrefixServerError(
                f"prefix store {self.url}: bucket {self.bucket!r} at {self.client.meta.endpoint_url} "
                f"cannot be used: {why}{type(e).__name__}: {e}"
            ) from None

    @property
    def reachable(self) -> bool:
        """False from a call that found the endpoint silent until the background probe gets an answer."""
        return self._down_since is None

    def key(self, task_id: str, name: str = "") -> str:
        return f"{self.prefix}{task_id}/{name}"

    def where(self, task_id: str, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(task_id, name)}"

    def list_task(self, task_id: str) -> Listing:
        """Every object of one task (a LIST: strongly consistent on S3 and MinIO)."""
        start = len(self.key(task_id))
        return {key[start:]: tag for key, tag in self._list(self.key(task_id))}

    def list_tasks(self, warnings: list[str]) -> dict[str, Listing]:
        """Every task's objects (one LIST per 1000 objects); keys that fit no task go to `warnings`."""
        tasks: dict[str, Listing] = {}
        for key, tag in self._list(self.prefix):
            task_id, _, name = key[len(self.prefix) :].partition("/")
            if is_task_id(task_id) and name and "/" not in name:
                tasks.setdefault(task_id, {})[name] = tag
            else:
                warnings.append(f"ignored s3://{self.bucket}/{key}: not tasks/<task_id>/<name>")
        return tasks

    def any(self, task_id: str) -> bool:
        reply = self._call(
            lambda: self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.key(task_id), MaxKeys=1)
        )
        return reply.get("KeyCount", 0) > 0

    def etag(self, task_id: str, name: str) -> str | None:
        """The object's ETag (a HEAD), None if it does not exist."""
        try:
            return self._call(
                lambda: self.client.head_object(Bucket=self.bucket, Key=self.key(task_id, name))
            )["ETag"]
        except Exception as e:
            if error_code(e) in _MISSING:
                return None
            raise

    def get(self, task_id: str, name: str) -> bytes:
        """The object's bytes; FileNotFoundError if it does not exist."""
        try:
            return self._call(
                lambda: self.client.get_object(Bucket=self.bucket, Key=self.key(task_id, name))["Body"].read()
            )
        except Exception as e:
            if error_code(e) in _MISSING:
                raise FileNotFoundError(self.where(task_id, name)) from e
            raise

    def put(self, task_id: str, name: str, body: bytes) -> str:
        """Write (or replace) the object; its new ETag."""
        key = self.key(task_id, name)
        return self._call(lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=body))["ETag"]

    def create(self, task_id: str, name: str, body: bytes) -> bool:
        """Write the object unless it exists (a conditional put, If-None-Match: *); False if it did."""
        try:
            key = self.key(task_id, name)
            self._call(
                lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
            )
        except Exception as e:
            if error_code(e) in _CONFLICT:  # 409: a concurrent conditional write to the same key
                return False
            raise
        return True

    def remove(self, task_id: str, names: Iterable[str]) -> None:
        """Delete the objects in the order given (absent ones are fine)."""
        for name in names:
            key = self.key(task_id, name)
            self._call(lambda key=key: self.client.delete_object(Bucket=self.bucket, Key=key))

    def _list(self, prefix: str) -> Iterable[tuple[str, tuple[str, int]]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        for page in self._call(lambda: list(pages)):
            for obj in page.get("Contents", []):
                yield obj["Key"], (obj["ETag"], obj["Size"])

    def _call(self, request: Callable[[], T]) -> T:
        """Run one request to the store; StoreUnavailable (503) if the endpoint cannot be reached or
        answers 5xx after the retries, and at once, without a request, while it is known to be down."""
        if self._down_since is not None:
            raise StoreUnavailable(self._down_message())
        try:
            return request()
        except Exception as e:
            if _unreachable(e):
                self._went_down(e)
                raise StoreUnavailable(self._down_message()) from e
            if error_code(e).startswith("5") or error_code(e) in _BUSY:
                raise StoreUnavailable(
                    f"prefix store {self.url} answered {error_code(e)} ({e}); retry shortly"
                ) from e
            raise

    def _down_message(self) -> str:
        since = time.monotonic() - (self._down_since or time.monotonic())
        return (
            f"prefix store {self.url} at {self.client.meta.endpoint_url} cannot be reached "
            f"({self._down_why}; for {since:.0f} s): requests that need it fail until it answers again "
            f"(checked every {PROBE_INTERVAL_S:g} s); prefixes already in memory are still served"
        )

    def _went_down(self, e: Exception) -> None:
        with self._down_lock:
            if self._down_since is not None:
                return
            self._down_since, self._down_why = time.monotonic(), f"{type(e).__name__}: {e}"
        logger.warning("prefix store %s: unreachable (%s)", self.url, self._down_why)
        threading.Thread(target=self._probe, name="s3-store-probe", daemon=True).start()

    def _probe(self) -> None:
        """Until the endpoint answers (anything: an error reply is an answer), HEAD the bucket."""
        while True:
            time.sleep(PROBE_INTERVAL_S)
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except Exception as e:
                if _unreachable(e):
                    continue
            with self._down_lock:
                down_for = time.monotonic() - (self._down_since or time.monotonic())
                self._down_since = None
            logger.warning("prefix store %s: reachable again after %.1f s", self.url, down_for)
            return


_BUSY = ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout")


def _unreachable(e: Exception) -> bool:
    """Whether `e` says the endpoint did not answer (refused, timed out, cut off), as opposed to a reply."""
    try:
        from botocore import exceptions
    except ImportError:
        return False
    return isinstance(
        e,
        (
            exceptions.ConnectionError,  # refused, connect timeout, no such host
            exceptions.HTTPClientError,  # read timeout, connection closed
            exceptions.ResponseStreamingError,  # cut off while the body was read
            exceptions.IncompleteReadError,
        ),
    )


def error_code(e: Exception) -> str:
    """A botocore ClientError's error code ("NoSuchKey", "412", ...), else ""."""
    response = getattr(e, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))
