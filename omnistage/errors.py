"""One exception root for omnistage, with a subclass per meaning.

Each subclass names its gRPC status code as a string, so engines and core logic can raise
these without importing grpc. `omnistage.server.errors` and the client map them to and from the
wire. An instance may carry a code of its own: the code a remote peer answered with, which no
class need stand for (`PERMISSION_DENIED`, `DATA_LOSS`), so that it passes on unchanged.
"""

from __future__ import annotations

STATUS_CODES = frozenset(
    {
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
        "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
        "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)  # fmt: skip


class OmnistageError(Exception):
    """The root of every error omnistage raises on purpose.

    `code` is the gRPC status code's name: the class's own, or the one given to the instance.
    """

    code: str = "INTERNAL"

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            if code not in STATUS_CODES:
                raise ValueError(f"{code!r} is not a gRPC status code's name")
            self.code = code


class InvalidRequestError(OmnistageError):
    """The request or a config value is wrong; the message says what to fix."""

    code = "INVALID_ARGUMENT"


class ProfilerStateError(OmnistageError):
    """A profile session is in the wrong state for this call, or profiling is off."""

    code = "FAILED_PRECONDITION"


class NotFoundError(OmnistageError):
    """An unknown profile session or file."""

    code = "NOT_FOUND"


RETRY_AFTER_KEY = "retry-after-ms"
"""Trailing metadata of a RESOURCE_EXHAUSTED answer: milliseconds to wait before retrying."""


class OverloadedError(OmnistageError):
    """The stage (or every replica of it) cannot take more work now.

    `retry_after_ms` is how long the caller should wait before trying again (0: no hint); it
    travels as the trailing metadata `retry-after-ms`.
    """

    code = "RESOURCE_EXHAUSTED"

    def __init__(
        self, message: str = "", *, retry_after_ms: int = 0, code: str | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after_ms = max(0, int(retry_after_ms))


class EngineDeadError(OmnistageError):
    """The engine has died; the stage reports NOT_SERVING."""

    code = "UNAVAILABLE"


class StageUnavailableError(OmnistageError):
    """A stage cannot be reached; the message names it."""

    code = "UNAVAILABLE"


class StageDrainingError(StageUnavailableError):
    """The stage got SIGTERM and is draining: it finishes what is in flight and serves its
    profile files for its grace period, but takes no new Generate or StartProfile."""


class DeadlineError(OmnistageError):
    """An operation ran past its deadline."""

    code = "DEADLINE_EXCEEDED"


class CancelledError(OmnistageError):
    """The caller cancelled the operation."""

    code = "CANCELLED"


class UnauthenticatedError(OmnistageError):
    """A call that needs a token came without a valid one."""

    code = "UNAUTHENTICATED"


class AlreadyExistsError(OmnistageError):
    """A request with this request_id is already in flight here; the caller must use a new id."""

    code = "ALREADY_EXISTS"


class AbortedError(OmnistageError):
    """A stage ended a request early (finish_reason abort) that its caller had not cancelled."""

    code = "ABORTED"


MAX_ECHO_CHARS = 200
"""Characters of a caller's value that an error message repeats; the rest is cut."""
MAX_MESSAGE_CHARS = 2000
"""Characters of an error message sent on the wire (gRPC status details, an HTTP error body).
gRPC sends the message as metadata, whose hard limit is 8 KiB; a longer one turns the answer
into RESOURCE_EXHAUSTED "received metadata size exceeds hard limit"."""


def echo(value: object) -> str:
    """A caller's value, quoted as `repr` does and cut to MAX_ECHO_CHARS, for an error message,
    so that a huge value (a 20,000-character dtype, role or name) gives a short message."""
    if isinstance(value, str):
        if len(value) <= MAX_ECHO_CHARS:
            return repr(value)
        return repr(value[:MAX_ECHO_CHARS]) + f"… ({len(value):,} characters)"
    text = repr(value)
    return text if len(text) <= MAX_ECHO_CHARS else text[:MAX_ECHO_CHARS] + "…"


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message`, cut to `limit` characters and then "…": the last safety net before the wire,
    for a message that repeats a value no `echo` clipped (a third party's message, say)."""
    if len(message) <= limit:
        return message
    return message[:limit] + f"… (cut from {len(message):,} characters)"


def reworded(error: OmnistageError, message: str) -> OmnistageError:
    """The same kind of error with a new message, `error` as its cause.

    It keeps the status code the far side answered with, even one no error class stands
    for, so a caller that rewords a stage's error still passes that code on unchanged.
    """
    renamed = type(error)(message, code=error.code)
    if isinstance(error, OverloadedError) and isinstance(renamed, OverloadedError):
        renamed.retry_after_ms = error.retry_after_ms
    renamed.__cause__ = error
    return renamed
