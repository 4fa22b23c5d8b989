"""The object layer of the S3 prefix store (s3_store.py): one task's objects in a bucket, through boto3.

Endpoint, region and credentials come from boto3's standard sources: AWS_ENDPOINT_URL (or
AWS_ENDPOINT_URL_S3) for MinIO and other S3-compatible stores, AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, AWS_REGION or AWS_DEFAULT_REGION, AWS_PROFILE, an instance role, ...
"""

from __future__ import annotations

from collections.abc import Iterable

from server.config import S3_URL_RE
from server.errors import InvalidRequest, PrefixServerError
from server.registry.store import is_task_id

_CONFLICT = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")
_MISSING = ("NoSuchKey", "NoSuchBucket", "404", "NotFound")

Listing = dict[str, tuple[str, int]]  # object name under a task's prefix -> (ETag, size)


class TaskObjects:
    """Objects under s3://bucket/<key prefix>/tasks/<task_id>/, by task id and name."""

    def __init__(self, client, url: str) -> None:
        m = S3_URL_RE.fullmatch(url)
        if m is None:
            raise InvalidRequest(f"prefix store URL must be s3://bucket[/key/prefix], got {url!r:.200}")
        self.client, self.url, self.bucket = client, url, m["bucket"]
        key_prefix = (m["key_prefix"] or "").strip("/")
        self.prefix = f"{key_prefix}/tasks/" if key_prefix else "tasks/"

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
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=5,
            read_timeout=30,
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
        reply = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.key(task_id), MaxKeys=1)
        return reply.get("KeyCount", 0) > 0

    def etag(self, task_id: str, name: str) -> str | None:
        """The object's ETag (a HEAD), None if it does not exist."""
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key(task_id, name))["ETag"]
        except Exception as e:
            if error_code(e) in _MISSING:
                return None
            raise

    def get(self, task_id: str, name: str) -> bytes:
        """The object's bytes; FileNotFoundError if it does not exist."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(task_id, name))["Body"].read()
        except Exception as e:
            if error_code(e) in _MISSING:
                raise FileNotFoundError(self.where(task_id, name)) from e
            raise

    def put(self, task_id: str, name: str, body: bytes) -> str:
        """Write (or replace) the object; its new ETag."""
        return self.client.put_object(Bucket=self.bucket, Key=self.key(task_id, name), Body=body)["ETag"]

    def create(self, task_id: str, name: str, body: bytes) -> bool:
        """Write the object unless it exists (a conditional put, If-None-Match: *); False if it did."""
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self.key(task_id, name), Body=body, IfNoneMatch="*"
            )
        except Exception as e:
            if error_code(e) in _CONFLICT:  # 409: a concurrent conditional write to the same key
                return False
            raise
        return True

    def remove(self, task_id: str, names: Iterable[str]) -> None:
        """Delete the objects in the order given (absent ones are fine)."""
        for name in names:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(task_id, name))

    def _list(self, prefix: str) -> Iterable[tuple[str, tuple[str, int]]]:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"], (obj["ETag"], obj["Size"])


def error_code(e: Exception) -> str:
    """A botocore ClientError's error code ("NoSuchKey", "412", ...), else ""."""
    response = getattr(e, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))
