"""Which parser and which compressor the trace package uses, measured side by side.

On one seeded, Kineto-shaped block of events (pretty-printed as torch writes them; ~50 MB of
JSON by default), in this one process, best of three runs each:

* parsing: ``json.loads`` (dicts), ijson's C backend (``items(..., 'item')``, streaming
  dicts), msgspec into :class:`omnistage.traces.events.Event` structs (what the package
  uses), msgspec with ``args`` left raw, and orjson when it is installed;
* encoding the events back to JSON: ``json.dumps`` of dicts, msgspec of the structs;
* gzip: zlib (Python's ``gzip``) and python-isal (ISA-L), decompressing and compressing
  (zlib at levels 1 and 6, isal at levels 1 and 2).

Every number is MB of JSON per second. The table is printed; results go to
``bench/results/trace_parsers.json``.

    .venv/bin/python bench/trace_parsers.py [--mb 50]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import random
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from bench_machine import align_table, machine_info
from isal import isal_zlib

from omnistage.traces.events import Event, RawEvent

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "trace_parsers.json"


def make_block(mb: float, seed: int = 7) -> bytes:
    """Kineto-shaped events as torch writes them (an indented object per event)."""
    rng = random.Random(seed)
    cats = ["cpu_op", "cpu_op", "python_function", "kernel", "cuda_runtime", "user_annotation"]
    names = ["aten::mm", "aten::addmm", "aten::copy_", "cudaLaunchKernel", "void gemm<128>()"]
    parts, size, ts, i = [], 0, 5_314_379_450_288.751, 0
    while size < mb * 1e6:
        ts += rng.random() * 3
        i += 1
        event = {
            "ph": "X",
            "cat": rng.choice(cats),
            "name": rng.choice(names),
            "pid": 24470,
            "tid": 24470,
            "ts": round(ts, 3),
            "dur": round(rng.random() * 10, 3),
            "args": {"External id": i, "Record function id": 0, "Ev Idx": i, "correlation": i},
        }
        text = json.dumps(event, indent=2)
        parts.append(text)
        size += len(text) + 2
    return ("[\n" + ",\n".join(parts) + "]").encode()


def best(fn: Callable[[], Any], runs: int = 3) -> tuple[float, Any]:
    seconds, result = float("inf"), None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        seconds = min(seconds, time.perf_counter() - start)
    return seconds, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50.0, help="MB of JSON to measure on")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    block = make_block(args.mb)
    mb = len(block) / 1e6
    rows: list[dict[str, Any]] = []

    def add(group: str, what: str, seconds: float) -> None:
        rows.append({"group": group, "what": what, "seconds": seconds, "mb_per_s": mb / seconds})
        print(f"  {group:<10} {what:<40} {mb / seconds:8.0f} MB/s", flush=True)

    count = block.count(b'"ph"')
    print(f"{mb:.1f} MB of JSON, {count:,} events")
    add("parse", "json.loads (dicts)", best(lambda: json.loads(block))[0])
    if importlib.util.find_spec("ijson") is not None:
        import ijson

        backend = ijson.get_backend("yajl2_c")
        add(
            "parse",
            "ijson yajl2_c, streamed (dicts)",
            best(lambda: list(backend.items(block, "item")), 1)[0],
        )
    typed = msgspec.json.Decoder(list[Event])
    seconds, events = best(lambda: typed.decode(block))
    add("parse", "msgspec → Event structs (used)", seconds)
    raw = msgspec.json.Decoder(list[RawEvent])
    add("parse", "msgspec → RawEvent structs, args raw (merge)", best(lambda: raw.decode(block))[0])
    if importlib.util.find_spec("orjson") is not None:
        import orjson

        add("parse", "orjson.loads (dicts)", best(lambda: orjson.loads(block))[0])
    dicts = json.loads(block)
    add("encode", "json.dumps (dicts)", best(lambda: json.dumps(dicts).encode())[0])
    add("encode", "msgspec (structs, used)", best(lambda: msgspec.json.encode(events))[0])
    packed = gzip.compress(block, 6)
    add("gunzip", "zlib (Python's gzip)", best(lambda: zlib.decompress(packed, 31))[0])
    add("gunzip", "isal (used)", best(lambda: isal_zlib.decompress(packed, 31))[0])
    for level in (1, 6):
        add(
            "gzip",
            f"zlib level {level}",
            best(lambda level=level: zlib.compress(block, level), 1)[0],
        )
    for level in (1, 2):
        add(
            "gzip",
            f"isal level {level}" + (" (used)" if level == 2 else ""),
            best(lambda level=level: isal_zlib.compress(block, level), 1)[0],
        )
    table = align_table(
        [
            ["step", "library", "MB/s"],
            *([r["group"], r["what"], f"{r['mb_per_s']:.0f}"] for r in rows),
        ]
    )
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"machine": machine_info(), "json_mb": mb, "rows": rows}, indent=2) + "\n"
    )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
