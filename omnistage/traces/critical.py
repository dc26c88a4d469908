"""The critical path of each request: what bounded its time to the final stage's first
output, and its end-to-end time.

It is built from the orchestrator's request spans alone
(:class:`~omnistage.traces.spans.RequestSpan`, on the orchestrator's wall clock), with the
stage's own times where the stage reported them, so it needs no trace: a timing-only session
has one too.

**The rule.** A request starts at its first stage's start, less that stage's hand-off. From a
target moment (the final stage's first output, or its end) the path walks back in time, each
segment ending where the one after it starts, until it reaches the request's start. The
segments therefore tile that interval exactly (in ns), and their durations sum to the time. A
segment is cut short where a later one already covers its end (stages or chunk calls that
overlap), so no moment counts twice.

* **A stage called once** waits for the previous stage's finished output. Its call, from its
  start to the target, is laid out as ``queued`` (the stage's own queue time), ``compute``
  (the stage's own time, less the queue) and ``transport`` (the orchestrator's view of the
  call less the stage's own time: the network, (de)serialising, a slow reader holding the
  stream back). The stage's own time is its time to first output when the target is its
  first output, else its time to its last output. Before the call comes ``handoff``, from the
  previous stage's end to this stage's start (the edge's processor building the input), and
  before that the previous stage, up to its end.
* **A streamed stage** (``input.stream_chunk``) is walked chunk call by chunk call: from the
  call that bounds the target (the first chunk for the first output, the last one for the
  end) back through the earlier ones, each split as above with its own times. Before a call
  comes ``handoff``, from the moment its input was cut (the processor, and the in-flight
  limit); and where the chunk was cut only after the previous chunk's call had ended,
  ``waiting_for_upstream`` back to that end: the stage had nothing to do until the previous
  stage produced its next chunk. Before the first chunk's cut comes ``waiting_for_upstream``
  from the previous stage's first output (it was generating the first chunk's tokens), and
  before that the previous stage, up to its first output.
* **Times a stage did not report** (0: a report.json from an older omnistage, or a stage that
  sent no metrics) leave its call ``compute``, but for its queue time, with no ``transport``.
  A streamed stage without chunk records is read as one call.

A request enters only when every stage, from the first to the session's last, recorded a span
for it. What bounded it is the (stage, kind) with the largest total on its path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from omnistage.traces.spans import ChunkSpan, RequestSpan
from omnistage.types import CriticalSegment, RequestCriticalPath

QUEUED = "queued"
COMPUTE = "compute"
WAITING = "waiting_for_upstream"
HANDOFF = "handoff"
TRANSPORT = "transport"
KINDS = (QUEUED, COMPUTE, WAITING, HANDOFF, TRANSPORT)
"""Every kind of segment, in the order the summary lists them."""


class _Walk:
    """Segments taken backwards in time from a target moment, each ending where the cursor is."""

    def __init__(self, target: int, origin: int) -> None:
        self.origin = origin
        self.cursor = max(target, origin)
        self._segments: list[CriticalSegment] = []

    def take(self, stage: str, kind: str, start: int) -> None:
        """The segment from `start` (no earlier than the origin) to the cursor, if any; the
        cursor moves to its start. It joins the previous one where stage and kind match."""
        start = max(start, self.origin)
        if start >= self.cursor:
            return
        last = self._segments[-1] if self._segments else None
        if last is not None and (last.stage, last.kind) == (stage, kind):
            self._segments[-1] = CriticalSegment(stage, kind, start, last.end_unix_ns)
        else:
            self._segments.append(CriticalSegment(stage, kind, start, self.cursor))
        self.cursor = start

    def segments(self) -> tuple[CriticalSegment, ...]:
        return tuple(reversed(self._segments))


def _ns(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


def _call(walk: _Walk, stage: str, start: int, end: int, own_s: float, queue_s: float) -> None:
    """One call to a stage, from its start to `end`: queued, compute, then transport."""
    walk.take(stage, TRANSPORT, end)  # after the call's output, until the cursor: passed on
    length = max(0, end - start)
    own = min(length, _ns(own_s)) if own_s > 0 else length
    queued = min(_ns(queue_s), own)
    walk.take(stage, TRANSPORT, start + own)
    walk.take(stage, COMPUTE, start + queued)
    walk.take(stage, QUEUED, start)


def _chunk_call(walk: _Walk, stage: str, chunk: ChunkSpan, *, first: bool) -> None:
    if first:
        end, own = chunk.first_output_unix_ns, chunk.stage_first_output_s
    else:
        end, own = chunk.end_unix_ns, chunk.stage_time_s
    _call(walk, stage, chunk.start_unix_ns, end, own, chunk.queue_time_s)


def _streamed(walk: _Walk, span: RequestSpan, *, first: bool) -> None:
    """A streamed stage's chunk calls, back from the one that bounds the target to the cut of
    the first one."""
    chunks = span.chunks
    last = len(chunks) - 1
    if first:  # the first chunk that was still running when the first output came
        last = next(
            (i for i, c in enumerate(chunks) if c.end_unix_ns >= span.first_output_unix_ns), 0
        )
    _chunk_call(walk, span.stage, chunks[last], first=first)
    for i in range(last, -1, -1):
        if i < last:
            _chunk_call(walk, span.stage, chunks[i], first=False)
        ready = chunks[i].ready_unix_ns
        if i == 0:
            walk.take(span.stage, HANDOFF, ready)
            return
        previous_end = chunks[i - 1].end_unix_ns
        if ready > previous_end:  # cut after the previous call ended: the stage had waited
            walk.take(span.stage, HANDOFF, ready)
            walk.take(span.stage, WAITING, previous_end)
        else:  # its input was there; the in-flight limit or the orchestrator held it
            walk.take(span.stage, HANDOFF, previous_end)


def _walk_back(walk: _Walk, chain: Sequence[RequestSpan], index: int, *, first: bool) -> None:
    """From stage `index`'s first output (or its end) back to the request's start."""
    while True:
        span = chain[index]
        if span.chunks:
            _streamed(walk, span, first=first)
            if index == 0:
                break
            walk.take(span.stage, WAITING, chain[index - 1].first_output_unix_ns)
            index, first = index - 1, True
            continue
        target = span.first_output_unix_ns if first else span.end_unix_ns
        own = span.stage_first_output_s if first else span.stage_time_s
        _call(walk, span.stage, span.start_unix_ns, target, own, span.queue_time_s)
        if index == 0:
            break
        walk.take(span.stage, HANDOFF, chain[index - 1].end_unix_ns)
        index, first = index - 1, False
    walk.take(chain[0].stage, HANDOFF, walk.origin)


def request_chains(spans: Iterable[RequestSpan]) -> tuple[dict[str, list[RequestSpan]], int]:
    """Each complete request's spans in stage order (every stage from the first to the
    session's last), and how many requests were left out as incomplete."""
    by_request: dict[str, dict[int, RequestSpan]] = {}
    for span in spans:
        stages = by_request.setdefault(span.request_id, {})
        kept = stages.get(span.stage_index)
        if kept is None or span.end_unix_ns >= kept.end_unix_ns:
            stages[span.stage_index] = span
    final = max((i for stages in by_request.values() for i in stages), default=-1)
    chains = {
        rid: [stages[i] for i in range(final + 1)]
        for rid, stages in by_request.items()
        if all(i in stages for i in range(final + 1))
    }
    return chains, len(by_request) - len(chains)


