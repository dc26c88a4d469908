"""Clients for every replica of every stage, the replicas' health, and which replica is next.

A stage's replicas are its `address`, its `addresses`, or every address that a `dns:///name:port`
address resolves to (a Kubernetes headless Service, a compose service with several containers).
A background task re-resolves those names and checks every replica's gRPC health every
`health_interval_s`; requests go round-robin to the replicas that answered SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass, replace

from omnistage.errors import StageUnavailableError
from omnistage.security import ClientSecurity
from omnistage.stage_client import AsyncStageClient
from orchestrator.addresses import DNS_SCHEME, join_host_port, split_host_port
from orchestrator.config import PipelineConfig, StageSpec
from orchestrator.security import stage_client_security

logger = logging.getLogger(__name__)

SERVING = "SERVING"
UNKNOWN = "UNKNOWN"
SLOW = "DEADLINE_EXCEEDED"  # a check that got no answer in time: the stage may just be busy
SLOW_CHECKS_TOLERATED = 3  # in a row, before a SERVING replica counts as down


@dataclass
class StageReplica:
    stage: str
    index: int
    address: str
    client: AsyncStageClient
    health: str = UNKNOWN
    security: ClientSecurity | None = None
    slow_checks: int = 0  # health checks in a row that got no answer in time


class StagePool:
    """Holds one client per stage replica for the orchestrator's lifetime."""

    def __init__(self, pipeline: PipelineConfig) -> None:
        self._specs = list(pipeline.stages)
        self._interval = pipeline.health_interval_s
        self._replicas: dict[str, dict[str, StageReplica]] = {s.name: {} for s in self._specs}
        self._resolve_errors: dict[str, str] = {}
        self._turns: dict[str, int] = dict.fromkeys(self._replicas, 0)
        self._retired: list[StageReplica] = []
        self._watcher: asyncio.Task[None] | None = None
        self._security = {
            spec.name: stage_client_security(pipeline, i) for i, spec in enumerate(self._specs)
        }
        for index, spec in enumerate(self._specs):
            if not _has_dns(spec):
                self._set_members(spec, index, [(a, "") for a in spec.all_addresses])

    @property
    def specs(self) -> list[StageSpec]:
        return self._specs

    def replicas(self, stage: str) -> list[StageReplica]:
        return list(self._replicas[stage].values())

    def has_replicas(self, stage: str) -> bool:
        """Whether the stage is configured for several replicas (its files go per replica)."""
        spec = next(s for s in self._specs if s.name == stage)
        return len(spec.all_addresses) > 1 or _has_dns(spec)

    async def start(self) -> None:
        """Resolve and check every stage once, then keep doing so in the background."""
        await self.refresh()
        self._watcher = asyncio.create_task(self._watch(), name="stage-pool-watch")

    async def refresh(self, stages: Iterable[str] | None = None) -> None:
        """Re-resolve the DNS addresses and check the health of every replica, now."""
        names = list(stages) if stages is not None else list(self._replicas)
        index = {spec.name: i for i, spec in enumerate(self._specs)}
        for name in names:
            spec = self._specs[index[name]]
            if _has_dns(spec):
                self._set_members(spec, index[name], await self._resolve(spec))
        replicas = [r for name in names for r in self._replicas[name].values()]
        healths = await asyncio.gather(*(self._check(r) for r in replicas))
        for replica, health in zip(replicas, healths, strict=True):
            self._record(replica, health)

    async def pick(self, stage: str, *, exclude: Iterable[str] = ()) -> StageReplica:
        """The next replica of a stage that is SERVING (or not yet checked), in turn.

        When none is, the stage is checked again at once, so a replica that just came back is
        used without waiting for the next background check.
        """
        skip = set(exclude)
        ready = self._ready(stage, skip)
        if not ready:
            await self.refresh([stage])
            ready = self._ready(stage, skip)
        if not ready:
            raise StageUnavailableError(self.describe_unready(stage))
        turn = self._turns[stage]
        self._turns[stage] = turn + 1
        return ready[turn % len(ready)]

    def _record(self, replica: StageReplica, health: str) -> None:
        """Take a check's answer. A SERVING replica whose check merely timed out stays
        SERVING for up to SLOW_CHECKS_TOLERATED checks in a row: a stage whose CPU is busy
        with its engine can be slow to answer while it serves fine, and calling it down
        would refuse or re-route requests it would have served. Any other answer (NOT_SERVING,
        a refused connection) counts at once."""
        if health == SLOW and replica.health == SERVING:
            replica.slow_checks += 1
            if replica.slow_checks < SLOW_CHECKS_TOLERATED:
                logger.debug(
                    "stage %s replica %s: health check %d in a row timed out; still SERVING",
                    replica.stage,
                    replica.address,
                    replica.slow_checks,
                )
                return
        else:
            replica.slow_checks = 0
        if health != replica.health:
            logger.info("stage %s replica %s: %s", replica.stage, replica.address, health)
        replica.health = health

    def mark(self, replica: StageReplica, health: str) -> None:
        """What a failed call taught about a replica, until the next check."""
        replica.health = health

    def describe_unready(self, stage: str) -> str:
        """Why no replica of a stage can take a request, replica by replica."""
        replicas = self._replicas[stage]
        if not replicas:
            why = self._resolve_errors.get(stage, "no address")
            return f"no replica to call: {why}"
        states = ", ".join(f"{r.address} {r.health}" for r in replicas.values())
        return f"no replica is SERVING ({states})"

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        everyone = [r for rs in self._replicas.values() for r in rs.values()] + self._retired
        await asyncio.gather(*(r.client.close() for r in everyone))

    def _ready(self, stage: str, skip: set[str]) -> list[StageReplica]:
        return [
            r
            for r in self._replicas[stage].values()
            if r.health in (SERVING, UNKNOWN) and r.address not in skip
        ]

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh()
            except Exception:  # the watch must outlive one bad round
                logger.exception("stage health check failed")

    async def _check(self, replica: StageReplica) -> str:
        return await replica.client.health(timeout=min(2.0, self._interval))

    async def _resolve(self, spec: StageSpec) -> list[tuple[str, str]]:
        """Every (address, the name it came from) of the stage; the name is "" when fixed."""
        addresses: list[tuple[str, str]] = []
        problems: list[str] = []
        loop = asyncio.get_running_loop()
        for source in spec.all_addresses:
            if not source.startswith(DNS_SCHEME):
                addresses.append((source, ""))
                continue
            host, port = split_host_port(source[len(DNS_SCHEME) :])
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                problems.append(f"{source} did not resolve ({exc})")
                continue
            found = [(join_host_port(str(info[4][0]), port), host) for info in infos]
            if not found:
                problems.append(f"{source} resolved to no address")
            addresses.extend(found)
        if problems:
            self._resolve_errors[spec.name] = "; ".join(problems)
            logger.warning("stage %s: %s", spec.name, self._resolve_errors[spec.name])
        else:
            self._resolve_errors.pop(spec.name, None)
        return list(dict.fromkeys(addresses))

    def _set_members(self, spec: StageSpec, index: int, members: list[tuple[str, str]]) -> None:
        current = self._replicas[spec.name]
        for address, name in members:
            if address not in current:
                security = self._security[spec.name]
                if security is not None and security.tls and name and not security.tls_server_name:
                    # A resolved IP is not what the certificate names: check the DNS name.
                    security = replace(security, tls_server_name=name)
                client = AsyncStageClient(address, security=security)
                current[address] = StageReplica(
                    spec.name, index, address, client, security=security
                )
                logger.info("stage %s: replica %s added", spec.name, address)
        addresses = {address for address, _ in members}
        for address in [a for a in current if a not in addresses]:
            logger.info("stage %s: replica %s gone from DNS", spec.name, address)
            self._retired.append(current.pop(address))


def _has_dns(spec: StageSpec) -> bool:
    return any(a.startswith(DNS_SCHEME) for a in spec.all_addresses)
