"""Engine adapters behind one `Engine` protocol. Engines never import grpc."""

from __future__ import annotations

from services.engines.base import Engine

__all__ = ["Engine"]
