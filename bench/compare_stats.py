"""The pure parts of the comparison: one request's record, a closed-loop level, and its summary."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from proc_cpu import ENGINE_ROLE, outside_engines
from stage_overhead import percentile

QUANTILES = (50, 90, 99)


@dataclass(frozen=True)
class RequestRecord:
    """One request through a two-stage chain, as its caller saw it (perf_counter seconds)."""

    sent: float
    first_final: float  # the first piece of the final stage that carried tokens; nan if none
    done: float
    tokens: tuple[int, ...]  # output tokens per stage

    @property
    def latency_s(self) -> float:
        return self.done - self.sent

    @property
    def first_final_s(self) -> float:
        return self.first_final - self.sent


async def closed_loop(
    one: Callable[[int], Awaitable[RequestRecord]], concurrency: int, requests: int, first: int = 0
) -> tuple[list[RequestRecord], float]:
    """`concurrency` callers, each sending its next request as soon as its last one finished,
    until `requests` have been sent. Returns the records (in completion order) and the window:
    from the first send to the last completion."""
    indices = iter(range(first, first + requests))
    records: list[RequestRecord] = []

    async def caller() -> None:
        for index in indices:  # shared: each index is taken by exactly one caller
            records.append(await one(index))

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(min(concurrency, requests))))
    return records, time.perf_counter() - started


def quantiles(values: list[float], prefix: str, scale: float = 1.0) -> dict[str, float]:
    return {f"{prefix}_p{q}": percentile([v * scale for v in values], q) for q in QUANTILES}


def summarize_level(
    concurrency: int,
    records: list[RequestRecord],
    window_s: float,
    cpu_by_role: Mapping[str, float],
) -> dict[str, Any]:
    """Throughput, latency quantiles and CPU outside the engines for one level."""
    count = len(records)
    tokens = sum(sum(r.tokens) for r in records)
    final_tokens = sum(r.tokens[-1] for r in records if r.tokens)
    outside = outside_engines(cpu_by_role)
    summary: dict[str, Any] = {
        "concurrency": concurrency,
        "requests": count,
        "window_s": window_s,
        "output_tokens": tokens,
        "final_stage_tokens": final_tokens,
        "tokens_per_stage": sorted({r.tokens for r in records}),
        "requests_per_s": count / window_s if window_s > 0 else math.nan,
        "output_tok_s": tokens / window_s if window_s > 0 else math.nan,
        **quantiles([r.latency_s for r in records], "latency_s"),
        **quantiles([r.first_final_s for r in records], "first_final_ms", 1000.0),
        "cpu_s_by_role": dict(sorted(cpu_by_role.items())),
        "cpu_s_outside_engines": outside,
        "cpu_s_engines": cpu_by_role.get(ENGINE_ROLE, 0.0),
        "cpu_ms_outside_engines_per_request": outside / count * 1000 if count else math.nan,
        "cpu_ms_outside_engines_per_token": outside / tokens * 1000 if tokens else math.nan,
    }
    return summary


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or not base or math.isnan(value) or math.isnan(base):
        return None
    return value / base


def ratios_to_baseline(
    levels: Mapping[str, Mapping[str, Mapping[str, Any]]], baseline: str
) -> dict[str, dict[str, dict[str, float | None]]]:
    """system -> level -> {metric: system / baseline} for the headline metrics."""
    metrics = ("output_tok_s", "requests_per_s", "latency_s_p50", "first_final_ms_p50")
    base = levels.get(baseline, {})
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for system, by_level in levels.items():
        out[system] = {}
        for level, summary in by_level.items():
            reference = base.get(level, {})
            out[system][level] = {m: ratio(summary.get(m), reference.get(m)) for m in metrics}
    return out
