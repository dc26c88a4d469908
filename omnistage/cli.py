"""The `omnistage` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from omnistage import cli_security
from omnistage.cli_profile import add_profile_commands
from omnistage.cli_serve import add_orchestrator_commands, add_stage_commands, add_up_command
from omnistage.errors import InvalidRequestError, OmnistageError

logger = logging.getLogger("omnistage")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnistage", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    default_address = os.environ.get("OMNISTAGE_ADDRESS", "localhost:50050")
    add_stage_commands(commands)
    _add_health_command(commands)
    add_orchestrator_commands(commands)
    add_up_command(commands)
    _add_generate_command(commands, default_address)
    add_profile_commands(commands, default_address)
    _add_status_command(commands, default_address)
    _add_model_commands(commands)
    return parser


def _add_health_command(commands: Any) -> None:
    """`omnistage health ADDRESS`."""
    check = commands.add_parser("health", help="exit 0 when ADDRESS reports SERVING")
    check.add_argument("address", help="host:port")
    check.add_argument("--service", default="", help="service name; empty for the server")
    check.add_argument("--timeout", type=float, default=5.0)
    cli_security.add_client_flags(check)
    check.set_defaults(func=_health)


def _add_generate_command(commands: Any, default_address: str) -> None:
    """`omnistage generate PROMPT`."""
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


def _add_status_command(commands: Any, default_address: str) -> None:
    """`omnistage status`."""
    status = commands.add_parser("status", help="every stage's health and profiling state")
    status.add_argument("--address", default=default_address)
    cli_security.add_client_flags(status)
    status.set_defaults(func=_status)


def _add_model_commands(commands: Any) -> None:
    """`omnistage model prepare [NAME]`."""
    model = commands.add_parser("model", help="bundled models").add_subparsers(
        dest="model_command", required=True
    )
    prepare = model.add_parser("prepare", help="convert a bundled model once into the cache")
    prepare.add_argument("name", nargs="?", default="smollm2")
    prepare.add_argument("--force", action="store_true")
    prepare.set_defaults(func=_model_prepare)


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
