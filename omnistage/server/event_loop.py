"""The event loop a server runs on: uvloop where it is installed (as `vllm serve` and uvicorn
do), else asyncio's own; `OMNISTAGE_EVENT_LOOP=asyncio` picks asyncio's even then.

uvloop's loop runs the gRPC server's callbacks and the HTTP front door's sockets in C; on a
loaded 2-core machine it cut a bare grpc.aio streaming call's round trip from about 1.9 to
1.6 ms (docs/performance.md has what it bought omnistage's hops).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

from omnistage.errors import InvalidRequestError

logger = logging.getLogger(__name__)

T = TypeVar("T")
LOOP_VARIABLE = "OMNISTAGE_EVENT_LOOP"
LOOPS = ("auto", "uvloop", "asyncio")


def loop_kind(environ: dict[str, str] | None = None) -> str:
    """ "uvloop" or "asyncio": what `run_server` will run on."""
    env = os.environ if environ is None else environ
    asked = env.get(LOOP_VARIABLE, "auto").strip().lower() or "auto"
    if asked not in LOOPS:
        raise InvalidRequestError(
            f"{LOOP_VARIABLE} must be one of {', '.join(LOOPS)} (got {asked!r})"
        )
    if asked == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if asked == "uvloop":
            raise InvalidRequestError(
                f"{LOOP_VARIABLE}=uvloop, but uvloop is not installed; pip install uvloop"
            ) from None
        return "asyncio"
    return "uvloop"


def run_server(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, on uvloop's loop when `loop_kind` says so."""
    kind = loop_kind()
    logger.debug("event loop: %s", kind)
    if kind == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
