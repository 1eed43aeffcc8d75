"""uvicorn's HTTP/1.1 protocol with the server's connection guards, and the log's flood guard.

- Request-header timeout. uvicorn times out idle keep-alive connections, but not a client that connects and
  then sends its request line and headers slowly or never (slowloris): each such connection holds a socket,
  a slot under `--max-connections`, and buffered bytes for as long as the client likes. A connection whose
  request headers have not all arrived `header_timeout` seconds after its first byte could be sent (the
  connection opening, or the first byte of a keep-alive connection's next request) is closed. The body has
  its own limit (`--body-timeout`, in the app).
- Connections within the file-descriptor limit. Every connection is a descriptor; past RLIMIT_NOFILE
  `accept()` fails, asyncio logs a traceback per failed accept (thousands a second) and nothing is answered.
  `connection_budget` reads the limit at start-up (raising the soft limit toward the hard one as far as
  `--max-connections` needs) and caps the connections below it: requests on connections beyond the cap are
  answered 503, and connections beyond a small margin above it are closed as soon as they are accepted, so
  `accept()` always has a descriptor and the server answers again the moment clients go.
- JSON errors. The errors the HTTP layer makes itself (an invalid request: 400; over the connection cap:
  503; an app that fails before answering, or a request still running when `--graceful-timeout` runs out:
  500) are `{"error": ...}` like the app's, never uvicorn's plain text.
- `RepeatFilter`: identical warnings and errors (a failing accept, a client sending garbage) are logged a few
  times per interval, then counted and summarised in one line: a flood cannot fill the disk.
"""
from __future__ import annotations

import asyncio
import logging
import os
import resource
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from parnet_cpu.serve.v2 import error_response

__all__ = ["ConnectionBudget", "FD_RESERVE", "RepeatFilter", "connection_budget", "open_descriptors",
           "server_protocol"]

# Descriptors kept free beyond those open at start-up and those of connections: the event loop's own, a
# restarted runtime's pipes, lease and cache files, multipart uploads spooled to temporary files.
FD_RESERVE = 16
# asyncio accepts up to `backlog` connections per loop iteration before any of them reaches the protocol, and
# a connection refused there holds its descriptor for two more iterations (closing takes effect on the next):
# accepted-but-not-yet-closed connections can hold up to ACCEPT_ITERATIONS * backlog descriptors.
ACCEPT_ITERATIONS = 3
MAX_BACKLOG = 2048  # uvicorn's default


@dataclass(frozen=True)
class ConnectionBudget:
    """How many connections this process can hold, from RLIMIT_NOFILE (logged at start-up)."""

    max_connections: int  # requests on connections beyond this answer 503
    max_open: int  # connections beyond this are closed as soon as they are accepted
    backlog: int  # listen() queue, and connections asyncio accepts per loop iteration
    asked: int  # --max-connections
    fd_soft_limit: int | None  # None: unlimited
    fd_hard_limit: int | None
    fds_in_use: int  # at start-up, the runtime loaded
    fd_reserve: int
    fd_soft_limit_raised_from: int | None  # the soft limit before start-up raised it (None: unchanged)

    def describe(self) -> dict:
        return asdict(self)


