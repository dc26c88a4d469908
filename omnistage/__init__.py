"""omnistage: multi-stage model pipelines as gRPC microservices, profiled across stages."""

from __future__ import annotations

__version__ = "0.1.0"

from omnistage.client import AsyncClient, AsyncStageClient, Client, StageClient
from omnistage.security import ClientSecurity

__all__ = [
    "AsyncClient",
    "AsyncStageClient",
    "Client",
    "ClientSecurity",
    "StageClient",
    "__version__",
]
