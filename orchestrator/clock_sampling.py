"""Each stage replica's clock offset from the orchestrator's, from a few GetInfo round trips,
taken when a profile session starts and when it stops (omnistage.traces.clock)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from omnistage.errors import OmnistageError
from omnistage.traces.clock import ClockEstimate, ClockSample, estimate_offset
from orchestrator.pool import StageReplica

logger = logging.getLogger(__name__)

CLOCK_SAMPLES = 5


async def sample_clocks(
    replicas: list[StageReplica], key: Callable[[StageReplica], str]
) -> dict[str, ClockEstimate]:
    """Each replica's clock offset, under `key(replica)`; a replica that fails is skipped."""

    async def one(replica: StageReplica) -> tuple[str, ClockEstimate | None]:
        samples = []
        try:
            for _ in range(CLOCK_SAMPLES):
                sent = time.time_ns()
                info = await replica.client.info(timeout=5)
                samples.append(ClockSample(sent, info.server_time_unix_ns, time.time_ns()))
        except OmnistageError as exc:
            logger.warning("no clock sample from %s (%s): %s", replica.stage, replica.address, exc)
        estimate = estimate_offset(samples) if samples else None
        return key(replica), estimate

    pairs = await asyncio.gather(*(one(r) for r in replicas))
    return {name: estimate for name, estimate in pairs if estimate is not None}
