"""Every stage's sampling, checked by that stage's own engine before the first stage runs.

A bad value for a later stage (a talker temperature past vLLM's bound) would otherwise be found
only when that stage is called: after the earlier stages ran and the client got their output.
So before a request's first stage is called, every stage is asked, concurrently, whether its
engine accepts the sampling the request will give it (`Stage.ValidateSampling`, which builds the
engine's own sampling parameters and runs nothing). The stage is the one authority on its
engine's limits: the orchestrator keeps no copy of vLLM's rules, which change with its version.

Verdicts are cached per (stage, sampling) in a small LRU for `VERDICT_TTL_S`, so requests that
repeat a sampling, as almost all do, make no call at all. When a stage cannot give a verdict (no
replica SERVING now, an older stage without the RPC, a slow answer), the request goes on and
that stage checks the values when it is called, as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

from omnistage.errors import InvalidRequestError, OmnistageError
from omnistage.types import SamplingOptions
from orchestrator.pool import SERVING, StagePool
from orchestrator.stage_call import name_stage

logger = logging.getLogger(__name__)

CACHE_SIZE = 1024  # (stage, sampling) verdicts kept
VERDICT_TTL_S = 300.0  # a stage restarted with other limits is asked again after this
CHECK_TIMEOUT_S = 5.0  # the most one check may take; past it, the stage checks when called

Verdict = str | None  # None: the stage accepts the sampling; else why it refuses it


class SamplingPreflight:
    """Asks stages whether they accept a sampling, and remembers their answers."""

    def __init__(self, pool: StagePool, *, cache_size: int = CACHE_SIZE) -> None:
        self._pool = pool
        self._size = cache_size
        self._verdicts: OrderedDict[tuple[str, SamplingOptions], tuple[float, Verdict]] = (
            OrderedDict()
        )

    async def check(
        self, stages: Sequence[tuple[str, SamplingOptions]], *, deadline: float | None = None
    ) -> None:
        """Raise `InvalidRequestError`, named after the first stage (in pipeline order) that
        refuses its sampling; return when none does, or none could say."""
        now = time.monotonic()
        verdicts: dict[str, Verdict] = {}
        unknown: list[tuple[str, SamplingOptions]] = []
        for stage, options in stages:
            cached = self._cached((stage, options), now)
            if cached is None:
                unknown.append((stage, options))
            else:
                verdicts[stage] = cached[1]
        if unknown:
            timeout = CHECK_TIMEOUT_S
            if deadline is not None:
                timeout = max(0.001, min(timeout, deadline - now))
            answers = await asyncio.gather(*(self._ask(s, o, timeout) for s, o in unknown))
            for (stage, options), answer in zip(unknown, answers, strict=True):
                if not isinstance(answer, _NoVerdict):
                    self._remember((stage, options), answer)
                    verdicts[stage] = answer
        for stage, _options in stages:
            refusal = verdicts.get(stage)
            if refusal is not None:
                raise name_stage(InvalidRequestError(refusal), stage)

    def _cached(self, key: tuple[str, SamplingOptions], now: float) -> tuple[float, Verdict] | None:
        entry = self._verdicts.get(key)
        if entry is None:
            return None
        if now - entry[0] > VERDICT_TTL_S:
            del self._verdicts[key]
            return None
        self._verdicts.move_to_end(key)
        return entry

    def _remember(self, key: tuple[str, SamplingOptions], verdict: Verdict) -> None:
        self._verdicts[key] = (time.monotonic(), verdict)
        self._verdicts.move_to_end(key)
        while len(self._verdicts) > self._size:
            self._verdicts.popitem(last=False)

    async def _ask(
        self, stage: str, options: SamplingOptions, timeout: float
    ) -> Verdict | _NoVerdict:
        """One SERVING replica's verdict (replicas of a stage run the same engine)."""
        serving = [r for r in self._pool.replicas(stage) if r.health == SERVING]
        if not serving:
            return _NO_VERDICT  # the stage's call will say why it cannot be reached
        try:
            await serving[0].client.validate_sampling(options, timeout=timeout)
        except InvalidRequestError as exc:
            return str(exc)
        except OmnistageError as exc:
            logger.debug("stage %s gave no sampling verdict (%s): %s", stage, exc.code, exc)
            return _NO_VERDICT
        return None


class _NoVerdict:
    """The stage could not say; nothing is cached."""


_NO_VERDICT = _NoVerdict()
