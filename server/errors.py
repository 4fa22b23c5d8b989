"""Domain errors. Each says what was expected and what arrived; `api/errors.py` maps them to HTTP."""

MAX_SHOWN_CHARS = 200  # an error message quotes at most this much of a client's value


def shown(value: object, limit: int = MAX_SHOWN_CHARS, *, quoted: bool = True) -> str:
    """A client's value as an error message quotes it: its repr (its str unless `quoted`), cut to
    `limit` characters with an ellipsis and the full length, so a 1 MB field makes a short message."""
    text = repr(value) if quoted else str(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} characters as text"
    return f"{text[:limit]}... ({size})"


class PrefixServerError(Exception):
    """Base class; `code` is the stable machine-readable name clients see, `param` the request field at
    fault where one is (OpenAI's error shape names it)."""

    code = "internal_error"

    def __init__(self, *args: object, param: str | None = None) -> None:
        super().__init__(*args)
        self.param = param


class InvalidRequest(PrefixServerError):
    """A request the client can fix (bad sampling values, prompt too long, ...)."""

    code = "invalid_request"


class ConfigError(PrefixServerError):
    """Bad server configuration (a flag, a PREFIX_SERVER_* variable, a Ray Serve argument): the operator's
    to fix at start-up, never a client's."""

    code = "invalid_config"


class PrefixFormatError(PrefixServerError):
    """A prefix file that cannot be read, or does not fit the base model."""

    code = "invalid_prefix"


class PrefixNotFound(PrefixServerError):
    code = "task_not_found"


class PayloadTooLarge(PrefixServerError):
    code = "payload_too_large"


class Overloaded(PrefixServerError):
    code = "overloaded"


class NotReady(PrefixServerError):
    code = "not_ready"


class UnsupportedModel(PrefixServerError):
    """A base model whose attention or cache cannot take a prefix."""

    code = "unsupported_model"


class RequestTimeout(PrefixServerError):
    code = "timeout"


class Unauthorized(PrefixServerError):
    code = "unauthorized"


class QuotaExceeded(PrefixServerError):
    """A tenant over one of its quotas; the message names the quota."""

    code = "quota_exceeded"


class ClientDisconnected(PrefixServerError):
    """The client left before its reply; nobody reads the answer (499 in the logs, as nginx says)."""

    code = "client_closed_request"


class InsufficientStorage(PrefixServerError):
    """The prefix store has no space left for an upload; nothing of it was stored."""

    code = "insufficient_storage"


class StoreReadOnly(PrefixServerError):
    """The prefix store refuses writes (read-only file system, permissions); reads still work."""

    code = "store_read_only"


class StoreUnavailable(PrefixServerError):
    """The prefix store cannot be reached (an S3 endpoint that is down); retry later."""

    code = "store_unavailable"


class TrainingDataError(PrefixServerError):
    """A training data file the user can fix: unreadable, not JSONL, missing fields, empty; the message
    names the line."""

    code = "invalid_training_data"


class JobNotFound(PrefixServerError):
    """A fine-tuning job that does not exist, or is another tenant's (the same answer: 404)."""

    code = "fine_tuning_job_not_found"


class FileNotFound(PrefixServerError):
    """A fine-tuning file that does not exist, or is another tenant's (the same answer: 404)."""

    code = "file_not_found"
