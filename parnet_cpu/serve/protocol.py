"""uvicorn's HTTP/1.1 protocol plus a request-header timeout.

uvicorn times out idle keep-alive connections, but not a client that connects and then sends its request
line and headers slowly or never (slowloris): each such connection holds a socket, a slot under
`--max-connections`, and buffered bytes for as long as the client likes. This protocol closes a connection
whose request headers have not all arrived `header_timeout` seconds after its first byte could be sent
(the connection opening, or the first byte of a keep-alive connection's next request). The body has its
own limit (`--body-timeout`, in the app).
"""
from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def header_timeout_protocol(header_timeout: float) -> type[H11Protocol]:
    """An `H11Protocol` subclass (for `uvicorn.Config(http=...)`) closing connections whose headers are late."""

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._update_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._update_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _update_header_timer(self) -> None:
            """Armed once while a request's headers are incomplete (a total deadline, not per byte)."""
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            if waiting and self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout, self._header_timed_out)
            elif not waiting:
                self._cancel_header_timer()

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timed_out(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.logger.info("closing a connection whose request headers did not arrive within %g s",
                                 header_timeout)
                self.transport.close()

    return HeaderTimeoutH11Protocol
