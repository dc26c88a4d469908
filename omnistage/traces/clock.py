"""Clock offsets between the orchestrator and a stage host, from GetInfo round trips.

Each stage writes its traces on its own host's wall clock. To put every stage on one timeline
the orchestrator measures, per stage (per replica), how far that clock is from its own:

1. note its wall clock (``time.time_ns()``) just before a ``GetInfo`` call (``sent_ns``);
2. read the stage's ``server_time_unix_ns`` from the reply (``server_ns``);
3. note its wall clock again when the reply arrives (``received_ns``).

The server read its clock somewhere inside the round trip, so the offset (server minus
orchestrator) lies in ``[server_ns - received_ns, server_ns - sent_ns]``: the midpoint is the
estimate, half the round trip its error bound, whatever the split between the two directions
(Cristian's algorithm). Of several samples the one with the shortest round trip gives the
tightest bound, so :func:`estimate_offset` keeps only that one.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

logger = logging.getLogger(__name__)

_REPLICA_DIR_RE = re.compile(r"[^A-Za-z0-9._-]+")  # as the orchestrator names replica folders


@dataclass(frozen=True)
class ClockSample:
    """One GetInfo round trip: the orchestrator's wall clock around it, the server's inside."""

    sent_ns: int
    server_ns: int
    received_ns: int

    @property
    def rtt_ns(self) -> int:
        return self.received_ns - self.sent_ns


@dataclass(frozen=True)
class ClockEstimate:
    """A stage host's clock offset: ``server clock = orchestrator clock + offset_ns``.

    The true offset lies within ``offset_ns ± error_ns``.
    """

    offset_ns: int
    error_ns: int
    rtt_ns: int
    samples: int

    def to_orchestrator_ns(self, server_ns: int) -> int:
        """A time read on the stage host's clock, on the orchestrator's clock."""
        return server_ns - self.offset_ns


def estimate_offset(samples: Sequence[ClockSample]) -> ClockEstimate:
    """The offset from the sample with the shortest round trip (ties: the first one).

    ``offset = server_ns - (sent_ns + received_ns) / 2`` and ``error = rtt / 2``, rounded up
    to whole nanoseconds so that the bound still holds. Samples with a negative round trip
    (the orchestrator's clock stepped back during the call) are ignored.

    Raises:
        ValueError: no samples, or none with a round trip of zero or more.
    """
    if not samples:
        raise ValueError("no clock samples: call GetInfo at least once to estimate an offset")
    valid = [s for s in samples if s.rtt_ns >= 0]
    if not valid:
        raise ValueError(
            f"all {len(samples)} clock samples have a negative round trip "
            "(received_ns < sent_ns): the orchestrator's clock stepped back; sample again"
        )
    if len(valid) < len(samples):
        logger.warning(
            "ignored %d clock samples with a negative round trip", len(samples) - len(valid)
        )
    best = min(valid, key=lambda s: s.rtt_ns)
    rtt = best.rtt_ns
    # midpoint = sent + rtt / 2, computed without overflowing floats on unix nanoseconds
    offset = best.server_ns - best.sent_ns - rtt // 2
    error = (rtt + 1) // 2
    return ClockEstimate(offset_ns=offset, error_ns=error, rtt_ns=rtt, samples=len(samples))


def combine(start: ClockEstimate | None, stop: ClockEstimate | None) -> ClockEstimate:
    """One estimate from those taken when the session started and when it stopped.

    * Only one of them: that one.
    * Both, and they agree (``|a - b| <= error_a + error_b``, i.e. their intervals overlap):
      the mean offset, with error ``(error_a + error_b) / 2``. The traces span the whole
      session and a clock may drift (or be slewed by NTP) in between; the mean is the offset
      at the middle of the session, and while both intervals hold one common offset the mean
      is within that half-sum of it.
    * Both, and they disagree: the clock stepped during the session, and no single offset is
      right for all of it. The one with the smaller error is kept (ties: ``start``), as the
      more trustworthy measurement; a warning is logged.

    ``samples`` is the sum of both; ``rtt_ns`` is that of the tighter estimate.

    Raises:
        ValueError: both are None.
    """
    if start is None and stop is None:
        raise ValueError("no clock estimate: neither the session's start nor its stop had one")
    if start is None or stop is None:
        only = start if start is not None else stop
        assert only is not None
        return only
    better = start if start.error_ns <= stop.error_ns else stop
    samples = start.samples + stop.samples
    if abs(start.offset_ns - stop.offset_ns) <= start.error_ns + stop.error_ns:
        return ClockEstimate(
            offset_ns=(start.offset_ns + stop.offset_ns) // 2,
            # ceil, including the half nanosecond lost by flooring an odd sum
            error_ns=(start.error_ns + stop.error_ns + (start.offset_ns + stop.offset_ns) % 2 + 1)
            // 2,
            rtt_ns=better.rtt_ns,
            samples=samples,
        )
    logger.warning(
        "clock offsets at the session's start (%d ± %d ns) and stop (%d ± %d ns) disagree: "
        "the stage's clock stepped; keeping the tighter one",
        start.offset_ns,
        start.error_ns,
        stop.offset_ns,
        stop.error_ns,
    )
    return ClockEstimate(
        offset_ns=better.offset_ns,
        error_ns=better.error_ns,
        rtt_ns=better.rtt_ns,
        samples=samples,
    )


def replica_folder(address: str) -> str:
    """The folder the orchestrator keeps a replica's files in, named after its address."""
    return _REPLICA_DIR_RE.sub("_", address)


def resolve_clock(
    clocks: Mapping[str, ClockEstimate], stage: str, replica: str
) -> tuple[ClockEstimate | None, str]:
    """The estimate for a stage's replica, and its key: ``stage/replica`` (the replica given as
    its folder name or as the address the folder is named after), then ``stage``."""
    if replica:
        for key, estimate in clocks.items():
            name, sep, rest = key.partition("/")
            if sep and name == stage and (rest == replica or replica_folder(rest) == replica):
                return estimate, key
    if stage in clocks:
        return clocks[stage], stage
    return None, ""


def clock_from_mapping(data: Any) -> ClockEstimate:
    """A :class:`ClockEstimate` from its ``dataclasses.asdict`` form, as report.json holds
    it, checked against the dataclass (msgspec); `rtt_ns` and `samples` may be missing."""
    if not isinstance(data, Mapping):
        raise TypeError(f"a clock estimate is an object, not {type(data).__name__}")
    return msgspec.convert({"rtt_ns": 0, "samples": 1, **data}, ClockEstimate, strict=False)
