"""The server's ASGI middleware: per-route metrics and the JSON access log, and the request body limits
(size from Content-Length or mid-stream, and the time a body may take to arrive)."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from parnet_cpu.serve.v2 import ApiError, BodyTooLarge, api_error_response

log = logging.getLogger("parnet_cpu.serve")


class ObservabilityMiddleware:
    """Counts and times every request by route (bounded label set) and writes one JSON access-log line."""

    def __init__(self, app, service: Any) -> None:  # a serve.app.Service: its metrics and config
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            seconds = time.perf_counter() - start
            endpoint = _endpoint_label(scope)
            self.service.metrics.observe_request(endpoint, scope["method"], status, seconds)
            if self.service.config.access_log:
                log.info("request", extra={"method": scope["method"], "path": scope["path"], "status": status,
                                           "duration_ms": round(seconds * 1e3, 3),
                                           "client": (scope.get("client") or ("?",))[0]})


def _endpoint_label(scope: dict) -> str:
    """The route template (Starlette sets `scope["route"]`; older releases only the endpoint function)."""
    path = getattr(scope.get("route"), "path", None)
    return path or getattr(scope.get("endpoint"), "__name__", None) or "unmatched"


class BodyLimitMiddleware:
    """Refuses bodies over the limit: at once from Content-Length, or mid-stream for chunked uploads; and
    bodies that do not arrive within `timeout_s` (a slow or stalled client holding memory and a slot): 408."""

    def __init__(self, app, max_bytes: int, timeout_s: float | None = None) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for key, value in scope["headers"]:
            if key == b"content-length":
                if not value.isdigit() or int(value) > self.max_bytes:
                    err = BodyTooLarge(self.max_bytes) if value.isdigit() else ApiError(400, "invalid Content-Length")
                    return await api_error_response(err)(scope, receive, send)
                break
        received, more, deadline = 0, True, None

        async def limited() -> dict:
            nonlocal received, more, deadline
            if not more or self.timeout_s is None:  # body complete: only the disconnect watch is left
                message = await receive()
            else:
                loop = asyncio.get_running_loop()
                deadline = deadline or loop.time() + self.timeout_s  # from the first read of the body
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    raise ApiError(408, f"request body not received within {self.timeout_s:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                more = message.get("more_body", False)
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            else:
                more = False
            return message

        await self.app(scope, limited, send)
