"""summary.html opened offline in a real headless chromium (tests/browser/static_page.py):
it loads without console errors or any network request, draws one waterfall row per request,
with a streamed stage's chunk calls as marks in its bars, and holds the stage and op tables."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import pytest

from omnistage.traces.spans import ChunkSpan, RequestSpan
from omnistage.traces.summary import write_summary
from tests.browser import static_page
from tests.unit.trace_factory import copy_session, shared_session

REASON = static_page.available()
CHUNKS = 3
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def test_summary_html_opens_offline_with_a_row_per_request(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    session = copy_session(shared_session(tmp_path_factory), tmp_path / "session")
    spans = [streamed(s) if s.stage == "talker" else s for s in session.spans]
    session.write_report(spans=[asdict(s) for s in spans])
    write_summary(session.dir, report={"stages": []}, spans=spans, clocks={})
    opened = static_page.open_page(
        session.dir / "summary.html",
        count={
            "svg": "svg.waterfall",
            "rows": "svg.waterfall > g.request",
            "bars": "svg.waterfall g.request g.span",
            "chunks": "svg.waterfall g.span[data-stage='talker'] rect.chunk",
            "thinker_chunks": "svg.waterfall g.span[data-stage='thinker'] rect.chunk",
            "stage_rows": "table.stages tr",
            "op_tables": "table.ops",
        },
        attribute={"requests": ("svg.waterfall > g.request", "data-request")},
    )
    assert opened.errors == [], opened.console
    assert opened.requests == []
    requests = sorted({s.request_id for s in session.spans})
    assert opened.counts["svg"] == 1
    assert opened.counts["rows"] == len(requests) == 3
    assert sorted(r or "" for r in opened.attributes["requests"]) == requests
    assert opened.counts["bars"] == len(session.spans)
    assert opened.counts["chunks"] == 3 * CHUNKS and opened.counts["thinker_chunks"] == 0
    assert opened.counts["stage_rows"] == 1 + 2  # the header, thinker, talker
    assert opened.counts["op_tables"] == 2


def streamed(span: RequestSpan) -> RequestSpan:
    """The span as a streamed stage's: its time cut into CHUNKS chunk calls."""
    step = (span.end_unix_ns - span.start_unix_ns) // CHUNKS
    starts = [span.start_unix_ns + i * step for i in range(CHUNKS)]
    chunks = tuple(ChunkSpan(t, t, t + step // 4, t + step) for t in starts)
    return replace(span, chunks=chunks)
