"""API keys -> tenants, and task-id namespacing (the tenants' quotas are in api/quotas.py).

Keys file: {"admin": ["KEY", ...], "tenants": {"acme": ["KEY", "sha256:HEX", ...]},
            "quotas": {"acme": {"max_prefixes": 10, ...}}}  ("quotas" optional; defaults come from flags).
A key may be written as "sha256:" + the hex digest of the key, so the file need not hold secrets.
Every key is kept as a digest and compared in constant time.

A tenant's task "summarize" is stored as "acme~summarize"; a tenant never sees the namespace, and
another tenant's tasks are invisible to it (404, never 403). An admin addresses stored ids directly
("acme~summarize"; a bare id is the shared namespace that open mode uses).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from server.api.quotas import Quotas
from server.errors import ConfigError, InvalidRequest, Unauthorized, shown

log = logging.getLogger(__name__)

TENANT_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
SEP = "~"


@dataclass(frozen=True)
class Caller:
    tenant: str | None  # None: admin or open mode
    admin: bool

    def stored_id(self, task_id: str) -> str:
        """The registry id of a task id as this caller names it."""
        if SEP in task_id and not self.admin:
            own = f"{self.tenant}{SEP}"
            if self.tenant is not None and task_id.startswith(own) and SEP not in task_id[len(own) :]:
                # said apart from the message below, which error replies would show without the namespace
                raise InvalidRequest(f"task_id must not name the namespace {own!r}: the server adds it")
            raise InvalidRequest(f"task_id must be 1-64 of A-Za-z0-9._- (no '{SEP}'), got {shown(task_id)}")
        return task_id if self.tenant is None else f"{self.tenant}{SEP}{task_id}"

    def visible_id(self, stored_id: str) -> str:
        return stored_id if self.tenant is None else stored_id.removeprefix(f"{self.tenant}{SEP}")

    def visible_text(self, message: str) -> str:
        """An error message with this tenant's stored ids as it names them: the registry and the
        scheduler quote stored ids ('acme~summarize'); the tenant named the task 'summarize'."""
        if self.tenant is None:
            return message
        return re.sub(rf"(?<=['\"]){re.escape(self.tenant + SEP)}(?=[A-Za-z0-9._-]+['\"])", "", message)

    def owns(self, stored_id: str) -> bool:
        if self.tenant is None:
            return self.admin or SEP not in stored_id  # open mode sees only the shared namespace
        return stored_id.startswith(f"{self.tenant}{SEP}")


OPEN = Caller(tenant=None, admin=False)
ADMIN = Caller(tenant=None, admin=True)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass
class KeyRing:
    """Digests of every configured key -> who it is."""

    entries: list[tuple[bytes, Caller]] = field(default_factory=list)
    quotas: dict[str, Quotas] = field(default_factory=dict)

    @property
    def open(self) -> bool:
        return not self.entries

    @classmethod
    def load(cls, path: Path | None, default_quotas: Quotas) -> KeyRing:
        if path is None:
            return cls()
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"api keys file {path}: cannot read JSON: {e}") from e
        if not isinstance(doc, dict) or not set(doc) <= {"admin", "tenants", "quotas"}:
            raise ConfigError(f'api keys file {path}: expected {{"admin": [...], "tenants": {{...}}}}')
        ring = cls()
        for key in _key_list(doc.get("admin", []), "admin"):
            ring.entries.append((_parse_key(key, "admin"), ADMIN))
        tenants = doc.get("tenants", {})
        if not isinstance(tenants, dict):
            raise ConfigError("api keys file: 'tenants' must map tenant names to lists of keys")
        for tenant, keys in tenants.items():
            if not TENANT_RE.fullmatch(tenant):
                raise ConfigError(f"api keys file: tenant name must be 1-32 of A-Za-z0-9_-, got {tenant!r}")
            for key in _key_list(keys, tenant):
                ring.entries.append((_parse_key(key, tenant), Caller(tenant=tenant, admin=False)))
        for tenant in tenants:
            overrides = doc.get("quotas", {}).get(tenant, {})
            try:
                ring.quotas[tenant] = Quotas(**{**default_quotas.__dict__, **overrides})
            except TypeError as e:
                raise ConfigError(f"api keys file: quotas for {tenant!r}: {e}") from e
        if not ring.entries:
            raise ConfigError(f"api keys file {path} holds no keys")
        return ring

    def lookup(self, key: str) -> Caller | None:
        """Constant time in the key: every entry is compared, and with hmac.compare_digest."""
        digest = _digest(key)
        found = None
        for entry_digest, caller in self.entries:
            if hmac.compare_digest(digest, entry_digest) and found is None:
                found = caller
        return found


def _key_list(keys: object, who: str) -> list[str]:
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        raise ConfigError(f"api keys file: keys of {who!r} must be a list of non-empty strings")
    return keys


def _parse_key(key: str, who: str) -> bytes:
    if key.startswith("sha256:"):
        hexdigest = key.removeprefix("sha256:")
        if not re.fullmatch(r"[0-9a-fA-F]{64}", hexdigest):
            raise ConfigError(f"api keys file: a sha256 key of {who!r} must be 64 hex digits")
        return bytes.fromhex(hexdigest)
    return _digest(key)


def authenticate(ring: KeyRing, authorization: str | None) -> Caller:
    """The caller for an Authorization header; 401 if keys are configured and it is missing or wrong."""
    if ring.open:
        return OPEN
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized(
            f"missing API key: expected the header 'Authorization: Bearer <key>'{_got(authorization)}"
        )
    caller = ring.lookup(key.strip())
    if caller is None:
        raise Unauthorized("invalid API key")
    return caller


def _got(authorization: str | None) -> str:
    """What arrived instead of a bearer key: its scheme at most, never a key (a bare one included)."""
    if authorization is None:
        return ""
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return ", got no key after 'Bearer'"
    return f", got the scheme {shown(scheme)}" if key.strip() else ", got a value with no scheme"


async def get_caller(request: Request) -> Caller:
    """FastAPI dependency: who is calling (kept on the request: error replies name tasks as it does)."""
    caller = authenticate(request.app.state.server.keyring, request.headers.get("authorization"))
    request.state.caller = caller
    return caller
