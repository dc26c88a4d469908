"""The server kit every omnistage gRPC server is built from: `GrpcServer` (health,
reflection, TLS, the auth and error interceptors) and the serve loop."""

from omnistage.server.errors import Context, ErrorInterceptor, abort_for, status_code
from omnistage.server.grpc_server import GrpcServer, serve_until_signalled

__all__ = [
    "Context",
    "ErrorInterceptor",
    "GrpcServer",
    "abort_for",
    "serve_until_signalled",
    "status_code",
]
