"""The orchestrator's Prometheus metrics (docs/observability.md), served on `--metrics-port`.

Recorded where the data already is: each pipeline Generate call by the servicer
(`RequestMeter`), each stage's share of it from the runner's `StageTiming` (the same
callback that feeds profile sessions), each profile stop when it has collected its files.
Read at scrape time: each replica's health, as the pool last saw it, and whether a profile
session is active.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from omnistage.server.metrics import LATENCY_BUCKETS, RequestMeter, gauge_from, new_registry
from omnistage.types import ProfileReport
from orchestrator.pool import SERVING, StagePool
from orchestrator.stage_call import StageEvent

STOP_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
"""Seconds a profile stop takes: a torch stage's in well under a second, vLLM's in minutes."""


class ReplicaHealth(Collector):
    """`omnistage_replica_up{stage,replica}`: 1 when the pool last saw the replica SERVING."""

    NAME = "omnistage_replica_up"

    def __init__(self, pool: StagePool) -> None:
        self._pool = pool

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            self.NAME,
            "1 when the replica's last health check answered SERVING, else 0",
            labels=["stage", "replica"],
        )

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for spec in self._pool.specs:
            for replica in self._pool.replicas(spec.name):
                up = 1.0 if replica.health == SERVING else 0.0
                family.add_metric([replica.stage, replica.address], up)
        yield family

    def describe(self) -> list[Metric]:
        return [self._family()]


class OrchestratorMetrics:
    """Every metric of the orchestrator, in a registry of its own."""

    def __init__(self, *, pool: StagePool, profiling: Callable[[], float]) -> None:
        self.registry: CollectorRegistry = new_registry()
        self.requests = RequestMeter(
            self.registry,
            total="omnistage_requests_total",
            latency="omnistage_request_latency_seconds",
            first_output="omnistage_request_time_to_first_output_seconds",
            in_flight="omnistage_requests_in_flight",
            what="pipeline Generate call",
        )
        self._stage = {
            key: Histogram(
                f"omnistage_stage_{key}_seconds",
                text,
                ["stage", "replica"],
                buckets=LATENCY_BUCKETS,
                registry=self.registry,
            )
            for key, text in (
                ("latency", "Seconds from a stage call's start to its last output"),
                ("time_to_first_output", "Seconds from a stage call's start to its first output"),
                ("queue", "Seconds the call waited in the stage's engine, as the stage reports"),
                ("handoff", "Seconds from the previous stage's output to this stage's call"),
            )
        }
        self._children: dict[tuple[str, str], tuple[Any, Any, Any, Any]] = {}
        self.registry.register(ReplicaHealth(pool))
        gauge_from(
            self.registry,
            "omnistage_profile_sessions_active",
            "1 while a cross-stage profile session is active, else 0",
            profiling,
        )
        self._stop = Histogram(
            "omnistage_profile_stop_seconds",
            "Seconds a StopProfile took: stages flushed, files pulled, timeline merged",
            buckets=STOP_BUCKETS,
            registry=self.registry,
        )
        self._pulled = Counter(
            "omnistage_profile_pulled_bytes",
            "Bytes of profile files pulled from the stages",
            registry=self.registry,
        )

    def stage_done(self, event: StageEvent) -> None:
        """A stage finished its part of a request (the runner's `on_stage_done`)."""
        timing = event.timing
        if timing is None:
            return
        key = (event.stage, event.replica)
        children = self._children.get(key)
        if children is None:
            latency, first, queue, handoff = (
                self._stage[name].labels(*key)
                for name in ("latency", "time_to_first_output", "queue", "handoff")
            )
            children = self._children.setdefault(key, (latency, first, queue, handoff))
        latency, first, queue, handoff = children
        latency.observe(timing.duration_s)
        first.observe(timing.time_to_first_output_s)
        queue.observe(timing.queue_time_s)
        handoff.observe(timing.handoff_s)

    def profile_stopped(self, seconds: float, report: ProfileReport) -> None:
        """A StopProfile that collected its session, after `seconds`."""
        self._stop.observe(seconds)
        self._pulled.inc(
            sum(f.size_bytes for stage in report.stages if stage.ok for f in stage.files)
        )
