"""`omnistage stage serve`, `omnistage orchestrator serve` and `omnistage up`: the commands
that start servers (so they import them, lazily)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from omnistage import cli_security
from omnistage.errors import InvalidRequestError, OmnistageError
from omnistage.settings import ProfilerSettings
from omnistage.validation import DEFAULT_MAX_PROMPT_BYTES


def _stage_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from omnistage.server.event_loop import run_server
    from omnistage.settings import describe_validation_error
    from services.config import StageConfig
    from services.server import serve

    try:
        config = StageConfig(
            name=args.name,
            engine=args.engine,
            model=args.model,
            host=args.host,
            port=args.port,
            profiler=_profiler_settings(args.profiler_config or ""),
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            kv_cache_gib=args.kv_cache_gib,
            enforce_eager=not args.compile,
            grace_seconds=args.grace_seconds,
            max_inflight=args.max_inflight,
            max_prompt_bytes=args.max_prompt_bytes,
            max_prompt_tokens=args.max_prompt_tokens,
            health_interval_s=args.health_interval,
            engine_options=_parse_engine_options(args.engine_options),
            security=cli_security.server_security(args),
            health_port=args.health_port,
            metrics_port=args.metrics_port,
            profile_max_sessions=args.profile_max_sessions,
            profile_max_bytes=args.profile_max_bytes,
            shared_memory=not args.no_shm,
        )
    except ValidationError as exc:
        raise OmnistageError(describe_validation_error(exc)) from exc
    if config.engine == "vllm":
        _check_busy_poll()

    def announce(port: int) -> None:
        print(f"stage {config.name!r} listening on {config.host}:{port}", flush=True)

    run_server(serve(config, on_bound=announce))
    return 0


def _profiler_settings(text: str) -> ProfilerSettings:
    """`--profiler-config`, or else the profiler variables of older vLLM releases."""
    from omnistage.profiler_env import profiler_config_from_env
    from omnistage.settings import parse_profiler_config

    if text.strip():
        return parse_profiler_config(text)
    return profiler_config_from_env(os.environ) or ProfilerSettings()


def _check_busy_poll() -> None:
    """OMNISTAGE_VLLM_BUSY_POLL_S, refused before vLLM starts (services/engines/vllm_plugin)."""
    from services.engines.vllm_plugin import BUSY_POLL_ENV, busy_poll_seconds

    if BUSY_POLL_ENV in os.environ:
        try:
            busy_poll_seconds(os.environ[BUSY_POLL_ENV])
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from exc


def _parse_engine_options(text: str) -> dict[str, Any]:
    """`--engine-options` JSON: an object, passed to the engine as its options."""
    if not text.strip():
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"--engine-options is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidRequestError(
            f"--engine-options must be a JSON object, e.g. '{{\"max_batch_size\": 8}}'; "
            f"got {type(raw).__name__}"
        )
    return raw


def _orchestrator_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from omnistage.server.event_loop import run_server
    from omnistage.settings import describe_validation_error
    from orchestrator.config import load_pipeline
    from orchestrator.http_server import HttpApiConfig
    from orchestrator.server import OrchestratorServerConfig, serve

    pipeline = load_pipeline(Path(args.pipeline))
    try:
        http = None
        if args.http_port is not None:
            http = HttpApiConfig(
                port=args.http_port,
                served_model_name=args.served_model_name or None,
                text_stage=args.text_stage or None,
                sample_rate=args.sample_rate,
            )
        config = OrchestratorServerConfig(
            host=args.host,
            port=args.port,
            health_port=args.health_port,
            metrics_port=args.metrics_port,
            security=cli_security.server_security(args),
            profile_dir=Path(args.profile_dir) if args.profile_dir else None,
            profile_max_sessions=args.profile_max_sessions,
            profile_max_bytes=args.profile_max_bytes,
            max_prompt_bytes=args.max_prompt_bytes,
            http=http,
        )
    except ValidationError as exc:
        raise OmnistageError(describe_validation_error(exc)) from exc

    def announce(port: int) -> None:
        print(f"orchestrator {pipeline.name!r} listening on {args.host}:{port}", flush=True)

    def announce_http(port: int) -> None:
        scheme = "https" if config.security.tls else "http"
        print(
            f"orchestrator {pipeline.name!r} HTTP API on {scheme}://{args.host}:{port}", flush=True
        )

    run_server(serve(pipeline, config, on_bound=announce, on_http_bound=announce_http))
    return 0


def _up(args: argparse.Namespace) -> int:
    from omnistage.up import run_up

    return run_up(Path(args.file), port=args.port, http_port=args.http_port)


def _add_metrics_flag(serve: argparse.ArgumentParser) -> None:
    """Prometheus' /metrics, on a port of its own (docs/observability.md)."""
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="N",
        help="serve Prometheus metrics on http://HOST:N/metrics (default: off; 0 picks a port)",
    )


