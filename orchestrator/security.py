"""The pipeline file's `security:` blocks: how the orchestrator connects to its stages.

A top-level block applies to every stage; a stage's own block replaces it for that stage
(`security: {}` connects to that stage in plaintext, without a token). Paths are relative to
the pipeline file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, model_validator

from omnistage.security import ClientSecurity, SecurityConfigError, read_token

if TYPE_CHECKING:
    from orchestrator.config import PipelineConfig


class StageSecurityConfig(BaseModel):
    """TLS, mTLS and the bearer token for the orchestrator's connections to stages."""

    model_config = ConfigDict(extra="forbid")

    tls: bool = Field(
        default=False, description="TLS with the system's roots; implied by tls_ca and the rest."
    )
    tls_ca: str | None = Field(default=None, min_length=1, description="PEM CA that signed stages.")
    tls_cert: str | None = Field(default=None, min_length=1, description="mTLS: client cert PEM.")
    tls_key: str | None = Field(default=None, min_length=1, description="mTLS: its key PEM.")
    tls_server_name: str | None = Field(
        default=None, min_length=1, description="The name the stages' certificates carry."
    )
    token_file: str | None = Field(
        default=None, min_length=1, description="A file holding the stages' bearer token."
    )
    token_env: str | None = Field(
        default=None, min_length=1, description="An environment variable holding the token."
    )

    @model_validator(mode="after")
    def _check(self) -> StageSecurityConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.token_file is not None and self.token_env is not None:
            raise ValueError("set token_file or token_env, not both")
        return self


def stage_client_security(pipeline: PipelineConfig, index: int) -> ClientSecurity | None:
    """The ClientSecurity for stage `index`: its own block, else the pipeline's, else None.

    Reads the token and checks every file now, so a wrong path stops the orchestrator at
    start-up with the file and key path that named it.
    """
    stage = pipeline.stages[index]
    if stage.security is not None:
        block, key = stage.security, f"stages[{index}].security"
    elif pipeline.security is not None:
        block, key = pipeline.security, "security"
    else:
        return None
    origin = f"{pipeline.source}: {key}" if pipeline.source is not None else key
    path = pipeline.resolve_path
    token = read_token(
        path(block.token_file) if block.token_file else None,
        env=block.token_env,
        label=f"{origin}.{'token_file' if block.token_file else 'token_env'}",
    )
    if block.token_env and token is None:
        raise SecurityConfigError(
            f"{origin}.token_env: environment variable {block.token_env} is not set"
        )
    return ClientSecurity(
        tls_ca=path(block.tls_ca) if block.tls_ca else None,
        tls_cert=path(block.tls_cert) if block.tls_cert else None,
        tls_key=path(block.tls_key) if block.tls_key else None,
        tls_server_name=block.tls_server_name,
        token=token,
        use_tls=block.tls,
        origin=origin,
    )
