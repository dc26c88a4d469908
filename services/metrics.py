"""A stage's Prometheus metrics (docs/observability.md), served on `--metrics-port`.

Per Generate call: the calls by final code, latency, time to first output and the engine's
queue time. Read at scrape time: the calls being served and whether a profile is running. A
torch stage adds each engine step's batch size and duration; a vLLM stage re-exports vLLM's
own `vllm:*` metrics, which its `AsyncLLM` front end records in this process anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from omnistage.server.metrics import LATENCY_BUCKETS, RequestMeter, gauge_from, new_registry
from omnistage.types import OutputDelta

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
VLLM_PREFIX = "vllm:"


class VllmMetrics(Collector):
    """vLLM's `vllm:*` metric families from prometheus_client's global registry, where vLLM's
    PrometheusStatLogger puts them (it always runs: the stage keeps vLLM's log stats on)."""

    def collect(self) -> Iterator[Metric]:
        for family in REGISTRY.collect():
            if family.name.startswith(VLLM_PREFIX):
                yield family

    def describe(self) -> list[Metric]:
        return []  # vLLM registers its metrics once its engine starts: never checked ahead


class StageMetrics:
    """Every metric of one stage, in a registry of its own."""

    def __init__(
        self,
        *,
        stage: str,
        engine: str,
        running: Callable[[], float],
        profiling: Callable[[], float],
    ) -> None:
        self.registry: CollectorRegistry = new_registry()
        labels = {"stage": stage}
        self.requests = RequestMeter(
            self.registry,
            total="omnistage_stage_requests_total",
            latency="omnistage_stage_request_latency_seconds",
            first_output="omnistage_stage_request_time_to_first_output_seconds",
            in_flight=None,  # the limiter counts them already: read below at scrape time
            what="stage Generate call",
            labels=labels,
        )
        self._queue = Histogram(
            "omnistage_stage_request_queue_seconds",
            "Seconds a Generate call waited in the engine before its first step",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(stage)
        gauge_from(
            self.registry,
            "omnistage_stage_running_requests",
            "Generate calls the stage serves now, queued ones included (at most --max-inflight)",
            running,
            labels=labels,
        )
        gauge_from(
            self.registry,
            "omnistage_stage_profiling",
            "1 while a profile session is active on the stage, else 0",
            profiling,
            labels=labels,
        )
        self._batch = self._step = None
        if engine == "torch":
            self._batch = Histogram(
                "omnistage_stage_batch_size",
                "Requests batched into one torch engine step",
                ["stage"],
                buckets=BATCH_BUCKETS,
                registry=self.registry,
            ).labels(stage)
            self._step = Histogram(
                "omnistage_stage_step_seconds",
                "Seconds one torch engine step took (collate, forward, postprocess)",
                ["stage"],
                buckets=LATENCY_BUCKETS,
                registry=self.registry,
            ).labels(stage)
        if engine == "vllm":
            self.registry.register(VllmMetrics())

    def finished(self, delta: OutputDelta) -> None:
        """A call's last delta: its queue time, as the engine measured it."""
        if delta.metrics is not None:
            self._queue.observe(delta.metrics.queue_time_s)

    def step(self, batch_size: int, seconds: float) -> None:
        """One torch engine step (called on the event loop, after the step)."""
        if self._batch is not None and self._step is not None:
            self._batch.observe(batch_size)
            self._step.observe(seconds)