def _add_limit_flags(serve: argparse.ArgumentParser) -> None:
    """A stage's bounds on its work (docs/limits.md)."""
    serve.add_argument(
        "--max-inflight",
        type=int,
        default=128,
        metavar="N",
        help="Generate calls served at once; the next gets RESOURCE_EXHAUSTED with a "
        "retry-after-ms hint (default 128; docs/limits.md)",
    )
    serve.add_argument(
        "--max-prompt-bytes",
        type=int,
        default=DEFAULT_MAX_PROMPT_BYTES,
        metavar="N",
        help="UTF-8 bytes of a request's text (prompt or messages) taken; a longer one is "
        "INVALID_ARGUMENT before tokenizing (default 1 MiB; 0: no limit; docs/limits.md)",
    )
    serve.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        metavar="N",
        help="tokens of a prompt taken; more are INVALID_ARGUMENT (default: the model's "
        "context less one; docs/limits.md)",
    )
    serve.add_argument(
        "--health-interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between engine liveness checks; a dead engine is NOT_SERVING (default 1)",
    )


def add_stage_commands(commands: Any) -> None:
    """`omnistage stage serve`."""
    stage = commands.add_parser("stage", help="run one pipeline stage").add_subparsers(
        dest="stage_command", required=True
    )
    serve = stage.add_parser("serve", help="serve one stage over gRPC")
    serve.add_argument("--name", required=True, help="the stage's name")
    serve.add_argument("--engine", choices=["vllm", "torch"], default="vllm")
    serve.add_argument("--model", required=True, help="a local model folder, or 'smollm2'")
    serve.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    serve.add_argument("--port", type=int, default=0, help="port; 0 picks a free one")
    serve.add_argument(
        "--profiler-config",
        default="",
        help='vLLM\'s profiler JSON, e.g. \'{"profiler":"torch","torch_profiler_dir":"DIR"}\'; '
        "without it, older vLLM's VLLM_TORCH_PROFILER_DIR and VLLM_TORCH_PROFILER_* variables",
    )
    serve.add_argument("--dtype", default="float32")
    serve.add_argument("--max-model-len", type=int, default=2048)
    serve.add_argument("--max-num-seqs", type=int, default=64)
    serve.add_argument(
        "--compile",
        action="store_true",
        help="let vLLM torch.compile the model: slower start, faster steps",
    )
    serve.add_argument("--kv-cache-gib", type=float, default=1.0)
    serve.add_argument("--grace-seconds", type=float, default=30.0, help="SIGTERM drain time")
    _add_limit_flags(serve)
    serve.add_argument(
        "--engine-options",
        default="",
        metavar="JSON",
        help='engine options as a JSON object, e.g. \'{"max_batch_size": 8, "max_wait_ms": 5}\'',
    )
    serve.add_argument(
        "--profile-max-sessions",
        type=int,
        default=10,
        metavar="N",
        help="past profile sessions kept; the oldest beyond N are deleted (default 10; 0: all)",
    )
    serve.add_argument(
        "--profile-max-bytes",
        type=int,
        default=10 * 2**30,
        metavar="N",
        help="bytes past profile sessions may take; the oldest beyond are deleted, never the "
        "newest (default 10 GiB; 0: no limit)",
    )
    serve.add_argument(
        "--no-shm",
        action="store_true",
        help="take and send tensors as gRPC bytes only, never through shared memory with "
        "callers on this host (docs/shared-memory.md)",
    )
    _add_metrics_flag(serve)
    cli_security.add_server_flags(serve)
    serve.set_defaults(func=_stage_serve)