def open_descriptors() -> int:
    """File descriptors this process has open now."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder)) - 1  # less the one listdir itself opened
        except OSError:
            continue
    return 0


def _limit(value: int) -> int | None:
    return None if value == resource.RLIM_INFINITY else value


def connection_budget(asked: int, reserve: int = FD_RESERVE) -> ConnectionBudget:
    """The connection cap and accept backlog under the descriptor limit, measured now (call it once the
    runtime is loaded): open connections, connections being refused and the accept burst all fit, so
    `accept()` never runs out. The soft limit is raised toward the hard one as far as `asked` connections
    need; when even the hard limit is lower, the backlog and then the cap are lowered to fit. ValueError when
    no connection fits at all."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = open_descriptors()
    spare = max(1, min(64, asked // 8))  # connections beyond the cap that are still answered (503)
    need = in_use + reserve + asked + spare + ACCEPT_ITERATIONS * MAX_BACKLOG
    raised_from = None
    if _limit(soft) is not None and soft < need:
        target = need if _limit(hard) is None else min(need, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                raised_from, soft = soft, target
            except (ValueError, OSError):
                pass
    room = need - in_use - reserve if _limit(soft) is None else soft - in_use - reserve
    backlog = max(1, min(MAX_BACKLOG, room // 8))
    left = room - ACCEPT_ITERATIONS * backlog  # for connections that stay open
    if left < 2:
        raise ValueError(f"the file descriptor limit (ulimit -n: soft {soft}, hard {_limit(hard) or 'unlimited'}) "
                         f"leaves no room for connections: {in_use} are open with the model loaded and {reserve} are "
                         f"kept in reserve; raise it to at least {in_use + reserve + 16}")
    if left < asked + spare:
        spare = max(1, min(spare, left // 8))
    cap = min(asked, left - spare)
    return ConnectionBudget(cap, cap + spare, backlog, asked, _limit(soft), _limit(hard), in_use, reserve,
                            raised_from)


def server_protocol(header_timeout: float, budget: ConnectionBudget) -> type[H11Protocol]:
    """An `H11Protocol` subclass (for `uvicorn.Config(http=..., limit_concurrency=None)`): header timeout,
    connection cap and JSON errors, as the module says."""
    cap, max_open = budget.max_connections, budget.max_open
    busy = (f"too many connections: this server answers {cap} at once (--max-connections and the file "
            "descriptor limit); retry shortly")

    class ServerH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._inner_app, self.app = self.app, self._guarded_app  # handle_events runs self.app

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_open:  # close at once: keep a descriptor for the next accept()
                self.connections.discard(self)
                self.logger.warning("closing new connections at once: %d are open, the most the file "
                                    "descriptor limit allows", max_open)
                transport.close()
                return
            self._update_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._update_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        async def _guarded_app(self, scope, receive, send) -> None:
            """The app, but 503 over the cap (uvicorn's limit_concurrency check, as JSON) and a JSON 500 when
            it ends without answering: an exception, or cancelled when --graceful-timeout runs out."""
            if len(self.connections) >= cap or len(self.tasks) > cap:  # this request's task is in self.tasks
                self.logger.warning("exceeded the connection limit (%d)", cap)
                return await error_response(503, busy, {"Retry-After": "1", "Connection": "close"})(
                    scope, receive, send)
            started = False

            async def tracked_send(message) -> None:
                nonlocal started
                started = started or message["type"] == "http.response.start"
                await send(message)

            try:
                await self._inner_app(scope, receive, tracked_send)
            except asyncio.CancelledError:
                # uvicorn cancels what still runs when --graceful-timeout is over: an expected end, one line
                self.logger.warning("a request was cut at shutdown (--graceful-timeout): %s %s",
                                    scope.get("method"), scope.get("path"))
                if not started:
                    await error_response(500, "the server shut down before this request finished "
                                         "(--graceful-timeout)", {"Connection": "close"})(scope, receive, send)
                self.transport.close()
                return
            except BaseException:
                if not started:
                    await error_response(500, "internal server error", {"Connection": "close"})(scope, receive, send)
                raise  # uvicorn logs it and closes the connection
            if not started and not self.transport.is_closing():
                self.logger.error("the app returned without answering")
                await error_response(500, "internal server error: no response", {"Connection": "close"})(
                    scope, receive, send)

        def send_400_response(self, msg: str) -> None:
            """uvicorn's answer to a request h11 cannot parse (bad request line, headers too large...), as JSON."""
            body = error_response(400, "invalid HTTP request: the request line or headers are not HTTP/1.1").body
            try:
                for event in (h11.Response(status_code=400, reason=b"Bad Request", headers=[
                        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close")]), h11.Data(data=body), h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:  # a response had already begun: nothing valid can follow
                pass
            self.transport.close()

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

    return ServerH11Protocol


class RepeatFilter(logging.Filter):
    """Rate-limits identical warnings and errors (same logger, level, message template and exception type):
    the first `burst` of each per `interval_s` pass, later ones are counted, and the next record after the
    interval first logs one summary line per suppressed kind (`suppressed`: how many). Records below
    `level` (the access log, start-up lines) pass untouched, at the cost of one comparison. (A summary waits
    for the next warning after its interval: a flood that stops leaves its count to the next one.)"""

    def __init__(self, burst: int = 5, interval_s: float = 10.0, level: int = logging.WARNING,
                 clock: Callable[[], float] = time.monotonic, max_kinds: int = 1024) -> None:
        super().__init__()
        self.burst, self.interval_s, self.level, self.clock, self.max_kinds = burst, interval_s, level, clock, max_kinds
        self._lock = threading.Lock()
        self._window_end = clock() + interval_s
        self._seen: dict[tuple, int] = {}
        self._text: dict[tuple, str] = {}  # each kind's first message, for its summary

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level or getattr(record, "_repeat_summary", False):
            return True
        key = (record.name, record.levelno, str(record.msg), record.exc_info and record.exc_info[0])
        with self._lock:
            now = self.clock()
            summaries = []
            if now >= self._window_end:
                summaries = [(k, self._text[k], n - self.burst) for k, n in self._seen.items() if n > self.burst]
                self._seen.clear()
                self._text.clear()
                self._window_end = now + self.interval_s
            n = self._seen.get(key)
            if n is None and len(self._seen) >= self.max_kinds:
                n = -1  # too many kinds to track: let it through
            else:
                n = (n or 0) + 1
                self._seen[key] = n
                if n == 1:
                    self._text[key] = record.getMessage()[:300]
        for (name, level, *_), text, count in summaries:  # outside the lock: this logs through the same filter
            logging.getLogger(name).log(level, "suppressed %d repeats of: %s", count, text,
                                        extra={"suppressed": count, "interval_s": self.interval_s,
                                               "_repeat_summary": True})
        return n <= self.burst
