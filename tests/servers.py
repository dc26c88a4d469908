"""Real servers for tests, in their own processes: the session's stages (started by
tests/conftest.py, only those the selected tests use) and orchestrators on free ports."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from omnistage.launch import ServerProcess, stage_args
from omnistage.v1 import stage_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_PROMPTS = [  # what tests/vllm_reference.py answers offline, for the greedy test
    "What is the capital of France?",
    "Write one sentence about the sea.",
]
REFERENCE_MAX_TOKENS = 24
PLAIN_GRACE_S = 15.0  # the plain stage's SIGTERM drain time; its SIGTERM test waits it out
TALKER_MODEL = ROOT / "examples" / "omni" / "talker"
CODE2WAV_MODEL = "examples.omni.code2wav:build"
HEALTH_INTERVAL_S = 1.0  # each session stage's; test_engine_death awaits NOT_SERVING in it
CODE2WAV_OPTIONS = {"max_batch_size": 4, "max_wait_ms": 5, "num_threads": 1}


@dataclass
class RunningStage:
    process: ServerProcess
    address: str
    profiler_dir: Path | None
    health_seen: list[str] = field(default_factory=list)
    channel: grpc.Channel | None = None
    metrics_port: int = 0  # its /metrics, where its recipe asks for one

    @property
    def stub(self) -> stage_pb2_grpc.StageStub:
        if self.channel is None:
            self.channel = grpc.insecure_channel(self.address)
        return stage_pb2_grpc.StageStub(self.channel)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_pipeline(tmp: Path, name: str, text: str, *, extra: Sequence[str] = ()) -> ServerProcess:
    """An orchestrator process serving the pipeline file `text`, once it is SERVING; `extra`
    are more `orchestrator serve` arguments (`--http-port 0`: its `http_url` is set)."""
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    args = ["orchestrator", "serve", "--pipeline", str(path), "--port", "0", "--host", "127.0.0.1"]
    process = ServerProcess(f"orchestrator {name}", [*args, *extra], log_path=tmp / f"{name}.log")
    process.wait_serving(timeout=60)
    return process


@dataclass(frozen=True)
class StageRecipe:
    """How to start one of the session's stages."""

    name: str
    profiled: bool = True
    engine: str = "vllm"
    model: str = "smollm2"
    extra: tuple[str, ...] = ()
    metrics: bool = False  # serve /metrics (--metrics-port) on a free port


SESSION_STAGES = {
    # fixture name: the stage it serves
    "stage": StageRecipe("thinker"),
    "rewriter_stage": StageRecipe("rewriter"),
    "plain_stage": StageRecipe(
        "plain", profiled=False, extra=("--grace-seconds", str(PLAIN_GRACE_S)), metrics=True
    ),
    # test_engine_death kills the talker's engine core, as the session's very last use of it.
    "talker_stage": StageRecipe("talker", model=str(TALKER_MODEL), extra=("--max-num-seqs", "16")),
    "code2wav_stage": StageRecipe(
        "code2wav",
        engine="torch",
        model=CODE2WAV_MODEL,
        extra=("--engine-options", json.dumps(CODE2WAV_OPTIONS)),
    ),
}


class SessionStages:
    """The session's stages, each started at most once. The first `get` starts every stage in
    `wanted` (those the selected tests use) at once, so their engines load concurrently, and
    waits until each is SERVING; a stage no selected test wanted starts when first asked for."""

    def __init__(self, folder: Callable[[str], Path], wanted: set[str]) -> None:
        self._folder = folder
        self._wanted = wanted
        self._logs: Path | None = None
        self._started: dict[str, tuple[ServerProcess, Path | None]] = {}
        self._running: dict[str, RunningStage] = {}
        self._metrics_ports: dict[str, int] = {}

    def _start(self, key: str) -> None:
        recipe = SESSION_STAGES[key]
        if self._logs is None:
            self._logs = self._folder("logs")
        profiler_dir = self._folder(f"{recipe.name}-profiles") if recipe.profiled else None
        metrics: list[str] = []
        if recipe.metrics:
            self._metrics_ports[key] = free_port()
            metrics = ["--metrics-port", str(self._metrics_ports[key])]
        process = ServerProcess(
            f"stage {recipe.name!r}",
            stage_args(
                name=recipe.name,
                engine=recipe.engine,
                model=recipe.model,
                profiler_config=(
                    {"torch_profiler_dir": str(profiler_dir), "torch_profiler_with_stack": False}
                    if profiler_dir
                    else None
                ),
                extra=[
                    *("--grace-seconds", "20", "--health-interval", str(HEALTH_INTERVAL_S)),
                    *recipe.extra,
                    *metrics,
                ],
            ),
            log_path=self._logs / f"{recipe.name}.log",
        )
        self._started[key] = (process, profiler_dir)

    def get(self, key: str) -> RunningStage:
        if key not in self._running:
            for name in SESSION_STAGES:
                if (name in self._wanted or name == key) and name not in self._started:
                    self._start(name)
            # Wait for all that started, the thinker first: its start is watched from the
            # beginning, so its health is seen NOT_SERVING while its engine loads.
            for name, (process, profiler_dir) in self._started.items():
                if name not in self._running:
                    seen: list[str] = []
                    address = process.wait_serving(
                        timeout=900, progress=lambda status, _s, seen=seen: seen.append(status)
                    )
                    self._running[name] = RunningStage(
                        process,
                        address,
                        profiler_dir,
                        seen,
                        metrics_port=self._metrics_ports.get(name, 0),
                    )
        return self._running[key]

    def close(self) -> None:
        for stage in self._running.values():
            if stage.channel is not None:
                stage.channel.close()
        # Each stage drains and closes its engine on SIGTERM; stop them all at once.
        stoppers = [threading.Thread(target=p.stop) for p, _ in self._started.values()]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()
