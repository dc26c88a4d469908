"""TLS, mutual TLS and bearer tokens on real torch stages and an orchestrator, with certificates
made in the test (tests/pki.py).

Module-wide processes, started at once:
- `secure`: TLS, a token on the profiling RPCs, profiling on, and a plaintext health port;
- `mutual`: mutual TLS (client certificates signed by the test CA required);
- `locked`: plaintext, a token (from $OMNISTAGE_AUTH_TOKEN) on every RPC;
- an orchestrator over `secure` with TLS and a token on its own port, reaching the stage as
  `with-token` (the pipeline's security block) and as `tokenless` (a stage block without one).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import omnistage
from omnistage import errors
from omnistage.client import StageClient, make_request
from omnistage.launch import ServerProcess, health_status, stage_args
from omnistage.security import ClientSecurity, sync_channel
from omnistage.types import GenerateInput
from omnistage.v1 import orchestrator_pb2, orchestrator_pb2_grpc, stage_pb2, stage_pb2_grpc
from tests.pki import Pki, make_pki
from tests.servers import free_port

CODE2WAV = "examples.omni.code2wav:build"
TOKEN = "token-for-the-security-tests-7f3a"
MISSING_TOKEN = (
    "this server requires a bearer token for omnistage.v1.Stage/{}; "
    "pass --token-file or set OMNISTAGE_TOKEN"
)


def codes(count: int = 8) -> GenerateInput:
    return make_request(token_ids=[(7 * i) % 1024 for i in range(count)])


def audio_samples(client: StageClient, request: GenerateInput | None = None) -> int:
    deltas = list(client.generate(request or codes(), timeout=30))
    assert deltas[-1].finished
    return sum(len(d.tensor.data) for d in deltas if d.tensor is not None) // 4


@dataclass
class Files:
    pki: Pki
    token: Path
    wrong_token: Path


@dataclass
class Stages:
    secure: ServerProcess
    secure_health_port: int
    profiler_dir: Path
    mutual: ServerProcess
    locked: ServerProcess


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    folder = tmp_path_factory.mktemp("security")
    token, wrong = folder / "token", folder / "wrong-token"
    token.write_text(TOKEN + "\n")
    wrong.write_text("not-the-token\n")
    return Files(make_pki(folder / "pki"), token, wrong)


def trusting(files: Files, **more: Any) -> ClientSecurity:
    """Trusts the test CA; `more` adds a client certificate, a server name or a token."""
    return ClientSecurity(tls_ca=files.pki.ca, **more)


def _stage(
    name: str,
    logs: Path,
    *flags: str,
    security: ClientSecurity | None = None,
    env: dict[str, str] | None = None,
    profiler_dir: Path | None = None,
) -> ServerProcess:
    profiler = {"torch_profiler_dir": str(profiler_dir)} if profiler_dir else None
    args = stage_args(name=name, engine="torch", model=CODE2WAV, profiler_config=profiler)
    return ServerProcess(
        f"stage {name!r}",
        [*args, "--grace-seconds", "2", *flags],
        log_path=logs / f"{name}.log",
        env=env,
        security=security,
    )


@pytest.fixture(scope="module")
def stages(files: Files, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stages]:
    logs = tmp_path_factory.mktemp("security-logs")
    profiler_dir = tmp_path_factory.mktemp("security-profiles")
    pki, health_port = files.pki, free_port()
    tls = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    secure = _stage(
        "secure",
        logs,
        *tls,
        *("--auth-token-file", str(files.token), "--health-port", str(health_port)),
        security=trusting(files),
        profiler_dir=profiler_dir,
    )
    mutual = _stage(
        "mutual",
        logs,
        *tls,
        *("--tls-client-ca", str(pki.ca)),
        security=trusting(files, tls_cert=pki.client_cert, tls_key=pki.client_key),
    )
    locked = _stage("locked", logs, "--auth-scope", "all", env={"OMNISTAGE_AUTH_TOKEN": TOKEN})
    processes = [secure, mutual, locked]
    try:
        for process in processes:
            process.wait_serving(timeout=180)
        yield Stages(secure, health_port, profiler_dir, mutual, locked)
    finally:
        stoppers = [threading.Thread(target=p.stop) for p in processes]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()


@pytest.fixture(scope="module")
def orchestrator(
    files: Files, stages: Stages, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """TLS and a token on its own port; TLS to `secure`, with the token and without."""
    folder = tmp_path_factory.mktemp("secure-pipeline")
    (folder / "ca.pem").write_bytes(files.pki.ca.read_bytes())
    (folder / "stage-token").write_text(TOKEN)
    pipeline = folder / "pipeline.yaml"
    pipeline.write_text(
        "name: secure\n"
        "security: {tls_ca: ca.pem, token_file: stage-token}\n"  # relative to this file
        "stages:\n"
        f"  - {{name: with-token, address: '{stages.secure.address}'}}\n"
        f"  - name: tokenless\n    address: '{stages.secure.address}'\n"
        "    security: {tls_ca: ca.pem}\n"
    )
    pki = files.pki
    process = ServerProcess(
        "orchestrator",
        [
            *("orchestrator", "serve", "--pipeline", str(pipeline), "--port", "0"),
            *("--host", "127.0.0.1", "--tls-cert", str(pki.server_cert)),
            *("--tls-key", str(pki.server_key), "--auth-token-file", str(files.token)),
        ],
        log_path=folder / "orchestrator.log",
        security=trusting(files),
    )
    try:
        process.wait_serving(timeout=60)
        yield process
    finally:
        process.stop()


def omnistage_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "omnistage.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- TLS ----------------------------------------------------------------------------------------


def test_tls_generate_works_with_the_ca(files: Files, stages: Stages) -> None:
    with StageClient(stages.secure.address, security=trusting(files)) as client:
        assert audio_samples(client) == 8 * 480


def test_plaintext_client_to_tls_server_is_unavailable(stages: Stages) -> None:
    with (
        StageClient(stages.secure.address) as client,
        pytest.raises(errors.StageUnavailableError) as caught,
    ):
        audio_samples(client)
    assert caught.value.code == "UNAVAILABLE"
    assert "if the server uses TLS, pass the CA that signed its certificate" in str(caught.value)


def test_a_server_cert_from_another_ca_is_unavailable(files: Files, stages: Stages) -> None:
    untrusting = ClientSecurity(tls_ca=files.pki.rogue_ca)
    with (
        StageClient(stages.secure.address, security=untrusting) as client,
        pytest.raises(errors.StageUnavailableError),
    ):
        audio_samples(client)


def test_the_server_name_must_match_the_certificate(files: Files, stages: Stages) -> None:
    security = trusting(files, tls_server_name="somebody-else.example")
    with (
        StageClient(stages.secure.address, security=security) as client,
        pytest.raises(errors.StageUnavailableError),
    ):
        audio_samples(client)
    named = trusting(files, tls_server_name="localhost")
    with StageClient(stages.secure.address, security=named) as client:
        assert audio_samples(client) == 8 * 480


# -- mutual TLS ---------------------------------------------------------------------------------


def test_mtls_with_the_client_cert_works(files: Files, stages: Stages) -> None:
    pki = files.pki
    security = trusting(files, tls_cert=pki.client_cert, tls_key=pki.client_key)
    with StageClient(stages.mutual.address, security=security) as client:
        assert audio_samples(client) == 8 * 480


def test_mtls_without_a_client_cert_is_refused(files: Files, stages: Stages) -> None:
    with (
        StageClient(stages.mutual.address, security=trusting(files)) as client,
        pytest.raises(errors.StageUnavailableError),
    ):
        audio_samples(client)


def test_mtls_with_an_untrusted_client_cert_is_refused(files: Files, stages: Stages) -> None:
    pki = files.pki
    rogue = trusting(files, tls_cert=pki.rogue_client_cert, tls_key=pki.rogue_client_key)
    with (
        StageClient(stages.mutual.address, security=rogue) as client,
        pytest.raises(errors.StageUnavailableError),
    ):
        audio_samples(client)


# -- the bearer token ---------------------------------------------------------------------------


def test_profiling_rpcs_without_the_token_are_unauthenticated(files: Files, stages: Stages) -> None:
    with StageClient(stages.secure.address, security=trusting(files)) as client:
        with pytest.raises(errors.UnauthenticatedError) as start:
            client.start_profile(label="no-token")
        assert str(start.value).startswith(MISSING_TOKEN.format("StartProfile"))
        with pytest.raises(errors.UnauthenticatedError) as stop:
            client.stop_profile()
        assert str(stop.value).startswith(MISSING_TOKEN.format("StopProfile"))
    with sync_channel(stages.secure.address, trusting(files)) as channel:
        request = stage_pb2.FetchProfileFileRequest(session_id="any", name="any.txt")
        with pytest.raises(grpc.RpcError) as fetch:
            list(stage_pb2_grpc.StageStub(channel).FetchProfileFile(request, timeout=10))
    assert fetch.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert fetch.value.details() == MISSING_TOKEN.format("FetchProfileFile")


def test_a_wrong_token_is_rejected(files: Files, stages: Stages) -> None:
    wrong = trusting(files, token="not-the-token")
    with (
        StageClient(stages.secure.address, security=wrong) as client,
        pytest.raises(errors.UnauthenticatedError, match=r"^bearer token rejected"),
    ):
        client.start_profile()
    with sync_channel(stages.secure.address, wrong) as channel:
        request = stage_pb2.FetchProfileFileRequest(session_id="any", name="any.txt")
        with pytest.raises(grpc.RpcError) as fetch:
            list(stage_pb2_grpc.StageStub(channel).FetchProfileFile(request, timeout=10))
    assert (fetch.value.code(), fetch.value.details()) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "bearer token rejected",
    )
    assert "not-the-token" not in stages.secure.log_tail(200)
    assert TOKEN not in stages.secure.log_tail(200)


def test_profiling_with_the_token_works(files: Files, stages: Stages, tmp_path: Path) -> None:
    with StageClient(stages.secure.address, security=trusting(files), token=TOKEN) as client:
        session = client.start_profile(label="with-token")
        try:
            audio_samples(client)
        finally:
            manifest = client.stop_profile()
        assert manifest.session_id == session and manifest.files
        for item in manifest.files:
            written = client.fetch_file(session, item.name, tmp_path / item.name)
            assert written == item.size_bytes
    assert (stages.profiler_dir / session).is_dir()


def test_generate_info_and_health_stay_open_in_scope_profiling(
    files: Files, stages: Stages
) -> None:
    with StageClient(stages.secure.address, security=trusting(files)) as client:
        assert audio_samples(client) == 8 * 480
        assert client.info().profiling_enabled
    assert health_status(stages.secure.address, security=trusting(files)) == "SERVING"


def test_scope_all_refuses_generate_without_the_token_but_health_answers(
    stages: Stages,
) -> None:
    address = stages.locked.address
    with StageClient(address) as client:
        with pytest.raises(errors.UnauthenticatedError) as caught:
            audio_samples(client)
        assert "omnistage.v1.Stage/Generate" in str(caught.value)
        with pytest.raises(errors.UnauthenticatedError):
            client.info()
    assert health_status(address) == "SERVING"
    with StageClient(address, token=TOKEN) as client:
        assert audio_samples(client) == 8 * 480


def test_health_port_answers_in_plaintext_while_the_main_port_is_tls(stages: Stages) -> None:
    health_address = f"127.0.0.1:{stages.secure_health_port}"
    assert health_status(health_address) == "SERVING"
    assert health_status(stages.secure.address) == "UNAVAILABLE"  # plaintext to the TLS port
    with grpc.insecure_channel(health_address) as channel:  # health, and nothing else
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="omnistage.v1.Stage"), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:
            stage_pb2_grpc.StageStub(channel).GetInfo(stage_pb2.GetInfoRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- the orchestrator ---------------------------------------------------------------------------


def test_orchestrator_passes_the_token_to_stages(
    files: Files, stages: Stages, orchestrator: ServerProcess
) -> None:
    security = trusting(files, token=TOKEN)
    with omnistage.Client(orchestrator.address, security=security) as client:
        client.start_profile(stages=["with-token"], label="via-orchestrator")
        try:
            with StageClient(stages.secure.address, security=trusting(files)) as stage:
                audio_samples(stage)
        finally:
            report = client.stop_profile()
        info = client.pipeline()
    [result] = report.stages
    assert result.stage == "with-token" and result.ok, result.error
    assert result.files and all((Path(result.local_dir) / f.name).is_file() for f in result.files)
    assert [s.health for s in info.stages] == ["SERVING", "SERVING"]  # health over TLS


def test_a_pipeline_without_the_stage_token_gets_unauthenticated_naming_the_stage(
    files: Files, orchestrator: ServerProcess
) -> None:
    security = trusting(files, token=TOKEN)
    with (
        omnistage.Client(orchestrator.address, security=security) as client,
        pytest.raises(errors.UnauthenticatedError) as caught,
    ):
        client.start_profile(stages=["tokenless"])
    message = str(caught.value)
    assert message.startswith("stage 'tokenless'") and "requires a bearer token" in message


def test_orchestrator_profiling_needs_its_own_token(
    files: Files, orchestrator: ServerProcess
) -> None:
    with (
        omnistage.Client(orchestrator.address, security=trusting(files)) as client,
        pytest.raises(errors.UnauthenticatedError) as caught,
    ):
        client.start_profile()
    assert "omnistage.v1.Orchestrator/StartProfile" in str(caught.value)


@pytest.mark.parametrize(
    ("method", "call"),
    [
        ("ListSessions", lambda c: c.sessions()),
        ("FetchSessionFile", lambda c: c.fetch_session("20261201T000000Z-x-000000", "unused")),
        ("DeleteSession", lambda c: c.delete_session("20261201T000000Z-x-000000")),
        ("StopProfileStream", lambda c: c.stop_profile(progress=lambda event: None)),
    ],
)
def test_the_orchestrators_session_files_need_its_token_and_tls(
    files: Files, orchestrator: ServerProcess, method: str, call: Any, tmp_path: Path
) -> None:
    with omnistage.Client(orchestrator.address, security=trusting(files)) as client:
        with pytest.raises(errors.UnauthenticatedError) as caught:
            call(client)
        # fetch_session lists the sessions first, so it is refused at ListSessions
        first = "ListSessions" if method == "FetchSessionFile" else method
        assert f"omnistage.v1.Orchestrator/{first}" in str(caught.value)
    with (
        omnistage.Client(orchestrator.address) as plaintext,  # no TLS: nothing gets through
        pytest.raises(errors.StageUnavailableError),
    ):
        plaintext.sessions()
    token = files.token.read_text().strip()
    with omnistage.Client(orchestrator.address, security=trusting(files, token=token)) as client:
        assert client.sessions().profile_root.endswith("profiles")  # with both, it answers


def test_fetch_session_file_needs_the_token(files: Files, orchestrator: ServerProcess) -> None:
    request = orchestrator_pb2.FetchSessionFileRequest(
        session_id="20261201T000000Z-x-000000", name="report.json"
    )
    with sync_channel(orchestrator.address, trusting(files)) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.FetchSessionFile(request, timeout=30))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "omnistage.v1.Orchestrator/FetchSessionFile" in str(caught.value.details())


# -- the command line ---------------------------------------------------------------------------


def test_cli_health_status_and_profile_with_tls_ca_and_token_file(
    files: Files, orchestrator: ServerProcess
) -> None:
    address, ca = orchestrator.address, str(files.pki.ca)
    assert omnistage_cli("health", address).returncode == 1
    healthy = omnistage_cli("health", address, "--tls-ca", ca)
    assert healthy.returncode == 0 and "SERVING" in healthy.stdout, healthy.stderr
    status = omnistage_cli("status", "--address", address, "--tls-ca", ca)
    assert status.returncode == 0 and status.stdout.count("SERVING") == 2, status.stderr

    refused = omnistage_cli("profile", "start", "--address", address, "--tls-ca", ca)
    assert refused.returncode == 2 and "requires a bearer token" in refused.stderr
    wrong = omnistage_cli(
        *("profile", "start", "--address", address, "--tls-ca", ca),
        *("--token-file", str(files.wrong_token)),
    )
    assert wrong.returncode == 2 and "bearer token rejected" in wrong.stderr
    secured = ("--address", address, "--tls-ca", ca, "--token-file", str(files.token))
    started = omnistage_cli("profile", "start", "--stages", "with-token", *secured)
    assert started.returncode == 0, started.stderr
    stopped = omnistage_cli("profile", "stop", *secured)
    assert stopped.returncode == 0, stopped.stderr
    assert "with-token" in stopped.stdout and " ok " in stopped.stdout


def test_a_missing_cert_file_is_a_clear_startup_error(files: Files, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    result = omnistage_cli(
        *stage_args(name="nocert", engine="torch", model=CODE2WAV),
        *("--tls-cert", str(missing), "--tls-key", str(files.pki.server_key)),
    )
    assert result.returncode == 2
    assert f"--tls-cert: cannot read {str(missing)!r}: No such file" in result.stderr
