"""Stage addresses in a pipeline file: `host:port`, `[v6]:port`, or `dns:///name:port` for
every address a name resolves to."""

from __future__ import annotations

# An address that stands for every address its name resolves to, each a replica (gRPC's form).
DNS_SCHEME = "dns:///"


def split_host_port(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); ValueError says what is wrong."""
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{address!r} has no port; write host:port")
    if not (port.isascii() and port.isdecimal() and 0 < int(port) < 65536):
        raise ValueError(f"{address!r}: the port must be 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    """(host, port) -> `host:port`, or `[v6]:port` for an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def address_problems(address: str) -> list[str]:
    """What is wrong with `address`, if anything, each said so that it can be fixed."""
    plain = address.removeprefix(DNS_SCHEME)
    if "://" in plain or plain.startswith("dns:"):
        return [
            f"{address!r}: write host:port, or {DNS_SCHEME}name:port for every address of a name"
        ]
    try:
        split_host_port(plain)
    except ValueError as exc:
        return [str(exc)]
    return []
