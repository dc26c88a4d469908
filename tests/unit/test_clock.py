"""Clock offsets from GetInfo round trips (omnistage.traces.clock)."""

from __future__ import annotations

import random

import pytest

from omnistage.traces.clock import (
    ClockEstimate,
    ClockSample,
    combine,
    estimate_offset,
    resolve_clock,
)

NOW = 1_795_000_000_000_000_000  # a unix time in ns, as time.time_ns() gives


def _sample(offset: int, sent: int, to_server: int, from_server: int) -> ClockSample:
    """A round trip whose request takes `to_server` ns and whose reply takes `from_server` ns."""
    server_read = sent + to_server  # orchestrator time at which the server read its clock
    return ClockSample(sent, server_read + offset, server_read + from_server)


@pytest.mark.parametrize("seed", range(20))
def test_asymmetric_delays_stay_within_the_error_bound(seed: int) -> None:
    rng = random.Random(seed)
    offset = rng.randint(-5_000_000_000, 5_000_000_000)
    samples = [
        _sample(
            offset,
            NOW + i * 10_000_000,
            rng.randint(20_000, 2_000_000),  # requests: 20 µs to 2 ms
            rng.randint(20_000, 200_000),  # replies: faster, so the delays are lopsided
        )
        for i in range(8)
    ]
    est = estimate_offset(samples)
    best = min(samples, key=lambda s: s.received_ns - s.sent_ns)
    assert est.rtt_ns == best.received_ns - best.sent_ns
    assert est.error_ns == (est.rtt_ns + 1) // 2
    assert est.samples == 8
    assert abs(est.offset_ns - offset) <= est.error_ns


@pytest.mark.parametrize(
    ("to_server", "from_server"),
    [
        pytest.param(1_000_001, 0, id="all-on-the-way-there"),
        pytest.param(0, 1_000_001, id="all-on-the-way-back"),
    ],
)
def test_extreme_asymmetry_is_still_within_the_bound(to_server: int, from_server: int) -> None:
    # all the round trip on one side: the estimate is off by exactly half of it
    est = estimate_offset([_sample(-42, NOW, to_server, from_server)])
    assert abs(est.offset_ns + 42) <= est.error_ns == 500_001


def test_symmetric_delays_give_the_exact_offset() -> None:
    est = estimate_offset([_sample(3_700_000_000, NOW, 250_000, 250_000)])
    assert est == ClockEstimate(
        offset_ns=3_700_000_000, error_ns=250_000, rtt_ns=500_000, samples=1
    )
    assert est.to_orchestrator_ns(NOW + 3_700_000_000) == NOW


def test_the_shortest_round_trip_wins() -> None:
    slow = ClockSample(NOW, NOW + 10_000_000, NOW + 9_000_000)
    fast = ClockSample(NOW + 1, NOW + 501, NOW + 1_001)
    assert estimate_offset([slow, fast]).rtt_ns == 1_000
    assert estimate_offset([slow, fast]).offset_ns == 0


def test_no_usable_samples_is_an_error() -> None:
    with pytest.raises(ValueError, match="no clock samples"):
        estimate_offset([])
    backwards = ClockSample(NOW, NOW, NOW - 1)
    with pytest.raises(ValueError, match="negative round trip"):
        estimate_offset([backwards])
    good = ClockSample(NOW, NOW + 7, NOW + 2)
    assert estimate_offset([backwards, good]).offset_ns == 6


def test_combine_takes_what_there_is() -> None:
    a = ClockEstimate(100, 10, 20, 3)
    assert combine(a, None) == a
    assert combine(None, a) == a
    with pytest.raises(ValueError, match="no clock estimate"):
        combine(None, None)


def test_combine_averages_estimates_that_agree() -> None:
    start = ClockEstimate(offset_ns=1_000, error_ns=300, rtt_ns=600, samples=4)
    stop = ClockEstimate(offset_ns=1_400, error_ns=200, rtt_ns=400, samples=4)
    both = combine(start, stop)
    assert both == ClockEstimate(offset_ns=1_200, error_ns=250, rtt_ns=400, samples=8)
    # any offset both of them allow is within the combined bound
    for true in range(max(1_000 - 300, 1_400 - 200), min(1_000 + 300, 1_400 + 200) + 1):
        assert abs(both.offset_ns - true) <= both.error_ns


def test_combine_keeps_the_tighter_when_they_disagree() -> None:
    start = ClockEstimate(offset_ns=0, error_ns=100, rtt_ns=200, samples=2)
    stop = ClockEstimate(offset_ns=5_000, error_ns=50, rtt_ns=100, samples=3)
    assert combine(start, stop) == ClockEstimate(5_000, 50, 100, 5)
    assert combine(stop, start) == ClockEstimate(5_000, 50, 100, 5)


@pytest.mark.parametrize("seed", range(10))
def test_combined_bound_holds_for_odd_sums(seed: int) -> None:
    rng = random.Random(seed)
    true = rng.randint(-1000, 1000)
    a = ClockEstimate(true + rng.randint(-7, 7), 7, 14, 1)
    b = ClockEstimate(true + rng.randint(-9, 9), 9, 18, 1)
    both = combine(a, b)
    assert abs(both.offset_ns - true) <= both.error_ns


def test_resolve_clock_falls_back_from_replica_to_stage() -> None:
    replica = ClockEstimate(1, 0, 0, 1)
    stage = ClockEstimate(2, 0, 0, 1)
    clocks = {"talker/10.0.0.1:50062": replica, "talker": stage}
    assert resolve_clock(clocks, "talker", "10.0.0.1_50062") == (replica, "talker/10.0.0.1:50062")
    assert resolve_clock(clocks, "talker", "10.0.0.1:50062") == (replica, "talker/10.0.0.1:50062")
    assert resolve_clock(clocks, "talker", "10.0.0.2_50062") == (stage, "talker")
    assert resolve_clock(clocks, "talker", "") == (stage, "talker")
    assert resolve_clock(clocks, "thinker", "") == (None, "")
