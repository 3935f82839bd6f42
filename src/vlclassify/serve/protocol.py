"""uvicorn's HTTP/1.1 protocol (h11) with the connection limits uvicorn lacks, for `vlclassify serve`.

uvicorn alone lets an idle socket starve the server: a connection that never sends a request has
no timer (its keep-alive timer starts only after a first answer), and its `limit_concurrency`
counts open sockets, so 191 idle ones turned every request, `/healthz` included, into a plain-text
503. This protocol adds, per connection:

- a header-read timeout: the request line and headers must be complete within `header_timeout`
  seconds of the connection opening, or of the previous answer; otherwise the socket is closed.
  It is not reset by data, so a client trickling one header byte at a time (slowloris) is cut too;
- a cap on open sockets (`max_connections`): one past it gets a JSON 503 with `Retry-After` and
  is closed at once (the file descriptors stay bounded);
- uvicorn's own "Invalid HTTP request" 400 as one JSON line;
- a draining shutdown (SIGTERM): the request in progress and requests already pipelined behind it
  on the same connection are answered, the last of them with `Connection: close`.

The limit on requests in progress (not sockets) is the app's (`app.Guard`). The settings come
from the uvicorn `Config` attribute `vlclassify_limits` (a `ConnectionLimits`), which travels to
`--workers` processes with the config.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import CLOSE_HEADER
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

log = logging.getLogger("vlclassify.serve")


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-socket limits of the served HTTP protocol (see the module docstring)."""

    header_timeout: float = 10.0  # seconds to send a request's line and headers
    max_connections: int = 1000  # open sockets per process; more get a JSON 503 and are closed


def error_body(status: int, code: str, message: str, detail: str) -> bytes:
    """The one-line JSON error body every refusal carries (the app's and this protocol's)."""
    return json.dumps({"code": code, "message": message, "detail": detail}).encode()


def _raw_response(status: int, reason: str, body: bytes, extra: str = "") -> bytes:
    """A complete HTTP/1.1 response that closes the connection, written before h11 has a request."""
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"connection: close\r\n{extra}\r\n"
    )
    return head.encode("latin-1") + body


class ServeProtocol(H11Protocol):
    """uvicorn's h11 protocol plus the header-read timeout, the socket cap, JSON errors and draining."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits: ConnectionLimits = getattr(config, "vlclassify_limits", ConnectionLimits())
        self.header_timer: asyncio.TimerHandle | None = None
        self.draining = False

    # ---- the header-read timeout -------------------------------------------------------------
    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self.header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _header_timeout(self) -> None:
        self.header_timer = None
        if not self.transport.is_closing():
            self.transport.close()  # nothing to answer: no request was ever complete

    def _waiting_for_request(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    # ---- the protocol interface ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Count the socket; past the cap answer 503 at once; else start the header timer."""
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            body = error_body(
                503,
                "busy",
                "The service is busy. Please try again in a moment.",
                f"{len(self.connections) - 1} connections are open (the limit is {self.limits.max_connections})",
            )
            transport.write(_raw_response(503, "Service Unavailable", body, "retry-after: 1\r\n"))
            transport.close()
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the header timer with the socket."""
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed h11; once a request's headers are complete, its timer stops."""
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:
            self._request_started()

    def on_response_complete(self) -> None:
        """After an answer: run a pipelined request, or wait for the next one (header timer), or
        close when draining."""
        before = self.cycle
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.cycle is not before:
            self._request_started()
        elif self.draining:
            self.transport.close()
        else:
            self._arm_header_timer()

    def _request_started(self) -> None:
        self._cancel_header_timer()
        if self.draining:
            self._close_after_this_one()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse, as one JSON line."""
        self._cancel_header_timer()
        body = error_body(400, "bad_request", "The request was not understood.", msg)
        event = h11.Response(
            status_code=400,
            headers=[
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                CLOSE_HEADER,
            ],
            reason=b"Bad Request",
        )
        try:
            self.transport.write(self.conn.send(event) or b"")
            self.transport.write(self.conn.send(h11.Data(data=body)) or b"")
            self.transport.write(self.conn.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:  # h11 is already in its error state: write the bytes ourselves
            self.transport.write(_raw_response(400, "Bad Request", body))
        self.transport.close()

    # ---- draining (uvicorn calls shutdown() on every connection at SIGTERM) ----------------------
    def shutdown(self) -> None:
        """Answer what was received, then close: idle sockets close now; a request in progress is
        answered, and so are the requests pipelined behind it, the last with `Connection: close`."""
        self.draining = True
        self._cancel_header_timer()
        if self._waiting_for_request() and not self._pipelined():
            super().shutdown()
            return
        if not self._waiting_for_request():
            self._close_after_this_one()

    def _pipelined(self) -> bool:
        """Whether bytes of a next request already wait in h11's buffer."""
        data, _closed = self.conn.trailing_data
        return bool(data)

    def _close_after_this_one(self) -> None:
        """Mark the current request's answer `Connection: close` unless another request waits
        behind it (it will be answered, and marked, in turn). uvicorn adds the header when the
        request's own headers carry it: that is the hook used here."""
        if self._pipelined() or self.cycle is None:
            return
        headers = self.cycle.scope["headers"]
        if CLOSE_HEADER not in headers:
            headers.append(CLOSE_HEADER)  # type: ignore[attr-defined]
