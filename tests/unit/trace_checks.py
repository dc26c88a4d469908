"""Trace Event Format checks shared by the unit and integration tests of the merged timeline."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from omnistage.traces import ORCHESTRATOR_PID

EPS_US = 0.0015  # the timeline rounds ts and dur to the ns (0.001 µs)


def tef_problems(events: list[dict[str, Any]]) -> list[str]:
    """Every event has ``ph``, a numeric ``ts`` and an int ``pid``; every pid is named;
    every flow has its start and its end."""
    problems = []
    named = {e.get("pid") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    flows: dict[tuple[Any, Any], set[str]] = defaultdict(set)
    for ev in events:
        if not isinstance(ev.get("ph"), str):
            problems.append(f"no ph: {ev}")
        if not isinstance(ev.get("ts"), (int, float)) or isinstance(ev.get("ts"), bool):
            problems.append(f"no numeric ts: {ev}")
        if type(ev.get("pid")) is not int:
            problems.append(f"no int pid: {ev}")
        elif ev["pid"] not in named:
            problems.append(f"process {ev['pid']} has no name")
        if ev.get("ph") == "X" and not ev.get("dur", 0) >= 0:
            problems.append(f"negative dur: {ev}")
        if ev.get("ph") in ("s", "t", "f"):
            flows[(ev.get("cat"), ev.get("id"))].add(ev["ph"])
    problems += [f"flow {key} has only {sorted(p)}" for key, p in flows.items() if "s" not in p]
    problems += [f"flow {key} has only {sorted(p)}" for key, p in flows.items() if "f" not in p]
    return problems


def nesting_problems(events: Iterable[dict[str, Any]]) -> list[str]:
    """Complete events on one (pid, tid) must nest: each lies inside, or after, the others."""
    threads: dict[tuple[Any, Any], list[dict[str, Any]]] = defaultdict(list)
    for ev in events:
        if ev.get("ph") == "X":
            threads[(ev["pid"], ev.get("tid"))].append(ev)
    problems = []
    for key, slices in threads.items():
        slices.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[dict[str, Any]] = []
        for ev in slices:
            while stack and ev["ts"] >= stack[-1]["ts"] + stack[-1]["dur"] - EPS_US:
                stack.pop()
            if stack and ev["ts"] + ev["dur"] > stack[-1]["ts"] + stack[-1]["dur"] + EPS_US:
                problems.append(f"{key}: {ev['name']!r} overlaps {stack[-1]['name']!r}")
            stack.append(ev)
    return problems


def flow_problems(events: list[dict[str, Any]]) -> list[str]:
    """Each flow starts no later than it finishes; its start lies inside a slice of its
    thread (before that slice's end) and its end at or inside one."""
    slices: dict[tuple[Any, Any], list[dict[str, Any]]] = defaultdict(list)
    flows: dict[tuple[Any, Any], dict[str, dict[str, Any]]] = defaultdict(dict)
    for ev in events:
        if ev.get("ph") == "X":
            slices[(ev["pid"], ev.get("tid"))].append(ev)
        elif ev.get("ph") in ("s", "f"):
            flows[(ev.get("cat"), ev.get("id"))][ev["ph"]] = ev

    def inside(ev: dict[str, Any], *, before_end: bool) -> bool:
        for x in slices[(ev["pid"], ev.get("tid"))]:
            end = x["ts"] + x["dur"]
            if x["ts"] <= ev["ts"] and (ev["ts"] < end if before_end else ev["ts"] <= end):
                return True
        return False

    problems = []
    for key, ends in flows.items():
        start, finish = ends.get("s"), ends.get("f")
        if start is None or finish is None:
            problems.append(f"flow {key} is incomplete")
            continue
        if start["ts"] > finish["ts"]:
            problems.append(f"flow {key} starts at {start['ts']}, after its end {finish['ts']}")
        if not inside(start, before_end=True):
            problems.append(f"flow {key} starts outside every slice of its thread: {start}")
        if not inside(finish, before_end=False):
            problems.append(f"flow {key} ends outside every slice of its thread: {finish}")
    return problems


def request_spans(events: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (e["args"]["stage"], e["args"]["request_id"]): e
        for e in events
        if e["pid"] == ORCHESTRATOR_PID and e["ph"] == "X" and e["name"].startswith("stage ")
    }


def misplaced_ops(events: list[dict[str, Any]], slack_us: float) -> list[str]:
    """Each request's annotated work (and the ops inside it) must lie inside its stage span."""
    spans = request_spans(events)
    problems = []
    annotations = [e for e in events if e.get("cat") == "user_annotation" and ":" in e["name"]]
    assert len(annotations) == len(spans)
    for ann in annotations:
        stage, request_id = ann["name"].split(":")
        span = spans[(stage, request_id)]
        ops = [
            e
            for e in events
            if e.get("cat") == "cpu_op"
            and e["pid"] == ann["pid"]
            and ann["ts"] <= e["ts"] <= ann["ts"] + ann["dur"]
        ]
        assert ops, ann["name"]
        for ev in [ann, *ops]:
            if ev["ts"] < span["ts"] - slack_us or (
                ev["ts"] + ev["dur"] > span["ts"] + span["dur"] + slack_us
            ):
                problems.append(f"{ann['name']}: {ev['name']} at {ev['ts']} outside {span}")
    return problems
