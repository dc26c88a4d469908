"""The Perfetto UI harness (tests/browser/perfetto_ui.py) itself, on small traces written here.

Each trace is opened once per module in a real headless chromium (the UI takes seconds to
boot), and every check reads that one run's rows. The checks cover what later browser tests
lean on: all four file kinds load, names with non-ASCII characters come back exactly, flows
bind to the right slices, args read under the expected keys, the displayed track order is
readable, and the error-stats query does catch a trace that Perfetto drops slices from.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.browser import perfetto_ui
from tests.browser.perfetto_ui import ERROR_STATS_SQL, OpenedTrace

REASON = perfetto_ui.available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

FIRST = "queued→first output"
SECOND = "talker · GPU 0"

QUERIES = {
    "error_stats": ERROR_STATS_SQL,
    "slices": "SELECT name, ts, dur FROM slice ORDER BY ts",
    "flows": """
        SELECT o.name AS out_name, i.name AS in_name
        FROM flow f JOIN slice o ON o.id = f.slice_out JOIN slice i ON i.id = f.slice_in
    """,
    "args": """
        SELECT s.name, a.key, a.display_value AS value
        FROM slice s JOIN args a USING (arg_set_id)
        WHERE a.key GLOB '*request_id'
    """,
}


def chrome_json_events() -> list[dict[str, Any]]:
    """Two processes, one slice each, a flow from the first slice to the second.

    The flow's start sits inside FIRST and its end (binding point "e": enclosing slice) inside
    SECOND. "beta" has more slices than "alpha" so that the track-order check sees the UI's
    rule (slice count first, then name), not pid order.
    """

    def event(ph: str, name: str, pid: int, ts: int, **extra: Any) -> dict[str, Any]:
        return {"ph": ph, "name": name, "pid": pid, "tid": pid, "ts": ts, **extra}

    return [
        event("M", "process_name", 1, 0, args={"name": "alpha"}),
        event("M", "process_name", 2, 0, args={"name": "beta"}),
        event("X", FIRST, 1, 0, dur=100, args={"request_id": "r1"}),
        event("X", SECOND, 2, 150, dur=100),
        event("X", "decode", 2, 300, dur=10),
        event("s", "handoff", 1, 50, id=7, cat="flow"),
        event("f", "handoff", 2, 200, id=7, cat="flow", bp="e"),
    ]


def write_json(path: Path, events: list[dict[str, Any]]) -> None:
    # UTF-8, never \\u escapes: the UI shows escapes in names literally.
    text = json.dumps({"traceEvents": events}, ensure_ascii=False)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")


def write_protobuf(path: Path) -> None:
    """The same shape as chrome_json_events, as TrackEvent packets with debug annotations."""
    from perfetto.protos.perfetto.trace import (  # type: ignore[import-untyped]
        perfetto_trace_pb2 as pb,
    )

    trace = pb.Trace()

    def packet(ts: int | None = None) -> Any:
        added = trace.packet.add()
        added.trusted_packet_sequence_id = 1
        if ts is not None:
            added.timestamp = ts
        return added

    packet().sequence_flags = pb.TracePacket.SEQ_INCREMENTAL_STATE_CLEARED
    for uuid, pid, name in ((10, 1, "alpha"), (20, 2, "beta")):
        process = packet().track_descriptor
        process.uuid = uuid
        process.process.pid = pid
        process.process.process_name = name
        thread = packet().track_descriptor
        thread.uuid = uuid + 1
        thread.parent_uuid = uuid
        thread.thread.pid = thread.thread.tid = pid
        thread.thread.thread_name = "main"

    def slice_(track: int, ts: int, dur: int, name: str, **fields: Any) -> None:
        begin = packet(ts).track_event
        begin.type = pb.TrackEvent.TYPE_SLICE_BEGIN
        begin.track_uuid = track
        begin.name = name
        begin.flow_ids.extend(fields.get("flow_ids", ()))
        begin.terminating_flow_ids.extend(fields.get("terminating_flow_ids", ()))
        for key, value in fields.get("annotations", {}).items():
            annotation = begin.debug_annotations.add()
            annotation.name = key
            annotation.string_value = value
        end = packet(ts + dur).track_event
        end.type = pb.TrackEvent.TYPE_SLICE_END
        end.track_uuid = track

    slice_(11, 0, 100_000, FIRST, flow_ids=[7], annotations={"request_id": "r1"})
    slice_(21, 150_000, 100_000, SECOND, terminating_flow_ids=[7])
    slice_(21, 300_000, 10_000, "decode")
    data = trace.SerializeToString()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def write_overlapping(path: Path) -> None:
    """Two complete events on one thread that overlap by 1 µs without nesting."""
    write_json(
        path,
        [
            {"ph": "X", "name": "first", "pid": 1, "tid": 1, "ts": 0, "dur": 100},
            {"ph": "X", "name": "second", "pid": 1, "tid": 1, "ts": 99, "dur": 100},
        ],
    )


GOOD: dict[str, Callable[[Path], None]] = {
    "trace.json": lambda p: write_json(p, chrome_json_events()),
    "trace.json.gz": lambda p: write_json(p, chrome_json_events()),
    "trace.pftrace": write_protobuf,
    "trace.pftrace.gz": write_protobuf,
}


@pytest.fixture(scope="module")
def opened(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], OpenedTrace]:
    """Opens each trace at most once per module, on first use."""
    folder = tmp_path_factory.mktemp("perfetto")
    writers = {**GOOD, "overlap.json": write_overlapping}
    cache: dict[str, OpenedTrace] = {}

    def get(name: str) -> OpenedTrace:
        if name not in cache:
            path = folder / name
            writers[name](path)
            cache[name] = perfetto_ui.open_trace(path, QUERIES, timeout_s=120)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(GOOD))
def test_trace_loads_with_names_flows_and_no_error_stats(
    opened: Callable[[str], OpenedTrace], name: str
) -> None:
    trace = opened(name)
    assert trace.load_ms > 0
    assert trace.results["error_stats"] == []
    assert [row["name"] for row in trace.results["slices"]] == [FIRST, SECOND, "decode"]
    assert trace.results["flows"] == [{"out_name": FIRST, "in_name": SECOND}]


@pytest.mark.parametrize(
    ("name", "key"),
    [("trace.json", "args.request_id"), ("trace.pftrace", "debug.request_id")],
)
def test_slice_args_read_under_their_format_prefix(
    opened: Callable[[str], OpenedTrace], name: str, key: str
) -> None:
    """JSON args land under ``args.``, protobuf debug annotations under ``debug.``."""
    assert opened(name).results["args"] == [{"name": FIRST, "key": key, "value": "r1"}]


@pytest.mark.parametrize("name", ["trace.json", "trace.pftrace"])
def test_track_order_is_slice_count_then_name(
    opened: Callable[[str], OpenedTrace], name: str
) -> None:
    """beta (pid 2, two slices) is drawn above alpha (pid 1, one slice): not pid order."""
    assert opened(name).track_order == ["beta 2", "alpha 1"]


def test_overlapping_complete_events_are_reported(opened: Callable[[str], OpenedTrace]) -> None:
    """The error-stats query can fail: Perfetto's drop of an overlapping slice shows in it."""
    trace = opened("overlap.json")
    names = {row["name"] for row in trace.results["error_stats"]}
    assert "slice_drop_overlapping_complete_event" in names
    assert [row["name"] for row in trace.results["slices"]] == ["first"]


def test_unreadable_trace_raises_with_the_ui_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"traceEvents": [{"ph": "X", oops', encoding="utf-8")
    with pytest.raises(perfetto_ui.PerfettoUIError, match="Failure parsing JSON"):
        perfetto_ui.open_trace(path, {}, timeout_s=120)
