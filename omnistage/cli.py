"""The `omnistage` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omnistage import cli_security
from omnistage.cli_profile import add_profile_commands
from omnistage.errors import InvalidRequestError, OmnistageError

logger = logging.getLogger("omnistage")


def _stage_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from omnistage.settings import describe_validation_error, parse_profiler_config
    from services.config import StageConfig
    from services.server import serve

    try:
        config = StageConfig(
            name=args.name,
            engine=args.engine,
            model=args.model,
            host=args.host,
            port=args.port,
            profiler=parse_profiler_config(args.profiler_config or ""),
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            kv_cache_gib=args.kv_cache_gib,
            enforce_eager=not args.compile,
            grace_seconds=args.grace_seconds,
            max_inflight=args.max_inflight,
            health_interval_s=args.health_interval,
            engine_options=_parse_engine_options(args.engine_options),
            security=cli_security.server_security(args),
            health_port=args.health_port,
            profile_max_sessions=args.profile_max_sessions,
            profile_max_bytes=args.profile_max_bytes,
        )
    except ValidationError as exc:
        raise OmnistageError(describe_validation_error(exc)) from exc

    def announce(port: int) -> None:
        print(f"stage {config.name!r} listening on {config.host}:{port}", flush=True)

    asyncio.run(serve(config, on_bound=announce))
    return 0


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


def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from omnistage.security import sync_channel

    with sync_channel(args.address, cli_security.client_security(args)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _orchestrator_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from omnistage.settings import describe_validation_error
    from orchestrator.config import load_pipeline
    from orchestrator.server import OrchestratorServerConfig, serve

    pipeline = load_pipeline(Path(args.pipeline))
    try:
        config = OrchestratorServerConfig(
            host=args.host,
            port=args.port,
            health_port=args.health_port,
            security=cli_security.server_security(args),
            profile_dir=Path(args.profile_dir) if args.profile_dir else None,
            profile_max_sessions=args.profile_max_sessions,
            profile_max_bytes=args.profile_max_bytes,
        )
    except ValidationError as exc:
        raise OmnistageError(describe_validation_error(exc)) from exc

    def announce(port: int) -> None:
        print(f"orchestrator {pipeline.name!r} listening on {args.host}:{port}", flush=True)

    asyncio.run(serve(pipeline, config, on_bound=announce))
    return 0


def _up(args: argparse.Namespace) -> int:
    from omnistage.up import run_up

    return run_up(Path(args.file), port=args.port)


def _parse_stage_sampling(items: list[str]) -> dict[str, dict[str, Any]]:
    """`STAGE.KEY=VALUE` items, values parsed as JSON when they can be."""
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        stage, dot, field = key.partition(".")
        if not sep or not dot or not stage or not field:
            raise InvalidRequestError(f"--stage-sampling {item!r}: write STAGE.KEY=VALUE")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides.setdefault(stage, {})[field] = [value] if field == "stop" else value
    return overrides


def _generate(args: argparse.Namespace) -> int:
    from omnistage.client import Client
    from omnistage.types import TensorData

    sampling = {
        k: v
        for k, v in {
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "seed": args.seed,
            "ignore_eos": args.ignore_eos or None,
        }.items()
        if v is not None
    }
    audio: list[TensorData] = []
    with Client(args.address, security=cli_security.client_security(args)) as client:
        current = None
        outputs = client.generate(
            "" if args.chat else args.prompt,
            messages=[{"role": "user", "content": args.prompt}] if args.chat else (),
            stage_sampling=_parse_stage_sampling(args.stage_sampling),
            timeout=args.timeout,
            **sampling,
        )
        for out in outputs:
            if out.final and out.tensor is not None:
                audio.append(out.tensor)
            if out.text and out.stage != current:
                current = out.stage
                print(f"\n[{out.stage_index}:{out.stage}] ", end="", flush=True)
            print(out.text, end="", flush=True)
            if out.finished and out.metrics is not None and args.verbose_metrics:
                m = out.metrics
                print(
                    f"\n    ({out.stage}: first output {m.time_to_first_output_s * 1000:.0f} ms, "
                    f"duration {m.duration_s:.2f} s, hand-off {m.handoff_s * 1000:.1f} ms)",
                    end="",
                )
        print()
    if args.wav:
        from omnistage.audio import write_wav

        if not audio:
            raise InvalidRequestError(
                "--wav: the final stage sent no audio tensors; is the pipeline's last stage a "
                "vocoder such as code2wav?"
            )
        info = write_wav(args.wav, audio, sample_rate=args.sample_rate)
        print(f"wrote {info.path}: {info.duration_s:.2f} s of {info.sample_rate} Hz mono audio")
    return 0


def _status(args: argparse.Namespace) -> int:
    from omnistage.client import Client

    with Client(args.address, security=cli_security.client_security(args)) as client:
        info = client.pipeline()
    session = f", profiling session {info.profile_session_id}" if info.profiling_active else ""
    print(f"pipeline {info.name!r}{session}")
    for stage in info.stages:
        profiling = "profiling" if stage.profiling_active else ""
        print(
            f"  [{stage.index}] {stage.name:<12} {stage.health:<12} {','.join(stage.addresses):<24}"
            f" {stage.engine} {stage.model} {profiling}".rstrip()
        )
    return 0


def _model_prepare(args: argparse.Namespace) -> int:
    from omnistage.models import prepare_bundled_model

    path = prepare_bundled_model(args.name, force=args.force)
    print(path)
    return 0


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
        "--health-interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between engine liveness checks; a dead engine is NOT_SERVING (default 1)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnistage", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

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
        help='vLLM\'s profiler JSON, e.g. \'{"profiler":"torch","torch_profiler_dir":"DIR"}\'',
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
    cli_security.add_server_flags(serve)
    serve.set_defaults(func=_stage_serve)

    check = commands.add_parser("health", help="exit 0 when ADDRESS reports SERVING")
    check.add_argument("address", help="host:port")
    check.add_argument("--service", default="", help="service name; empty for the server")
    check.add_argument("--timeout", type=float, default=5.0)
    cli_security.add_client_flags(check)
    check.set_defaults(func=_health)

    default_address = os.environ.get("OMNISTAGE_ADDRESS", "localhost:50050")
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
    cli_security.add_server_flags(oserve)
    oserve.set_defaults(func=_orchestrator_serve)

    up = commands.add_parser("up", help="start a pipeline file's stages and orchestrator locally")
    up.add_argument("file", help="pipeline YAML with a launch section")
    up.add_argument("--port", type=int, default=None, help="the orchestrator's port")
    up.set_defaults(func=_up)

    generate = commands.add_parser("generate", help="stream one request through the pipeline")
    generate.add_argument("prompt")
    generate.add_argument("--address", default=default_address, help="the orchestrator")
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user message")
    generate.add_argument("--max-tokens", type=int)
    generate.add_argument("--temperature", type=float)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--ignore-eos", action="store_true")
    generate.add_argument(
        "--stage-sampling", action="append", default=[], metavar="STAGE.KEY=VALUE"
    )
    generate.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    generate.add_argument("--metrics", dest="verbose_metrics", action="store_true")
    generate.add_argument(
        "--wav", default="", metavar="PATH", help="write the final stage's audio as a WAV file"
    )
    generate.add_argument(
        "--sample-rate", type=int, default=24_000, help="of --wav's audio (default 24000)"
    )
    cli_security.add_client_flags(generate)
    generate.set_defaults(func=_generate)

    add_profile_commands(commands, default_address)

    status = commands.add_parser("status", help="every stage's health and profiling state")
    status.add_argument("--address", default=default_address)
    cli_security.add_client_flags(status)
    status.set_defaults(func=_status)

    model = commands.add_parser("model", help="bundled models").add_subparsers(
        dest="model_command", required=True
    )
    prepare = model.add_parser("prepare", help="convert a bundled model once into the cache")
    prepare.add_argument("name", nargs="?", default="smollm2")
    prepare.add_argument("--force", action="store_true")
    prepare.set_defaults(func=_model_prepare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except OmnistageError as exc:
        print(f"omnistage: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
