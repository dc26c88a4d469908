"""`omnistage profile ...`: start, stop (with live progress, and a download), fetch, list,
delete, report and diff profile sessions."""

from __future__ import annotations

import argparse
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omnistage import cli_security
from omnistage.errors import InvalidRequestError
from omnistage.types import ProfileReport, ProfileSlimming, SessionSummary, StopProgress


def _stages(text: str) -> list[str] | None:
    return [s for s in text.split(",") if s] if text else None


def _client(args: argparse.Namespace) -> Any:
    from omnistage.client import Client

    return Client(args.address, security=cli_security.client_security(args))


def _profile_start(args: argparse.Namespace) -> int:
    stages = _stages(args.stages)
    with _client(args) as client:
        session = client.start_profile(
            stages,
            label=args.label,
            delay_iterations=args.delay_iterations,
            max_iterations=args.max_iterations,
            timing_only=args.timing_only,
        )
    what = "timing-only session" if args.timing_only else "profile session"
    print(f"{what} {session} started on {', '.join(stages) if stages else 'all stages'}")
    return 0


class _ProgressPrinter:
    """Prints each step of a streamed stop as it comes, one line per step."""

    def __init__(self) -> None:
        self._started = time.monotonic()

    def __call__(self, event: StopProgress) -> None:
        if event.phase == "done":
            return
        print(f"  [{time.monotonic() - self._started:6.1f} s] {event.message}", flush=True)


class _FileBars:
    """One tqdm progress bar per file being downloaded, on stderr."""

    def __init__(self) -> None:
        self._bars: dict[str, Any] = {}

    def __call__(self, progress: Any) -> None:
        from tqdm import tqdm

        bar = self._bars.get(progress.name)
        if bar is None:
            bar = tqdm(
                total=progress.total,
                initial=progress.resumed_from,
                unit="B",
                unit_scale=True,
                desc=progress.name,
                leave=True,
                file=sys.stderr,
                disable=progress.skipped,
            )
            self._bars[progress.name] = bar
        bar.update(progress.done - bar.n)
        if progress.finished:
            bar.close()
            if progress.skipped:
                print(f"  {progress.name}: already here, sha256 matches", file=sys.stderr)


def _profile_stop(args: argparse.Namespace) -> int:
    print("stopping (each stage flushes its trace; this can take a minute)...", flush=True)
    with _client(args) as client:
        report = client.stop_profile(
            args.output_dir,
            stages=_stages(args.stages),
            slim=args.slim,
            slim_min_duration_us=args.slim_min_us,
            slim_patterns=args.slim_pattern,
            progress=_ProgressPrinter(),
            download_to=args.download or None,
            file_progress=_FileBars() if args.download else None,
        )
    _print_report(report)
    return 0 if not report.failed else 1


def _print_report(report: ProfileReport) -> None:
    print(f"session {report.session_id}: {report.output_dir} (on the orchestrator)")
    if report.timeline:
        print(f"  timeline (chrome://tracing, HTA, scripts): {report.timeline}")
        for path in report.timelines[1:]:
            print(f"  timeline (Perfetto UI, faster to open): {path}")
        print(f"  summary: {report.summary}")
        if report.summary_html:
            print(f"  summary, as one offline page: {report.summary_html}")
        for warning in report.warnings:
            print(f"  warning: {warning}")
    elif report.summary:
        print(f"  {report.summary}")
    _print_slimming(report.slimming, indent="  ")
    for stage in report.stages:
        if stage.ok:
            size = sum(f.size_bytes for f in stage.files)
            print(
                f"  {stage.stage:<12} ok    {len(stage.files)} files, {size:,} bytes "
                f"in {stage.local_dir}"
            )
        else:
            print(f"  {stage.stage:<12} FAIL  {stage.error}")
    if report.downloaded_to:
        size = sum(f.size_bytes for f in report.session_files)
        print(
            f"downloaded {len(report.session_files)} files, {size:,} bytes, sha256 checked, "
            f"to {report.downloaded_to}"
        )


