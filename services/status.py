"""The one place where exceptions become gRPC statuses, for every RPC of the stage service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from omnistage.errors import RETRY_AFTER_KEY, OmnistageError, OverloadedError

logger = logging.getLogger(__name__)


def status_code(error: OmnistageError) -> grpc.StatusCode:
    """The error's class's code, or the code a remote peer answered with (`grpc_code`)."""
    remote = getattr(error, "grpc_code", None)
    if isinstance(remote, str) and remote in grpc.StatusCode.__members__:
        return grpc.StatusCode[remote]
    return grpc.StatusCode[error.code]


@contextlib.asynccontextmanager
async def grpc_errors(
    context: grpc.aio.ServicerContext,
    rpc: str,
    *,
    on_engine_dead: Callable[[], None] | None = None,
) -> AsyncIterator[None]:
    """Translate what an RPC body raises into `context.abort(code, message)`.

    omnistage errors keep their code and message; an unknown error becomes INTERNAL with a
    generic message, and its traceback is logged. Cancellation propagates untouched. An
    `OverloadedError` with a retry hint sends it as the trailing metadata `retry-after-ms`.
    """
    try:
        yield
    except asyncio.CancelledError:
        raise
    except grpc.aio.AbortError:
        raise
    except OmnistageError as exc:
        code = status_code(exc)
        if code is grpc.StatusCode.UNAVAILABLE and on_engine_dead is not None:
            on_engine_dead()
        if isinstance(exc, OverloadedError) and exc.retry_after_ms:
            hint = ((RETRY_AFTER_KEY, str(exc.retry_after_ms)),)
            await context.abort(code, str(exc), trailing_metadata=hint)
        await context.abort(code, str(exc))
    except Exception:
        logger.exception("%s failed", rpc)
        await context.abort(
            grpc.StatusCode.INTERNAL, f"{rpc} failed inside the stage; see the stage's log"
        )
