"""The `omnistage` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from omnistage.errors import OmnistageError

logger = logging.getLogger("omnistage")


def _stage_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from services.config import StageConfig, describe_validation_error, parse_profiler_config
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
        )
    except ValidationError as exc:
        raise OmnistageError(describe_validation_error(exc)) from exc

    def announce(port: int) -> None:
        print(f"stage {config.name!r} listening on {config.host}:{port}", flush=True)

    asyncio.run(serve(config, on_bound=announce))
    return 0


def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(args.address) as channel:
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


def _model_prepare(args: argparse.Namespace) -> int:
    from omnistage.models import prepare_bundled_model

    path = prepare_bundled_model(args.name, force=args.force)
    print(path)
    return 0


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
    serve.set_defaults(func=_stage_serve)

    check = commands.add_parser("health", help="exit 0 when ADDRESS reports SERVING")
    check.add_argument("address", help="host:port")
    check.add_argument("--service", default="", help="service name; empty for the server")
    check.add_argument("--timeout", type=float, default=5.0)
    check.set_defaults(func=_health)

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
