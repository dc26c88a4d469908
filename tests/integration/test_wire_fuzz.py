"""A bounded, seeded protobuf fuzz of the streaming and profiling RPCs, on real servers.

Each RPC gets a few hundred mutations of one valid message (byte flips, truncations, random
bytes, fields of random numbers and wire types, known fields sent with the wrong wire type),
sent as raw bytes through a channel with identity serializers. No answer may be UNKNOWN or
INTERNAL, and the server must still serve afterwards: health SERVING and one good Generate.

Profiling RPCs are fuzzed on a torch stage of this module's own (and an orchestrator over
it), never on the session's stages, and every session a mutation started is stopped. The
session's vLLM stage gets Generate only, and only mutations that cannot ask for more than a
few tokens, so the module stays well under a minute.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnistage.launch import ServerProcess, stage_args
from omnistage.v1 import common_pb2, orchestrator_pb2, stage_pb2
from tests.servers import RunningStage, serve_pipeline

SEED = 14  # the issue that asked for this test
MUTATIONS = 200  # per RPC
VLLM_MUTATIONS = 200
VLLM_MAX_TOKENS = 4  # a decodable mutation asking for more is not sent
CALL_TIMEOUT_S = 20.0
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
STAGE = "/omnistage.v1.Stage/"
ORCHESTRATOR = "/omnistage.v1.Orchestrator/"
CODES = [(7 * i) % 1024 for i in range(8)]  # code2wav's input: 8 codes of its codebook
STREAMING = {"Generate", "FetchProfileFile", "StopProfileStream", "FetchSessionFile"}


# -- mutations ----------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, wire_type: int, rng: random.Random) -> bytes:
    """One field of `number` with `wire_type` and a random payload of that type."""
    tag = varint(number << 3 | wire_type)
    if wire_type == 0:
        return tag + varint(rng.choice([0, 1, -1, 2**31 - 1, 2**63, rng.getrandbits(64)]))
    if wire_type == 1:
        return tag + struct.pack("<d", rng.choice([float("nan"), float("inf"), -1e308, 2.5]))
    if wire_type == 5:
        return tag + struct.pack("<f", rng.choice([float("nan"), -1.0, 3.4e38, 2.5]))
    payload = rng.randbytes(rng.randrange(0, 40))
    return tag + varint(len(payload)) + payload


def mutate(base: bytes, numbers: list[int], rng: random.Random) -> bytes:
    """One random mutation of the valid message `base` (`numbers`: its fields' numbers)."""
    kind = rng.randrange(7)
    data = bytearray(base)
    if kind == 0 and data:  # flip a few bytes
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1 and data:  # cut short
        del data[rng.randrange(len(data)) :]
    elif kind == 2:  # random bytes inserted
        at = rng.randrange(len(data) + 1)
        data[at:at] = rng.randbytes(rng.randint(1, 16))
    elif kind == 3:  # a field of a random number and wire type
        data += field(rng.randint(1, 40), rng.choice([0, 1, 2, 5]), rng)
    elif kind == 4:  # a known field with a random, often wrong, wire type
        data += field(rng.choice(numbers), rng.choice([0, 1, 2, 5]), rng)
    elif kind == 5:  # bytes that are not a message at all
        data = bytearray(rng.randbytes(rng.randint(1, 64)))
    else:  # a wire type protobuf does not have (3, 4: groups; 6, 7: none)
        data += varint(rng.choice(numbers) << 3 | rng.choice([3, 4, 6, 7])) + b"\x01"
    return bytes(data)


def mutations(message: Message, count: int, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    base = message.SerializeToString()
    numbers = [f.number for f in message.DESCRIPTOR.fields] or [1, 2, 3]  # an empty one: any
    for _ in range(count):
        yield mutate(base, numbers, rng)


# -- calls --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    rpc: str
    body: bytes
    code: grpc.StatusCode
    details: str


def call_raw(channel: grpc.Channel, path: str, body: bytes) -> Outcome:
    """Send `body` as it is (identity serializers, so no client-side encoding)."""
    rpc = path.rsplit("/", 1)[-1]
    try:
        if rpc in STREAMING:
            for _ in channel.unary_stream(path)(body, timeout=CALL_TIMEOUT_S):
                pass
        else:
            channel.unary_unary(path)(body, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        return Outcome(rpc, body, exc.code(), exc.details() or "")
    return Outcome(rpc, body, grpc.StatusCode.OK, "")


def fuzz(
    channel: grpc.Channel,
    path: str,
    message: Message,
    *,
    count: int = MUTATIONS,
    send: Callable[[bytes], bool] = lambda body: True,
) -> list[Outcome]:
    """Every mutation's outcome; those `send` turns down are not sent."""
    seed = SEED * 1000 + sum(path.encode())
    return [call_raw(channel, path, body) for body in mutations(message, count, seed) if send(body)]


def forbidden(outcomes: list[Outcome]) -> list[str]:
    return [
        f"{o.rpc} {o.code.name}: {o.details[:200]} (body {o.body[:40].hex()})"
        for o in outcomes
        if o.code in FORBIDDEN
    ]


def still_serves(channel: grpc.Channel, generate: str, request: Message) -> None:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    replies = list(channel.unary_stream(generate)(request.SerializeToString(), timeout=60))
    assert replies, "the good Generate after the fuzz got no reply"


def stop_quietly(channel: grpc.Channel, path: str, request: Message) -> None:
    """Stop a session a mutation may have left running; none running is fine."""
    try:
        channel.unary_unary(path)(request.SerializeToString(), timeout=120)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()


# -- servers ------------------------------------------------------------------------------------


@dataclass
class Servers:
    stage: RunningStage
    orchestrator: ServerProcess


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """A torch code2wav stage with profiling on and an orchestrator over it, both this
    module's own, so that the profiling fuzz touches no other test's state."""
    tmp = tmp_path_factory.mktemp("fuzz")
    options = {"max_batch_size": 4, "max_wait_ms": 5, "num_threads": 1}
    process = ServerProcess(
        "stage 'code2wav'",
        stage_args(
            name="code2wav",
            engine="torch",
            model="examples.omni.code2wav:build",
            profiler_config={"torch_profiler_dir": str(tmp / "stage-profiles")},
            extra=["--engine-options", json.dumps(options), "--grace-seconds", "2"],
        ),
        log_path=tmp / "code2wav.log",
    )
    orchestrator = None
    try:
        stage = RunningStage(process, process.wait_serving(timeout=300), tmp / "stage-profiles")
        text = f"name: fuzz\nstages:\n  - name: code2wav\n    address: {stage.address}\n"
        orchestrator = serve_pipeline(tmp, "fuzz", text, extra=("--profile-dir", str(tmp / "r")))
        yield Servers(stage, orchestrator)
    finally:
        if orchestrator is not None:
            orchestrator.stop()
        process.stop()


def stage_generate() -> stage_pb2.GenerateRequest:
    return stage_pb2.GenerateRequest(
        request_id="fuzz", token_ids=CODES, sampling=common_pb2.SamplingParams(max_tokens=8)
    )


def test_fuzzed_stage_rpcs_answer_no_unknown_or_internal(servers: Servers) -> None:
    """The issue's 3,000 fuzz iterations gave UNKNOWN "Unexpected DecodeError"."""
    with grpc.insecure_channel(servers.stage.address) as channel:
        stub_stop = stage_pb2.StopProfileRequest()
        channel.unary_unary(STAGE + "StartProfile")(
            stage_pb2.StartProfileRequest(label="fuzz").SerializeToString(), timeout=60
        )
        list(channel.unary_stream(STAGE + "Generate")(stage_generate().SerializeToString()))
        stopped = stage_pb2.StopProfileResponse.FromString(
            channel.unary_unary(STAGE + "StopProfile")(stub_stop.SerializeToString(), timeout=120)
        )
        fetch = stage_pb2.FetchProfileFileRequest(
            session_id=stopped.session_id, name=stopped.files[0].name, chunk_size=64 << 10
        )
        outcomes = fuzz(channel, STAGE + "Generate", stage_generate())
        try:
            start = stage_pb2.StartProfileRequest(label="fuzz", max_iterations=2)
            outcomes += fuzz(channel, STAGE + "StartProfile", start)
            outcomes += fuzz(channel, STAGE + "StopProfile", stub_stop)
        finally:
            stop_quietly(channel, STAGE + "StopProfile", stub_stop)
        outcomes += fuzz(channel, STAGE + "FetchProfileFile", fetch)
        assert forbidden(outcomes) == []
        codes = {o.code for o in outcomes}
        assert grpc.StatusCode.INVALID_ARGUMENT in codes and grpc.StatusCode.OK in codes
        still_serves(channel, STAGE + "Generate", stage_generate())


def test_fuzzed_orchestrator_rpcs_answer_no_unknown_or_internal(servers: Servers) -> None:
    generate = orchestrator_pb2.PipelineRequest(
        request_id="fuzz",
        token_ids=CODES,
        sampling=common_pb2.SamplingParams(max_tokens=8),
        stage_sampling={"code2wav": common_pb2.SamplingParams(max_tokens=8)},
    )
    stop = orchestrator_pb2.PipelineStopProfileRequest(stages=["code2wav"], output_dir="fuzz")
    with grpc.insecure_channel(servers.orchestrator.address) as channel:
        channel.unary_unary(ORCHESTRATOR + "StartProfile")(
            orchestrator_pb2.PipelineStartProfileRequest(label="fuzz").SerializeToString(),
            timeout=60,
        )
        report = orchestrator_pb2.ProfileReport.FromString(
            channel.unary_unary(ORCHESTRATOR + "StopProfile")(stop.SerializeToString(), timeout=120)
        )
        outcomes = fuzz(channel, ORCHESTRATOR + "Generate", generate)
        try:
            start = orchestrator_pb2.PipelineStartProfileRequest(
                stages=["code2wav"], label="fuzz", max_iterations=2
            )
            outcomes += fuzz(channel, ORCHESTRATOR + "StartProfile", start)
            outcomes += fuzz(channel, ORCHESTRATOR + "StopProfile", stop)
            outcomes += fuzz(channel, ORCHESTRATOR + "StopProfileStream", stop)
        finally:
            stop_quietly(channel, ORCHESTRATOR + "StopProfile", stop)
        fetch = orchestrator_pb2.FetchSessionFileRequest(
            session_id=report.session_id, name="report.json"
        )
        outcomes += fuzz(channel, ORCHESTRATOR + "FetchSessionFile", fetch)
        assert forbidden(outcomes) == []
        assert grpc.StatusCode.INVALID_ARGUMENT in {o.code for o in outcomes}
        still_serves(channel, ORCHESTRATOR + "Generate", generate)


def asks_for_few_tokens(body: bytes) -> bool:
    """Whether a mutated request may go to the vLLM stage: it does not decode (the server
    refuses it before the engine), or it asks for at most VLLM_MAX_TOKENS tokens."""
    try:
        request: Any = stage_pb2.GenerateRequest.FromString(body)
    except DecodeError:
        return True
    sampling = request.sampling
    return (
        sampling.HasField("max_tokens")
        and sampling.max_tokens <= VLLM_MAX_TOKENS
        and len(body) < 200
    )


def test_fuzzed_vllm_generate_answers_no_unknown_or_internal(stage: RunningStage) -> None:
    request = stage_pb2.GenerateRequest(
        request_id="fuzz",
        prompt="Say hi.",
        sampling=common_pb2.SamplingParams(max_tokens=2, temperature=0.0, seed=1),
    )
    with grpc.insecure_channel(stage.address) as channel:
        outcomes = fuzz(
            channel,
            STAGE + "Generate",
            request,
            count=VLLM_MUTATIONS,
            send=asks_for_few_tokens,
        )
        assert len(outcomes) > VLLM_MUTATIONS // 2  # most mutations were sent
        assert forbidden(outcomes) == []
        still_serves(channel, STAGE + "Generate", request)


def test_the_mutations_are_seeded_and_mostly_undecodable() -> None:
    """The same seed gives the same mutations, so a failure is reproduced by rerunning."""
    message = stage_generate()
    first, again = list(mutations(message, 50, 1)), list(mutations(message, 50, 1))
    assert first == again and list(mutations(message, 50, 2)) != first
    undecodable = 0
    for body in first:
        try:
            stage_pb2.GenerateRequest.FromString(body)
        except DecodeError:
            undecodable += 1
    assert 10 < undecodable < 50  # both kinds reach the server
