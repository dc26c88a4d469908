"""Security settings: validated when made, files checked at start-up, errors that name the flag
or the pipeline key, tokens that never show; and which RPCs the token guards."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import pytest

from omnistage import cli_security
from omnistage.security import (
    ClientSecurity,
    SecurityConfigError,
    ServerSecurity,
    read_token,
)
from omnistage.server.auth import presented_token, protects
from orchestrator.config import PipelineConfigError, load_pipeline, parse_pipeline
from orchestrator.security import stage_client_security
from services.config import StageConfig
from tests.pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def parse_server_flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli_security.add_server_flags(parser)
    return parser.parse_args(argv)


def parse_client_flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli_security.add_client_flags(parser)
    return parser.parse_args(argv)


# -- servers ------------------------------------------------------------------------------------


def test_server_cert_without_key_names_both_flags(pki: Pki) -> None:
    with pytest.raises(SecurityConfigError, match="--tls-cert and --tls-key go together"):
        cli_security.server_security(parse_server_flags("--tls-cert", str(pki.server_cert)))


def test_client_ca_needs_the_servers_own_cert(pki: Pki) -> None:
    with pytest.raises(SecurityConfigError, match=r"--tls-client-ca \(mutual TLS\) needs"):
        cli_security.server_security(parse_server_flags("--tls-client-ca", str(pki.ca)))


def test_missing_cert_file_names_the_flag_and_path(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    flags = parse_server_flags("--tls-cert", str(missing), "--tls-key", str(pki.server_key))
    with pytest.raises(SecurityConfigError) as caught:
        cli_security.server_security(flags)
    assert (
        str(caught.value) == f"--tls-cert: cannot read {str(missing)!r}: No such file or directory"
    )


def test_empty_key_file_is_refused(pki: Pki, tmp_path: Path) -> None:
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    with pytest.raises(SecurityConfigError, match=r"tls_key: .*empty\.key' is empty"):
        ServerSecurity(tls_cert=pki.server_cert, tls_key=empty)


def test_server_token_from_file_else_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pki: Pki
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  from-file \n")
    monkeypatch.setenv("OMNISTAGE_AUTH_TOKEN", "from-env")
    security = cli_security.server_security(
        parse_server_flags("--auth-token-file", str(token_file))
    )
    assert security.token == "from-file" and security.auth_scope == "profiling"
    security = cli_security.server_security(parse_server_flags("--auth-scope", "all"))
    assert security.token == "from-env" and security.auth_scope == "all"
    monkeypatch.delenv("OMNISTAGE_AUTH_TOKEN")
    assert cli_security.server_security(parse_server_flags()).token is None


def test_empty_token_env_is_an_error_not_open_access(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNISTAGE_AUTH_TOKEN", " ")
    with pytest.raises(SecurityConfigError, match=r"\$OMNISTAGE_AUTH_TOKEN is set but empty"):
        cli_security.server_security(parse_server_flags())


def test_missing_token_file_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(SecurityConfigError, match="--auth-token-file: cannot read"):
        read_token(tmp_path / "absent", env=None, label="--auth-token-file")


def test_tokens_never_show_in_reprs(pki: Pki) -> None:
    server = ServerSecurity(tls_cert=pki.server_cert, tls_key=pki.server_key, token="s3cret")
    config = StageConfig(name="s", model="m", security=server)
    client = ClientSecurity(tls_ca=pki.ca, token="s3cret")
    for text in (repr(server), repr(config), str(config), repr(client), server.describe()):
        assert "s3cret" not in text
    assert server.describe() == "TLS, bearer token on profiling RPCs"


def test_bad_auth_scope_is_refused() -> None:
    with pytest.raises(SecurityConfigError, match="auth_scope must be one of profiling, all"):
        ServerSecurity(token="t", auth_scope="everything")  # type: ignore[arg-type]


def test_health_port_is_validated() -> None:
    with pytest.raises(ValueError, match="health_port"):
        StageConfig(name="s", model="m", health_port=70000)


# -- clients ------------------------------------------------------------------------------------


def test_client_tls_is_implied_by_any_tls_setting(pki: Pki) -> None:
    assert not ClientSecurity(token="t").tls
    assert ClientSecurity(tls_ca=pki.ca).tls
    assert ClientSecurity(use_tls=True).tls
    named = ClientSecurity(tls_server_name="stage.internal")
    assert named.tls and ("grpc.ssl_target_name_override", "stage.internal") in (
        named.channel_options()
    )


def test_client_flags_and_token_env(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMNISTAGE_TOKEN", "env-token")
    security = cli_security.client_security(parse_client_flags("--tls-ca", str(pki.ca)))
    assert security.tls and security.token == "env-token"
    with pytest.raises(SecurityConfigError, match="--tls-cert and --tls-key go together"):
        cli_security.client_security(parse_client_flags("--tls-key", str(pki.client_key)))
    with pytest.raises(SecurityConfigError, match="--tls-ca: cannot read"):
        cli_security.client_security(parse_client_flags("--tls-ca", str(tmp_path / "x.pem")))


# -- which RPCs the token guards ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "profiling", "all_"),
    [
        ("/omnistage.v1.Stage/StartProfile", True, True),
        ("/omnistage.v1.Stage/StopProfile", True, True),
        ("/omnistage.v1.Stage/FetchProfileFile", True, True),
        ("/omnistage.v1.Orchestrator/StartProfile", True, True),
        ("/omnistage.v1.Orchestrator/StopProfile", True, True),
        ("/omnistage.v1.Stage/Generate", False, True),
        ("/omnistage.v1.Stage/GetInfo", False, True),
        ("/omnistage.v1.Orchestrator/Generate", False, True),
        ("/omnistage.v1.Orchestrator/GetPipeline", False, True),
        ("/grpc.health.v1.Health/Check", False, False),
        ("/grpc.health.v1.Health/Watch", False, False),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", False, False),
    ],
)
def test_protected_methods(method: str, profiling: bool, all_: bool) -> None:
    assert (protects(method, "profiling"), protects(method, "all")) == (profiling, all_)


def test_presented_token() -> None:
    assert presented_token((("authorization", "Bearer abc"),)) == "abc"
    assert presented_token((("Authorization", "bearer  abc "),)) == "abc"
    assert presented_token((("authorization", "Basic abc"),)) == ""
    assert presented_token((("x-other", "1"),)) is None
    assert presented_token(None) is None


# -- the pipeline file's security blocks --------------------------------------------------------


def test_pipeline_security_applies_to_every_stage_and_a_stage_block_replaces_it(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "certs").mkdir()
    for source in (pki.ca, pki.client_cert, pki.client_key):
        (tmp_path / "certs" / source.name).write_bytes(source.read_bytes())
    (tmp_path / "token").write_text("pipeline-token\n")
    monkeypatch.setenv("C_TOKEN", "c-token")
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            security:
              tls_ca: certs/ca.pem
              tls_cert: certs/client.pem
              tls_key: certs/client.key
              tls_server_name: localhost
              token_file: token
            stages:
              - name: a
                address: h:1
              - name: b
                address: h:2
                security: {}
              - name: c
                address: h:3
                security: {tls: true, token_env: C_TOKEN}
            """
        )
    )
    pipeline = load_pipeline(path)
    a, b, c = (stage_client_security(pipeline, i) for i in range(3))
    assert a == ClientSecurity(
        tls_ca=tmp_path / "certs" / "ca.pem",
        tls_cert=tmp_path / "certs" / "client.pem",
        tls_key=tmp_path / "certs" / "client.key",
        tls_server_name="localhost",
        token="pipeline-token",
    )
    assert b == ClientSecurity() and not b.tls
    assert c is not None and c.tls and c.tls_ca is None and c.token == "c-token"


