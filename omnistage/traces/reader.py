"""Reading a trace as a stream of typed event chunks, never as one whole object.

:class:`TraceReader` decompresses a trace (plain or gzipped, told by its content) with
python-isal's igzip (the same gzip format, several times zlib's speed) and hands out its
``traceEvents`` in chunks of about ``chunk_bytes`` of JSON, each decoded by msgspec into
:class:`~omnistage.traces.events.Event` structs. Only one chunk is in memory at a time, so a
trace of any size reads in bounded memory.

How a chunk is cut: the JSON text after ``"traceEvents": [`` is cut at the last ``},``
before the chunk's end, and ``[`` + text + ``]`` is decoded. A cut that falls inside a
string or a nested value cannot decode as a list of whole objects, so the next ``},``
further back is tried: a chunk that decodes is exactly a run of whole events. Events that
do not fit :class:`Event` (a ``ts`` that is a string …) are dropped one by one and counted,
the rest of their chunk is kept.

The top-level keys before ``traceEvents`` are in :attr:`TraceReader.header` as soon as the
reader is open (Kineto writes ``baseTimeNanoseconds`` there); those after it are added once
the events have been read.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import msgspec
from isal import igzip

from omnistage.traces.events import Event, RawEvent, TraceError, describe

logger = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20
_HEADER_LIMIT = 64 << 20
_KEY_RE = re.compile(rb'"traceEvents"\s*:\s*\[')
_DECODER = msgspec.json.Decoder(list[Event])
_RAW_DECODER = msgspec.json.Decoder(list[RawEvent])
_ANY = msgspec.json.Decoder()
_CUT_TRIES = 64
_gzip_open: Callable[..., IO[bytes]] = igzip.open  # isal ships no type hints


class TraceReader:
    """One trace file, read once, chunk by chunk (see the module's docstring).

    Raises :class:`TraceError` (naming the file) when the file is empty, not JSON, not a
    trace, or a truncated gzip; :class:`OSError` when it cannot be opened.
    """

    def __init__(
        self,
        path: Path,
        *,
        chunk_bytes: int = CHUNK_BYTES,
        name: str = "",
        raw_args: bool = False,
    ) -> None:
        self.path = Path(path)
        self._decoder = _RAW_DECODER if raw_args else _DECODER
        """With ``raw_args``, chunks hold :class:`RawEvent` s (``args`` left as JSON text),
        except that a chunk with odd events is decoded as :class:`Event` s."""
        self.name = name or str(path)
        self.chunk_bytes = chunk_bytes
        self.header: dict[str, Any] = {}
        self.events_read = 0
        self.bad_events = 0
        self.bad_utf8 = False
        self.json_bytes = 0
        with self.path.open("rb") as raw:
            self.gzipped = raw.read(2) == b"\x1f\x8b"
        self._fh: IO[bytes] = _gzip_open(self.path, "rb") if self.gzipped else self.path.open("rb")
        self._buf = b""
        self._eof = False
        self._array_only = False
        try:
            self._read_header()
        except BaseException:
            self._fh.close()
            raise

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._fh.close()

    @property
    def base_ns(self) -> int | None:
        base = self.header.get("baseTimeNanoseconds")
        return base if type(base) is int else None

    def chunks(self) -> Iterator[list[Any]]:
        """The events, a chunk at a time, in file order."""
        while True:
            self._fill()
            if self._eof:
                tail = self._finish()
                if tail:
                    yield tail
                return
            cut = self._buf.rfind(b",", 0, len(self._buf))
            events, used = self._decode_before(cut)
            if used:
                self._buf = self._buf[used:].lstrip().removeprefix(b",")
                if events:
                    yield events

    # -- internals ------------------------------------------------------------------------

    def _read(self, size: int) -> bytes:
        try:
            block = self._fh.read(size)
        except (EOFError, OSError, zlib.error) as exc:
            if isinstance(exc, EOFError) or self.gzipped:
                raise TraceError(
                    f"{self.name}: truncated or damaged gzip after {self.json_bytes / 1e6:.1f} MB "
                    f"of JSON ({exc}); fetch the file again"
                ) from exc
            raise
        self.json_bytes += len(block)
        return block

    def _fill(self) -> None:
        while not self._eof and len(self._buf) < self.chunk_bytes:
            block = self._read(self.chunk_bytes)
            if not block:
                self._eof = True
            self._buf += block

    def _read_header(self) -> None:
        while True:
            block = self._read(1 << 16)
            self._buf += block
            start = self._buf.lstrip()[:1]
            if not start and not block:
                raise TraceError(f"{self.name}: the file is empty: no JSON, no events")
            if start == b"[":  # the JSON Array Format: a bare list of events
                self._buf = self._buf.lstrip()[1:]
                self._array_only = True
                return
            if start and start != b"{":
                raise TraceError(
                    f"{self.name} is not a Chrome trace: it does not start with a JSON object "
                    f"or list (first bytes {self._buf.lstrip()[:16]!r})"
                )
            found = _KEY_RE.search(self._buf)
            if found:
                head = self._buf[: found.start()].rstrip().removesuffix(b",") + b"}"
                try:
                    header = _ANY.decode(head)
                except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                    raise TraceError(
                        f"{self.name}: its top-level keys are not JSON: {exc}"
                    ) from exc
                self.header = header if isinstance(header, dict) else {}
                self._buf = self._buf[found.end() :]
                return
            if not block or len(self._buf) > _HEADER_LIMIT:
                self._whole_without_key()
                return

    def _whole_without_key(self) -> None:
        """No ``traceEvents`` key in the first bytes: decode the rest whole to say why."""
        while block := self._read(1 << 24):
            self._buf += block
        try:
            data = _ANY.decode(self._buf)
        except msgspec.DecodeError as exc:
            raise TraceError(f"{self.name} is not a Chrome trace: not valid JSON: {exc}") from exc
        if isinstance(data, dict) and isinstance(data.get("traceEvents"), list):
            raise TraceError(f"{self.name}: its traceEvents list comes after 64 MB of other keys")
        raise TraceError(
            f"{self.name} is not a Chrome trace: expected a JSON object with a 'traceEvents' "
            f"list or a JSON list of events, got {describe(data)}"
        )

    def _decode_before(self, cut: int) -> tuple[list[Any], int]:
        """Events of the longest decodable run of whole events before ``cut``, and its length."""
        buf = self._buf
        for _ in range(_CUT_TRIES):
            while cut > 0 and not _after_object(buf, cut):
                cut = buf.rfind(b",", 0, cut)
            if cut <= 0:
                break
            events = self._decode(buf[:cut])
            if events is not None:
                return events, cut
            cut = buf.rfind(b",", 0, cut)
        if len(buf) > 16 * self.chunk_bytes or self._eof:
            raise TraceError(
                f"{self.name}: not valid JSON near byte {self.json_bytes - len(buf):,} of its "
                "traceEvents: no whole event could be read there"
            )
        self.chunk_bytes *= 2  # one event longer than a chunk: read more
        return [], 0

    def _decode(self, text: bytes) -> list[Any] | None:
        body = b"[" + text + b"]"
        try:
            events = self._decoder.decode(body)
        except msgspec.ValidationError:
            return self._decode_loose(body)
        except msgspec.DecodeError as exc:
            if "utf-8" in str(exc).lower():
                return self._decode_loose(body)
            return None
        self.events_read += len(events)
        return events

    def _decode_loose(self, body: bytes) -> list[Event] | None:
        """A chunk with odd events: keep those that fit :class:`Event`, count the others."""
        try:
            items = _ANY.decode(body)
        except msgspec.DecodeError as exc:
            if "utf-8" not in str(exc).lower():
                return None
            self._warn_utf8()
            items = _ANY.decode(body.decode("utf-8", errors="replace").encode())
        if not isinstance(items, list):
            return None
        events = to_events(items)
        self.bad_events += len(items) - len(events)
        self.events_read += len(events)
        return events

    def _warn_utf8(self) -> None:
        if not self.bad_utf8:
            self.bad_utf8 = True
            logger.warning(
                "%s has bytes that are not UTF-8; they were replaced with U+FFFD", self.name
            )

    def _finish(self) -> list[Any]:
        """The last events and the keys after ``traceEvents`` (the buffer holds all the rest)."""
        buf = self._buf.rstrip()
        if not buf:
            raise TraceError(f"{self.name}: it ends inside its traceEvents list: truncated?")
        close = len(buf)
        for _ in range(_CUT_TRIES):
            close = buf.rfind(b"]", 0, close)
            if close < 0:
                break
            trailer = buf[close + 1 :].strip()
            if self._array_only and trailer:
                continue
            if not self._array_only:
                if not trailer.endswith(b"}"):
                    continue
                rest = trailer[:-1].strip().removeprefix(b",")
                try:
                    extra = _ANY.decode(b"{" + rest + b"}")
                except msgspec.DecodeError:
                    continue
                if not isinstance(extra, dict):
                    continue
            body = buf[:close].rstrip()
            events = self._decode(body) if body else []
            if events is None:
                continue
            if not self._array_only:
                self.header.update(extra)
            return events
        raise TraceError(
            f"{self.name}: it ends inside its traceEvents list, or is not valid JSON there: "
            "truncated?"
        )


def _after_object(buf: bytes, cut: int) -> bool:
    """Whether the comma at ``cut`` follows a ``}`` (whitespace between), looking back only a
    little: copying the whole buffer up to each comma tried would cost a chunk per comma."""
    return buf[max(0, cut - 256) : cut].rstrip()[-1:] == b"}"


def to_events(items: Iterable[Any]) -> list[Event]:
    """JSON data (dicts) as events; items that are not trace events are left out."""
    events = []
    for item in items:
        try:
            events.append(msgspec.convert(item, Event))
        except msgspec.ValidationError:
            continue
    return events


def read_events(path: Path, **kwargs: Any) -> tuple[dict[str, Any], list[Event]]:
    """The whole trace at once: its top-level keys and its events. For small traces only."""
    with TraceReader(path, **kwargs) as reader:
        events = [ev for chunk in reader.chunks() for ev in chunk]
        return reader.header, events


def load_trace(path: Path) -> dict[str, Any]:
    """A small trace as plain JSON data (``{"traceEvents": [...], ...}``), for tests and tools.

    The trace package itself never does this: it reads traces as chunks (:class:`TraceReader`).
    """
    header, events = read_events(path)
    return {**header, "traceEvents": msgspec.to_builtins(events)}
