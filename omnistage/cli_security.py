"""The command line's security flags: one set for servers, one for clients."""

from __future__ import annotations

import argparse

from omnistage.security import (
    AUTH_SCOPES,
    CLIENT_TOKEN_ENV,
    FLAGS_ORIGIN,
    SERVER_TOKEN_ENV,
    ClientSecurity,
    ServerSecurity,
    read_token,
)


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """`stage serve` and `orchestrator serve`: TLS, mTLS, the token and the health port."""
    group = parser.add_argument_group("security")
    group.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain")
    group.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    group.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="mutual TLS: require client certificates signed by this CA",
    )
    group.add_argument(
        "--auth-token-file",
        metavar="FILE",
        help=f"require this bearer token (default: ${SERVER_TOKEN_ENV}, if set)",
    )
    group.add_argument(
        "--auth-scope",
        choices=AUTH_SCOPES,
        default="profiling",
        help="which RPCs need the token: the profiling ones (default) or all; health never",
    )
    group.add_argument(
        "--health-port",
        type=int,
        default=None,
        metavar="N",
        help="also serve only the health service, in plaintext, on port N (for probes)",
    )


def server_security(args: argparse.Namespace) -> ServerSecurity:
    return ServerSecurity(
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        token=read_token(args.auth_token_file, env=SERVER_TOKEN_ENV, label="--auth-token-file"),
        auth_scope=args.auth_scope,
        origin=FLAGS_ORIGIN,
    )


def add_client_flags(parser: argparse.ArgumentParser) -> None:
    """Every command that calls a server: how to trust it, and the token to send."""
    group = parser.add_argument_group("security")
    group.add_argument("--tls", action="store_true", help="TLS, trusting the system's roots")
    group.add_argument("--tls-ca", metavar="PEM", help="TLS, trusting this CA")
    group.add_argument("--tls-cert", metavar="PEM", help="mutual TLS: this client certificate")
    group.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    group.add_argument(
        "--tls-server-name", metavar="NAME", help="the name the server's certificate carries"
    )
    group.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"send this bearer token (default: ${CLIENT_TOKEN_ENV}, if set)",
    )


def client_security(args: argparse.Namespace) -> ClientSecurity:
    return ClientSecurity(
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_server_name=args.tls_server_name,
        token=read_token(args.token_file, env=CLIENT_TOKEN_ENV, label="--token-file"),
        use_tls=args.tls,
        origin=FLAGS_ORIGIN,
    )
