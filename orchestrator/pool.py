"""Clients for every stage of a pipeline, one per address, with replicas taken in turn."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnistage.security import ClientSecurity, aio_channel
from omnistage.stage_client import AsyncStageClient
from orchestrator.config import PipelineConfig, StageSpec
from orchestrator.security import stage_client_security


@dataclass
class StageReplica:
    stage: str
    index: int
    address: str
    client: AsyncStageClient
    security: ClientSecurity | None = None


class StagePool:
    """Holds one client per stage address for the orchestrator's lifetime."""

    def __init__(self, pipeline: PipelineConfig) -> None:
        self._specs = list(pipeline.stages)
        self._replicas: dict[str, list[StageReplica]] = {}
        self._turns: dict[str, Iterator[int]] = {}
        for index, spec in enumerate(self._specs):
            security = stage_client_security(pipeline, index)
            replicas = [
                StageReplica(
                    spec.name,
                    index,
                    address,
                    AsyncStageClient(address, security=security),
                    security,
                )
                for address in spec.all_addresses
            ]
            self._replicas[spec.name] = replicas
            self._turns[spec.name] = itertools.cycle(range(len(replicas)))

    @property
    def specs(self) -> list[StageSpec]:
        return self._specs

    def replicas(self, stage: str) -> list[StageReplica]:
        return self._replicas[stage]

    def next_replica(self, stage: str) -> StageReplica:
        """The next replica of a stage, in turn."""
        return self._replicas[stage][next(self._turns[stage])]

    async def close(self) -> None:
        await asyncio.gather(*(r.client.close() for rs in self._replicas.values() for r in rs))


async def replica_health(
    address: str, *, timeout: float = 2.0, security: ClientSecurity | None = None
) -> str:
    """SERVING, NOT_SERVING, or the gRPC code name when the health check itself fails."""
    async with aio_channel(address, security) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            return str(code.name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