def critical_path(chain: Sequence[RequestSpan]) -> RequestCriticalPath:
    """One request's critical path, from its spans in stage order (see the module's rule)."""
    origin = chain[0].start_unix_ns - _ns(chain[0].handoff_s)
    final = chain[-1]
    first_at = max(final.first_output_unix_ns, origin)
    end_at = max(final.end_unix_ns, first_at)
    to_first = _Walk(first_at, origin)
    _walk_back(to_first, chain, len(chain) - 1, first=True)
    to_end = _Walk(end_at, origin)
    _walk_back(to_end, chain, len(chain) - 1, first=False)
    return RequestCriticalPath(
        request_id=final.request_id,
        start_unix_ns=origin,
        first_output_unix_ns=first_at,
        end_unix_ns=end_at,
        first_output=to_first.segments(),
        end_to_end=to_end.segments(),
    )


def critical_paths(spans: Iterable[RequestSpan]) -> tuple[RequestCriticalPath, ...]:
    """Every complete request's critical path, in the order the requests started."""
    chains, _ = request_chains(spans)
    paths = (critical_path(chain) for chain in chains.values())
    return tuple(sorted(paths, key=lambda p: (p.start_unix_ns, p.request_id)))


def totals(segments: Iterable[CriticalSegment], *, by: str = "both") -> dict[tuple[str, str], int]:
    """ns per (stage, kind); with ``by="stage"`` or ``by="kind"``, the other one is ""."""
    out: dict[tuple[str, str], int] = {}
    for seg in segments:
        key = (
            seg.stage if by in ("both", "stage") else "",
            seg.kind if by in ("both", "kind") else "",
        )
        out[key] = out.get(key, 0) + seg.end_unix_ns - seg.start_unix_ns
    return out


def bound_by(segments: Sequence[CriticalSegment]) -> tuple[str, str, float]:
    """The (stage, kind) with the largest total on a path, and its share of the path (0-1);
    ("", "", 0.0) for an empty path."""
    spent = totals(segments)
    whole = sum(spent.values())
    if not whole:
        return "", "", 0.0
    (stage, kind), most = max(spent.items(), key=lambda item: (item[1], item[0]))
    return stage, kind, most / whole


def shares(
    paths: Sequence[RequestCriticalPath], *, first: bool, by: str = "both"
) -> dict[tuple[str, str], list[float]]:
    """Per key of :func:`totals`: its share (0-1) of each request's time, one value per path
    that has any time (0 where the key took none)."""
    per_path = [totals(p.first_output if first else p.end_to_end, by=by) for p in paths]
    keys = sorted({k for spent in per_path for k in spent})
    out: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    for spent in per_path:
        whole = sum(spent.values())
        if whole:
            for key in keys:
                out[key].append(spent.get(key, 0) / whole)
    return out


def upstream_of(spans: Iterable[RequestSpan]) -> Mapping[str, str]:
    """Each stage's previous stage by stage index, for sentences about waiting."""
    names: dict[int, str] = {}
    for span in spans:
        names.setdefault(span.stage_index, span.stage)
    return {names[i]: names[i - 1] for i in names if i - 1 in names}
