"""Observability: Prometheus metrics for `/metrics` and one-JSON-object-per-line logs.

Per-request metrics are two Prometheus calls (a counter and a histogram). Everything that is state
rather than an event (queue depth, batches in flight, the runtime's per-stage times) is read only
when Prometheus scrapes, by a collector, so it costs nothing on the hot path.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Callable, Iterable, TextIO

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["CONTENT_TYPE_LATEST", "JsonFormatter", "ServeMetrics", "configure_logging"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    """The server's metrics in a registry of its own (several apps can live in one process, e.g. tests)."""

    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("parnet_requests", "HTTP requests by endpoint, method and status code",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("parnet_request_duration_seconds", "HTTP request latency, first byte in to "
                                 "response sent", ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("parnet_batch_size", "Images per inference batch sent to the runtime",
                                    buckets=tuple(float(b) for b in range(1, max_batch + 1)), registry=self.registry)
        self.batch_seconds = Histogram("parnet_batch_inference_seconds", "Runtime time per batch (submit to logits)",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, images: int, seconds: float) -> None:
        self.batch_size.observe(images)
        self.batch_seconds.observe(seconds)

    def bind_live(self, batcher, stage_summary: Callable[[], dict], info: dict[str, str],
                  healthy: Callable[[], bool] | None = None, restarts: Callable[[], int] | None = None) -> None:
        """Register the scrape-time collector for the batcher and the runtime (after start-up)."""
        self.registry.register(_LiveCollector(batcher, stage_summary, info, healthy, restarts))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector:
    """Values read at scrape time: queue depth, batches in flight, drop/reject counters, stage times."""

    def __init__(self, batcher, stage_summary: Callable[[], dict], info: dict[str, str],
                 healthy: Callable[[], bool] | None = None, restarts: Callable[[], int] | None = None) -> None:
        self._batcher, self._stage_summary, self._healthy, self._restarts = batcher, stage_summary, healthy, restarts
        self._info_labels, self._info_values = list(info), [str(v) for v in info.values()]

    def describe(self) -> list:
        return []  # no registration-time collect(): the batcher may not be running yet

    def collect(self) -> Iterable[Metric]:
        b = self._batcher
        info = GaugeMetricFamily("parnet_model_info", "Model served (value is always 1)", labels=self._info_labels)
        info.add_metric(self._info_values, 1)
        yield info
        if self._healthy is not None:
            yield GaugeMetricFamily("parnet_runtime_healthy", "1 while every runtime worker process is alive, "
                                    "0 once one died (until the server restarts the runtime)",
                                    value=int(self._healthy()))
        if self._restarts is not None:
            yield CounterMetricFamily("parnet_runtime_restarts", "Times the server replaced its runtime after a "
                                      "worker process died (--runtime-restarts)", value=self._restarts())
        yield GaugeMetricFamily("parnet_queue_depth_images", "Images waiting to be batched", value=b.queued_images)
        yield GaugeMetricFamily("parnet_queue_capacity_images", "Queue limit (--max-queue)", value=b.max_queue)
        yield GaugeMetricFamily("parnet_batches_in_flight", "Batches inside the runtime", value=b.running_batches)
        yield CounterMetricFamily("parnet_dropped_images", "Images dropped before inference because their "
                                  "client disconnected", value=b.stats.dropped_images)
        yield CounterMetricFamily("parnet_rejected_requests", "Requests refused with 503 because the queue was full",
                                  value=b.stats.rejected_requests)
        yield CounterMetricFamily("parnet_failed_batches", "Batches the runtime failed", value=b.stats.failed_batches)
        median = GaugeMetricFamily("parnet_runtime_stage_median_seconds", "Median time of each runtime stage over "
                                   "its recent runs (Runtime.stats.summary())", labels=["stage"])
        samples = GaugeMetricFamily("parnet_runtime_stage_samples", "Runs behind that median (a window, not a "
                                    "monotonic count)", labels=["stage"])
        for stage, s in sorted(self._stage_summary().items()):
            median.add_metric([stage], s["median_ms"] / 1e3)
            samples.add_metric([stage], s["count"])
        yield median
        yield samples


# ---------------------------------------------------------------------------------------------- logging

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime",
                                                                                   "color_message", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus every `extra=` field (what log shippers parse)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Route every logger (ours and uvicorn's) through one JSON handler on stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