def add_orchestrator_commands(commands: Any) -> None:
    """`omnistage orchestrator serve`."""
    orchestrator = commands.add_parser("orchestrator", help="run the orchestrator")
    orchestrator_commands = orchestrator.add_subparsers(dest="orchestrator_command", required=True)
    oserve = orchestrator_commands.add_parser("serve", help="serve a pipeline file over gRPC")
    oserve.add_argument("--pipeline", required=True, help="the pipeline YAML file")
    oserve.add_argument("--host", default="0.0.0.0")
    oserve.add_argument("--port", type=int, default=50050, help="port; 0 picks a free one")
    oserve.add_argument(
        "--profile-dir",
        default="",
        metavar="DIR",
        help="the profile root: every collected session lands below it, and StopProfile's "
        "output_dir is relative to it (default: the pipeline's launch.profile_dir)",
    )
    oserve.add_argument(
        "--profile-max-sessions",
        type=int,
        default=None,
        metavar="N",
        help="sessions kept, oldest deleted first; 0 keeps all (default: the pipeline's "
        "launch.profile_max_sessions, else 20)",
    )
    oserve.add_argument(
        "--profile-max-bytes",
        type=int,
        default=None,
        metavar="N",
        help="bytes of sessions kept, oldest deleted first; 0: no limit (default: the "
        "pipeline's launch.profile_max_bytes, else 20 GiB)",
    )
    oserve.add_argument(
        "--max-prompt-bytes",
        type=int,
        default=DEFAULT_MAX_PROMPT_BYTES,
        metavar="N",
        help="UTF-8 bytes of a request's text (prompt or messages) taken; a longer one is "
        "INVALID_ARGUMENT before any stage is called (default 1 MiB; 0: no limit)",
    )
    _add_http_flags(oserve)
    _add_metrics_flag(oserve)
    cli_security.add_server_flags(oserve)
    oserve.set_defaults(func=_orchestrator_serve)


def _add_http_flags(oserve: argparse.ArgumentParser) -> None:
    """The OpenAI-compatible HTTP API beside the gRPC port (docs/http.md)."""
    group = oserve.add_argument_group("HTTP API")
    group.add_argument(
        "--http-port",
        type=int,
        default=None,
        metavar="N",
        help="also serve the OpenAI-compatible HTTP API and /start_profile, /stop_profile on "
        "port N (0 picks a free one; default: no HTTP)",
    )
    group.add_argument(
        "--served-model-name",
        default="",
        metavar="NAME",
        help="the model id of the HTTP API (default: the pipeline's name)",
    )
    group.add_argument(
        "--text-stage",
        default="",
        metavar="STAGE",
        help="the stage whose text is the HTTP answer (default: the last stage that makes text)",
    )
    group.add_argument(
        "--sample-rate",
        type=int,
        default=24_000,
        metavar="HZ",
        help="the sample rate of the final stage's audio in the HTTP answer (default 24000)",
    )


def add_up_command(commands: Any) -> None:
    """`omnistage up FILE`."""
    up = commands.add_parser("up", help="start a pipeline file's stages and orchestrator locally")
    up.add_argument("file", help="pipeline YAML with a launch section")
    up.add_argument("--port", type=int, default=None, help="the orchestrator's port")
    up.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="the orchestrator's OpenAI-compatible HTTP port (default: the file's "
        "launch.http_port, else none)",
    )
    up.set_defaults(func=_up)