def test_no_security_block_means_plaintext() -> None:
    pipeline = parse_pipeline("stages:\n  - {name: a, address: h:1}\n")
    assert stage_client_security(pipeline, 0) is None


def test_security_block_problems_name_line_and_key_path() -> None:
    text = textwrap.dedent(
        """\
        stages:
          - name: a
            address: h:1
            security:
              tls_cert: c.pem
          - name: b
            address: h:2
            security:
              token_file: t
              token_env: T
        security:
          tls_cafile: ca.pem
        """
    )
    with pytest.raises(PipelineConfigError) as caught:
        parse_pipeline(text, source="pipeline.yaml")
    problems = caught.value.problems
    assert problems[0] == (
        "pipeline.yaml:4: stages[0].security: "
        "tls_cert and tls_key go together: give both or neither"
    )
    assert (
        problems[1] == "pipeline.yaml:8: stages[1].security: set token_file or token_env, not both"
    )
    assert problems[2].startswith(
        "pipeline.yaml:12: security.tls_cafile: unknown key; did you mean"
    )
    assert "'tls_ca'" in problems[2]


def test_a_missing_file_of_the_pipeline_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("stages:\n  - {name: a, address: h:1, security: {tls_ca: ca.pem}}\n")
    with pytest.raises(SecurityConfigError) as caught:
        stage_client_security(load_pipeline(path), 0)
    assert str(caught.value).startswith(
        f"{path.resolve()}: stages[0].security.tls_ca: cannot read {str(tmp_path / 'ca.pem')!r}"
    )


def test_a_missing_token_env_of_the_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    pipeline = parse_pipeline(
        "security: {token_env: NO_SUCH_TOKEN}\nstages: [{name: a, address: h:1}]\n"
    )
    with pytest.raises(SecurityConfigError, match=r"security\.token_env: environment variable"):
        stage_client_security(pipeline, 0)
