"""`omnistage up FILE`: every stage of a pipeline's launch section, then the orchestrator,
as local processes. Waits for health with progress; Ctrl-C or SIGTERM stops them all."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from omnistage.errors import InvalidRequestError
from omnistage.launch import ServerProcess, stage_args

if TYPE_CHECKING:
    from orchestrator.config import LaunchStage, PipelineConfig

logger = logging.getLogger(__name__)


def _say(message: str) -> None:
    print(message, flush=True)


def _progress_printer(name: str) -> Callable[[str, float], None]:
    def report(status: str, seconds: float) -> None:
        _say(f"    ... {name}: {status} ({seconds:.0f} s)")

    return report


def launch_pipeline(
    pipeline_file: Path,
    *,
    port: int | None = None,
    http_port: int | None = None,
    log_dir: Path | None = None,
    on_serving: Callable[[], None] | None = None,
) -> list[ServerProcess]:
    """Start the launch section's stages and the orchestrator; return them once all SERVING.

    `on_serving` runs just before the SERVING line is printed: whoever reads that line and then
    signals `up` must find it already past start-up.
    """
    from orchestrator.config import load_pipeline

    pipeline = load_pipeline(pipeline_file)
    if pipeline.launch is None or not pipeline.launch.stages:
        raise InvalidRequestError(
            f"{pipeline_file} has no launch section: add launch.stages with each stage's engine "
            "and model, or start the stages yourself and run `omnistage orchestrator serve`"
        )
    base = pipeline_file.resolve().parent
    logs = log_dir or base / "logs"
    processes: list[ServerProcess] = []
    try:
        for name, spec in pipeline.launch.stages.items():
            processes.append(_start_stage(pipeline, name, spec, logs))
        started = time.monotonic()
        for process in processes:
            process.wait_serving(progress=_progress_printer(process.name))
            _say(
                f"    {process.name} SERVING at {process.address} "
                f"({time.monotonic() - started:.0f} s)"
            )
        orchestrator = ServerProcess(
            "orchestrator",
            _orchestrator_args(pipeline, pipeline_file, port=port, http_port=http_port),
            log_path=logs / "orchestrator.log",
            die_with_parent=True,
        )
        processes.append(orchestrator)
        orchestrator.wait_serving(timeout=60)
        if on_serving is not None:
            on_serving()
        _say(f"==> pipeline {pipeline.name!r} SERVING: orchestrator at {orchestrator.address}")
        if orchestrator.http_port:
            _say(f"    OpenAI-compatible HTTP API at {orchestrator.http_url}/v1")
        return processes
    except BaseException:
        stop_all(processes)
        raise


def _orchestrator_args(
    pipeline: PipelineConfig, pipeline_file: Path, *, port: int | None, http_port: int | None
) -> list[str]:
    """`orchestrator serve` for the file: the ports given, else the launch section's."""
    launch = pipeline.launch
    assert launch is not None
    args = ["orchestrator", "serve", "--pipeline", str(pipeline_file.resolve())]
    args += ["--port", str(launch.orchestrator_port if port is None else port)]
    args += ["--host", "127.0.0.1"]
    http = launch.http_port if http_port is None else http_port
    if http is not None:
        args += ["--http-port", str(http)]
        if launch.http_text_stage:
            args += ["--text-stage", launch.http_text_stage]
    if launch.orchestrator_metrics_port is not None:
        args += ["--metrics-port", str(launch.orchestrator_metrics_port)]
    return args


def _start_stage(
    pipeline: PipelineConfig, name: str, spec: LaunchStage, logs: Path
) -> ServerProcess:
    """Start one stage of the launch section (paths resolved beside the pipeline file)."""
    from orchestrator.security import stage_client_security

    config = dict(spec.profiler_config) if spec.profiler_config is not None else None
    if config and config.get("torch_profiler_dir"):
        config["torch_profiler_dir"] = str(pipeline.resolve_path(str(config["torch_profiler_dir"])))
    metrics = [] if spec.metrics_port is None else ["--metrics-port", str(spec.metrics_port)]
    model = spec.model
    if spec.engine == "vllm" and pipeline.resolve_path(model).is_dir():
        model = str(pipeline.resolve_path(model))  # a folder beside the pipeline file
    args = stage_args(
        name=name,
        model=model,
        port=spec.port,
        host=spec.host,
        engine=spec.engine,
        profiler_config=config,
        extra=[*metrics, *spec.args],
    )
    _say(f"==> starting stage {name!r} ({spec.engine}, {spec.model}) on port {spec.port}")
    return ServerProcess(
        f"stage {name!r}",
        args,
        log_path=logs / f"{name}.log",
        security=stage_client_security(pipeline, pipeline.stage_index(name)),
        die_with_parent=True,
    )


def stop_all(processes: list[ServerProcess]) -> None:
    """Stop the orchestrator first, then the stages, concurrently."""
    threads = [threading.Thread(target=p.stop) for p in reversed(processes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, kill, a closed terminal


class StopSignals:
    """What `up` does on Ctrl-C, SIGTERM or SIGHUP.

    While the pipeline starts, the first signal raises KeyboardInterrupt, so launch_pipeline
    stops what it started; once it runs, the signal asks the wait loop to stop everything.
    Any later signal only says the stop is under way: a second, impatient Ctrl-C must not cut
    the stop short and leave servers behind.
    """

    def __init__(self) -> None:
        self.launched = False
        self.requested = threading.Event()

    def mark_launched(self) -> None:
        self.launched = True

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested.is_set():
            print("omnistage up: already stopping every process", file=sys.stderr, flush=True)
            return
        self.requested.set()
        if not self.launched:
            raise KeyboardInterrupt


def run_up(pipeline_file: Path, *, port: int | None = None, http_port: int | None = None) -> int:
    """Launch, then wait for a stop signal or a process that exits, and stop them all.

    A stop signal while the pipeline still starts stops what has started. Should `up` itself
    die without stopping them (SIGKILL), every server gets SIGTERM from the kernel.
    """
    stop = StopSignals()
    for sig in STOP_SIGNALS:
        signal.signal(sig, stop.handle)
    processes = launch_pipeline(
        pipeline_file, port=port, http_port=http_port, on_serving=stop.mark_launched
    )
    _say("    press Ctrl-C to stop every process")
    try:
        while not stop.requested.wait(1.0):
            dead = [p for p in processes if p.process.poll() is not None]
            if dead:
                names = ", ".join(p.name for p in dead)
                print(f"omnistage up: {names} exited; stopping the rest", file=sys.stderr)
                return 1
        return 0
    finally:
        _say("==> stopping every process")
        stop_all(processes)
