"""The orchestrator's record of its active profile session, checked against the stages.

A stage that restarted during a session (or whose session someone stopped on the stage itself)
no longer holds the session the orchestrator started there. `find_lost` asks each replica
which session it holds (GetInfo); one that answers with another session, or none, is recorded
as lost: GetPipeline no longer shows it profiling, and StopProfile reports it failed, naming
why, without calling StopProfile on it (which could stop somebody else's session).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from omnistage.errors import OmnistageError
from omnistage.profile_files import new_session_id
from omnistage.traces.clock import ClockEstimate
from omnistage.traces.spans import RequestSpan
from omnistage.types import ProfileOptions, StageProfileResult
from orchestrator.pool import StageReplica

logger = logging.getLogger(__name__)

INFO_TIMEOUT_S = 5.0


@dataclass
class ActiveSession:
    session_id: str
    label: str
    started_unix_ns: int
    # stage name -> replicas that are profiling, each with the stage's own session id
    stages: dict[str, list[tuple[StageReplica, str]]] = field(default_factory=dict)
    # clock key -> the offset estimated when the session started
    clock_start: dict[str, ClockEstimate] = field(default_factory=dict)
    spans: list[RequestSpan] = field(default_factory=list)
    timing_only: bool = False  # no stage's profiler started: nothing to stop or pull
    # (stage, replica address) -> why that replica no longer holds its stage session
    lost: dict[tuple[str, str], str] = field(default_factory=dict)

    def profiling_stages(self) -> list[str]:
        """The stages with a replica still profiling (as far as the last check knows)."""
        return [
            name
            for name, replicas in self.stages.items()
            if any((name, r.address) not in self.lost for r, _ in replicas)
        ]

    def split_lost(
        self, targets: list[tuple[StageReplica, str]]
    ) -> tuple[list[tuple[StageReplica, str]], list[StageProfileResult]]:
        """`targets` still holding their session, and a failed result for each lost one."""
        live, failed = [], []
        for replica, stage_session in targets:
            why = self.lost.get((replica.stage, replica.address))
            if why is None:
                live.append((replica, stage_session))
            else:
                failed.append(
                    StageProfileResult(
                        stage=replica.stage,
                        replica=replica.address,
                        ok=False,
                        error=why,
                        stage_session_id=stage_session,
                    )
                )
        return live, failed


def new_session(options: ProfileOptions) -> ActiveSession:
    return ActiveSession(
        new_session_id(options.label),
        options.label,
        time.time_ns(),
        timing_only=options.timing_only,
    )


async def find_lost(session: ActiveSession, targets: list[tuple[StageReplica, str]]) -> None:
    """Ask each target which session it holds; record in `session.lost` those that no longer
    hold theirs. A replica that does not answer is left as it was: nothing was learned."""
    if session.timing_only:  # no stage was asked to profile
        return

    async def check(replica: StageReplica, stage_session: str) -> None:
        try:
            info = await replica.client.info(timeout=INFO_TIMEOUT_S)
        except OmnistageError:
            return
        if info.profile_session_id == stage_session:
            return
        holds = f"session {info.profile_session_id}" if info.profile_session_id else "none"
        why = (
            f"stage {replica.stage!r} ({replica.address}) no longer holds its profile session "
            f"{stage_session} (it holds {holds}): it restarted, or the session was stopped on "
            "the stage itself; nothing was pulled from it"
        )
        logger.warning("profile session %s: %s", session.session_id, why)
        session.lost[(replica.stage, replica.address)] = why

    await asyncio.gather(
        *(
            check(replica, stage_session)
            for replica, stage_session in targets
            if (replica.stage, replica.address) not in session.lost
        )
    )
