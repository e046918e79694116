"""Whether the server could listen where it is asked to: checked before the model loads (light: no model
libraries imported here)."""

from __future__ import annotations

from ownllm.errors import OwnLLMError


def check_listenable(host: str, port: int) -> None:
    """Refuse at once (before a model loads) an address the server could not listen on: a host that does not
    resolve, an address not of this machine, a port in use. Each address `host` resolves to is bound as uvicorn will
    bind it (SO_REUSEADDR) and let go; the server binds for real once loaded, and says so if it then cannot."""
    import errno
    import socket

    shown = host if host.isprintable() and host else repr(host)  # (control characters, or nothing: quoted)
    shown = shown if len(shown) <= 80 else f"{shown[:77]}..."
    where = host_port(shown, port)
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise OwnLLMError(f"cannot listen on {shown}: the host does not resolve ({exc})", kind="resource",
                          param="host") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                why = {errno.EADDRINUSE: "the port is in use", errno.EACCES: "a port below 1024 needs privileges",
                       errno.EADDRNOTAVAIL: "not an address of this machine"}.get(exc.errno or 0, exc.strerror)
                raise OwnLLMError(f"cannot listen on {where}: {why}", kind="resource", param="port") from None


def host_port(host: str, port: int) -> str:
    """HOST:PORT, an IPv6 host in brackets (as a URL, and an error line, must have it)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def http_address(host: str, port: int) -> str:
    """http://HOST:PORT (`host_port`)."""
    return f"http://{host_port(host, port)}"


def browser_url(host: str, port: int) -> str:
    """The address a browser on this machine opens for a server listening on `host`:`port`."""
    return http_address({"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host), port) + "/"
