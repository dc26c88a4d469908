"""omnistage: multi-stage model pipelines as gRPC microservices, profiled across stages.

The clients are imported on first use (PEP 562), so `import omnistage.traces` or an engine's
`import omnistage.types` does not load grpc.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "AsyncClient": "omnistage.client",
    "AsyncStageClient": "omnistage.stage_client",
    "Client": "omnistage.client",
    "StageClient": "omnistage.stage_client",
    "ClientSecurity": "omnistage.security",
}

if TYPE_CHECKING:
    from omnistage.client import AsyncClient, Client
    from omnistage.security import ClientSecurity
    from omnistage.stage_client import AsyncStageClient, StageClient

__all__ = [
    "AsyncClient",
    "AsyncStageClient",
    "Client",
    "ClientSecurity",
    "StageClient",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'omnistage' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
