"""A stage's in-flight limit: at most `max_inflight` Generate calls at once; the next is
refused with RESOURCE_EXHAUSTED (`OverloadedError`) and a hint of when to retry.

The hint is the time one slot takes to free on average: the recent mean duration of a
request (an exponential moving average of the calls that finished) divided by the limit,
kept between `MIN_RETRY_MS` and `MAX_RETRY_MS`; `DEFAULT_RETRY_MS` before any call finished.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from omnistage.errors import OverloadedError

DEFAULT_RETRY_MS = 100
MIN_RETRY_MS = 10
MAX_RETRY_MS = 10_000
SMOOTHING = 0.2
"""Weight of the newest duration in the moving average."""


class InflightLimiter:
    """Counts the requests in flight on one stage and refuses those beyond the limit."""

    def __init__(self, stage: str, max_inflight: int) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be ≥ 1 (got {max_inflight})")
        self._stage = stage
        self.limit = max_inflight
        self.inflight = 0
        self._mean_s: float | None = None

    def retry_after_ms(self) -> int:
        """When a slot is likely to be free again, in milliseconds."""
        if self._mean_s is None:
            return DEFAULT_RETRY_MS
        estimate = round(self._mean_s * 1000 / self.limit)
        return min(MAX_RETRY_MS, max(MIN_RETRY_MS, estimate))

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one slot for the body; raise `OverloadedError` when none is free."""
        if self.inflight >= self.limit:
            retry = self.retry_after_ms()
            raise OverloadedError(
                f"stage {self._stage!r} is at its limit of {self.limit} requests in flight "
                f"(--max-inflight); retry after {retry} ms (trailing metadata "
                f"'retry-after-ms'), send it to another replica, or raise --max-inflight",
                retry_after_ms=retry,
            )
        self.inflight += 1
        started = time.monotonic()
        try:
            yield
        finally:
            self.inflight -= 1
            took = time.monotonic() - started
            mean = self._mean_s
            self._mean_s = took if mean is None else mean + SMOOTHING * (took - mean)