def _print_slimming(slimming: ProfileSlimming | None, *, indent: str = "") -> None:
    if slimming is None:
        return
    print(f"{indent}slimming: {slimming.describe()}")
    if slimming.bytes_saved <= 0:
        print(
            f"{indent}  nothing saved: idle loops are dropped by their Python frames, which "
            "traces only hold when stages profile with torch_profiler_with_stack: true"
        )


def _profile_fetch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        folder = client.fetch_session(args.session, args.to, progress=_FileBars())
    print(f"session {args.session}: every file downloaded, sha256 checked, to {folder}")
    return 0


def _when(unix_ns: int) -> str:
    return datetime.fromtimestamp(unix_ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _describe(session: SessionSummary) -> str:
    return (
        f"  {session.session_id:<44} {_when(session.modified_unix_ns)}  "
        f"{len(session.files):>4} files {session.total_bytes / 1e6:>10.1f} MB  {session.path}"
    )


def _profile_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        listing = client.sessions()
    kept = [
        f"{listing.max_sessions} sessions" if listing.max_sessions else "",
        f"{listing.max_total_bytes / 1e9:.1f} GB" if listing.max_total_bytes else "",
    ]
    limits = " and ".join(k for k in kept if k)
    limits = f"keeping at most {limits}" if limits else "no retention limit"
    print(f"{len(listing.sessions)} sessions under {listing.profile_root} ({limits})")
    for session in listing.sessions:
        print(_describe(session))
    return 0


def _profile_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        freed = client.delete_session(args.session)
    print(f"deleted session {args.session} on the orchestrator: {freed:,} bytes freed")
    return 0


def _profile_report(args: argparse.Namespace) -> int:
    from omnistage.traces.report import rebuild_report
    from omnistage.traces.slimming import VLLM_IDLE_PATTERNS, SlimOptions

    slim = None
    if args.slim or args.slim_min_us or args.slim_pattern:
        patterns = tuple(args.slim_pattern) or VLLM_IDLE_PATTERNS
        try:
            slim = SlimOptions(min_duration_us=args.slim_min_us, drop_patterns=patterns)
        except ValueError as exc:
            raise InvalidRequestError(f"--slim-min-us: {exc}") from exc
    folder = Path(args.dir)
    if not (folder / "report.json").is_file():
        raise InvalidRequestError(
            f"{folder} has no report.json: pass a session folder that StopProfile wrote, "
            "<output_dir>/<session_id>"
        )
    try:
        files = rebuild_report(
            folder, slim=slim, progress=lambda line: print(f"  {line}", flush=True)
        )
    except (OSError, ValueError) as exc:  # report.json itself unreadable; bad traces warn
        raise InvalidRequestError(f"cannot rebuild the report of {folder}: {exc}") from exc
    for path in files.timelines or (files.timeline,):
        print(f"timeline: {path}")
    print(f"summary:  {files.summary}")
    print(f"summary:  {files.summary_html} (one offline page, with a request waterfall)")
    for warning in files.warnings:
        print(f"warning:  {warning}")
    _print_slimming(files.slimming())
    return 0


def _profile_diff(args: argparse.Namespace) -> int:
    import json

    from omnistage.traces.diff import diff_sessions, format_diff

    if args.top < 0:
        raise InvalidRequestError(f"--top must be ≥ 0 (got {args.top})")
    try:
        diff = diff_sessions(args.a, args.b, top=args.top)
    except (OSError, ValueError) as exc:  # not a session folder, or report.json unreadable
        raise InvalidRequestError(f"cannot diff the sessions: {exc}") from exc
    if args.json:
        print(json.dumps(diff.to_json(), indent=2, ensure_ascii=False))
    else:
        print(format_diff(diff), end="")
    return 0


def _microseconds(text: str) -> float:
    """A duration in µs, ≥ 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of microseconds, got {text!r}"
        ) from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0 (got {text})")
    return value


def _add_start(sub: Any) -> Any:
    pstart = sub.add_parser("start", help="start profiling some or all stages")
    pstart.add_argument("--stages", default="", help="names or indices, e.g. 0,2; default all")
    pstart.add_argument("--label", default="")
    pstart.add_argument("--delay-iterations", type=int, default=0)
    pstart.add_argument("--max-iterations", type=int, default=0)
    pstart.add_argument(
        "--timing-only",
        action="store_true",
        help="record request spans, stage times and clocks; start no stage's torch profiler",
    )
    pstart.set_defaults(func=_profile_start)
    return pstart


def add_profile_commands(commands: Any, default_address: str) -> None:
    """`omnistage profile start|stop|fetch|list|delete|report|diff`."""
    profile = commands.add_parser("profile", help="profile pipeline stages")
    sub = profile.add_subparsers(dest="profile_command", required=True)
    pstart = _add_start(sub)
    pstop = sub.add_parser("stop", help="stop profiling and collect every trace, showing progress")
    pstop.add_argument("--stages", default="", help="default: every profiling stage")
    pstop.add_argument(
        "--output-dir", default="", help="a folder relative to the orchestrator's profile root"
    )
    pstop.add_argument(
        "--download",
        default="",
        metavar="DIR",
        help="bring the whole session to this machine, into DIR/<session>/",
    )
    pstop.set_defaults(func=_profile_stop)
    pfetch = sub.add_parser("fetch", help="download a kept session from the orchestrator")
    pfetch.add_argument("session", help="the session id (omnistage profile list)")
    pfetch.add_argument("--to", default=".", metavar="DIR", help="into DIR/<session>/")
    pfetch.set_defaults(func=_profile_fetch)
    plist = sub.add_parser("list", help="the sessions the orchestrator keeps, newest first")
    plist.set_defaults(func=_profile_list)
    pdelete = sub.add_parser("delete", help="delete a kept session on the orchestrator")
    pdelete.add_argument("session", help="the session id")
    pdelete.set_defaults(func=_profile_delete)
    preport = sub.add_parser(
        "report",
        help="rebuild the timelines (JSON and Perfetto) and summary.md of a session folder",
    )
    preport.add_argument("dir", help="<output_dir>/<session_id>, as StopProfile wrote it")
    preport.set_defaults(func=_profile_report)
    _add_diff_command(sub)
    for parser in (pstart, pstop, pfetch, plist, pdelete):
        parser.add_argument("--address", default=default_address, help="the orchestrator")
        cli_security.add_client_flags(parser)
    for parser in (pstop, preport):
        parser.add_argument(
            "--slim", action="store_true", help="slimmed copies: vLLM's idle loops dropped"
        )
        parser.add_argument(
            "--slim-min-us",
            type=_microseconds,
            default=0.0,
            help="slim, and drop Python frames shorter than this (µs)",
        )
        parser.add_argument(
            "--slim-pattern",
            action="append",
            default=[],
            help="slim, dropping Python frames that match this fnmatch pattern instead of the "
            "idle-loop defaults (repeatable)",
        )


def _add_diff_command(sub: Any) -> None:
    """`omnistage profile diff A B [--json] [--top N]`."""
    pdiff = sub.add_parser(
        "diff",
        help="compare two session folders: busy share, latency p50/p90 and top ops per stage",
    )
    pdiff.add_argument("a", help="the session folder to compare against (A)")
    pdiff.add_argument("b", help="the session folder compared with it (B)")
    pdiff.add_argument(
        "--json", action="store_true", help="print the diff as JSON (docs/profiling.md)"
    )
    pdiff.add_argument("--top", type=int, default=10, help="ops per stage (default 10)")
    pdiff.set_defaults(func=_profile_diff)
