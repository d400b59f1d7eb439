"""Running the HTTP API on uvicorn: addresses, the exposure rule, connection limits and timeouts.

`start_http_server` serves in a background thread (for `tinymorph lsp --http ADDR`), `serve` in the
foreground (for `tinymorph serve`). Both bind the socket themselves, so a busy port or a refused
address is an error in the caller rather than a silent death in a thread.

Connections are bounded, because a local model server must not be held hostage by idle sockets:
uvicorn closes a kept-alive connection after `timeout_keep_alive`, answers 503 past
`limit_concurrency`, and caps a request head at `h11_max_incomplete_event_size`. uvicorn has no
timeout for a request head that never finishes (a fresh connection that sends nothing, or a
byte every few seconds), so `HeaderTimeoutH11Protocol` adds one.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .addresses import is_loopback
from .http_api import create_app
from .runtime import Runtime

log = logging.getLogger(__name__)

TOKEN_ENV = "TINYMORPH_TOKEN"


@dataclass(frozen=True)
class ConnectionLimits:
    """uvicorn's per-connection bounds (seconds and counts)."""

    header_timeout_s: float = 10.0  # from connect (or the last response) to a complete request head
    keep_alive_s: int = 5  # idle between requests
    max_connections: int = 256  # open connections plus running requests; beyond: 503
    max_head_bytes: int = 16 * 1024  # request line and headers


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for a complete request head.

    The timer starts when the connection opens and again after each response; it closes the
    connection only while no request head has arrived (h11's `their_state` is IDLE), so a long
    running request or stream is never cut.
    """

    header_timeout_s: float = ConnectionLimits.header_timeout_s

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        if not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def protocol_class(limits: ConnectionLimits) -> type[H11Protocol]:
    return type("TinymorphH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": limits.header_timeout_s})


def parse_address(address: str, default_port: int = 8765) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` or ``:PORT`` → (host, port)."""
    address = address.strip()
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif address.count(":") == 1:
        host, _, port_text = address.partition(":")
    else:
        host, port_text = address, ""
    host = host or "127.0.0.1"
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ValueError(f"bad address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:8765") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"bad port {port} in {address!r}")
    return host, port


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to serve beyond loopback without a token."""
    if not is_loopback(host) and not token:
        raise ValueError(
            f"binding {host} exposes the model beyond this machine: set a token (--token or TINYMORPH_TOKEN)"
        )


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.create_server((host.strip("[]"), port), family=family, reuse_port=False)
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app: Any, limits: ConnectionLimits):
    import uvicorn

    config = uvicorn.Config(
        app,
        http=protocol_class(limits),
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=3,
        ws="none",
        timeout_keep_alive=limits.keep_alive_s,
        limit_concurrency=limits.max_connections,
        h11_max_incomplete_event_size=limits.max_head_bytes,
    )
    return uvicorn.Server(config)


def _app_for(runtime: Runtime, host: str, token: str | None, app_options: dict[str, Any]):
    # a loopback server without a token answers only Host headers naming loopback (DNS rebinding)
    return create_app(runtime, token, check_host=is_loopback(host) and not token, **app_options)


@dataclass
class HttpServerHandle:
    """A running API server; `stop()` cancels its generations and shuts uvicorn down."""

    host: str
    port: int
    app: Any
    server: Any
    thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.app.state.api.metrics.detach()


def start_http_server(
    runtime: Runtime,
    address: str,
    token: str | None = None,
    *,
    limits: ConnectionLimits | None = None,
    **app_options: Any,
) -> HttpServerHandle:
    """Serve the API for `runtime` on `address` ("HOST:PORT"; port 0 picks one) in a daemon thread.

    `token` defaults to $TINYMORPH_TOKEN, so `tinymorph lsp --http` honours it like `tinymorph serve`.
    `app_options` go to `create_app` (limits and timeouts).
    """
    token = token or os.environ.get(TOKEN_ENV) or None
    host, port = parse_address(address)
    check_exposure(host, token)
    sock = _bind(host, port)
    bound_port = sock.getsockname()[1]
    app = _app_for(runtime, host, token, app_options)
    server = _uvicorn_server(app, limits or ConnectionLimits())
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="tinymorph-http", daemon=True)
    thread.start()
    handle = HttpServerHandle(host.strip("[]"), bound_port, app, server, thread)
    deadline = time.monotonic() + 15  # started within seconds even on a busy machine, or the thread died
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        handle.stop(1)
        raise OSError(f"the HTTP server on {address} did not start")
    return handle


def serve(runtime: Runtime, host: str = "127.0.0.1", port: int = 8765, token: str | None = None) -> None:
    """Serve in the foreground until Ctrl-C (uvicorn handles the signals)."""
    check_exposure(host, token)
    sock = _bind(host, port)
    app = _app_for(runtime, host, token, {})
    server = _uvicorn_server(app, ConnectionLimits())
    log.warning("tinymorph HTTP API on http://%s:%d", host, sock.getsockname()[1])
    try:
        server.run(sockets=[sock])
    finally:
        app.state.api.metrics.detach()
        sock.close()
