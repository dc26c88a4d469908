"""One exception root for omnistage, with a subclass per meaning.

Each subclass names its gRPC status code as a string, so engines and core logic can raise
these without importing grpc. `services.status` and the client map them to and from the wire.
"""

from __future__ import annotations

from typing import ClassVar


class OmnistageError(Exception):
    """The root of every error omnistage raises on purpose."""

    code: ClassVar[str] = "INTERNAL"


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

    def __init__(self, message: str = "", *, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.retry_after_ms = max(0, int(retry_after_ms))


class EngineDeadError(OmnistageError):
    """The engine has died; the stage reports NOT_SERVING."""

    code = "UNAVAILABLE"


class StageUnavailableError(OmnistageError):
    """A stage cannot be reached; the message names it."""

    code = "UNAVAILABLE"


class DeadlineError(OmnistageError):
    """An operation ran past its deadline."""

    code = "DEADLINE_EXCEEDED"


class CancelledError(OmnistageError):
    """The caller cancelled the operation."""

    code = "CANCELLED"


class UnauthenticatedError(OmnistageError):
    """A call that needs a token came without a valid one."""

    code = "UNAUTHENTICATED"


def reworded(error: OmnistageError, message: str) -> OmnistageError:
    """The same kind of error with a new message, `error` as its cause.

    It keeps the status code the far side answered with (`grpc_code`, which the client sets
    for any code, even one no error class stands for), so a caller that rewords a stage's
    error still passes that code on unchanged.
    """
    renamed = type(error)(message)
    if isinstance(error, OverloadedError) and isinstance(renamed, OverloadedError):
        renamed.retry_after_ms = error.retry_after_ms
    code = getattr(error, "grpc_code", None)
    if code is not None:
        renamed.grpc_code = code  # type: ignore[attr-defined]
    renamed.__cause__ = error
    return renamed
