"""Observability: Prometheus metrics for `/metrics` and one-JSON-object-per-line logs.

Per-request metrics are two Prometheus calls (a counter and a histogram), plus one queue-wait observation per
request when its batch completes. Everything that is state rather than an event (queue depth, batches in
flight, the runtime's per-stage times, the process's memory, CPU and file descriptors) is read only when
Prometheus scrapes, by a collector, so it costs nothing on the hot path. The scraper chooses the format:
OpenMetrics when its Accept header asks for it, else Prometheus text. The same observations feed the
per-model statistics that Triton's `/v2/models/{name}/stats` reports (`ModelStats`, serve/triton.py).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, TextIO

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, GCCollector, Histogram,
                               PlatformCollector, ProcessCollector, disable_created_metrics, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

__all__ = ["CONTENT_TYPE_LATEST", "JsonFormatter", "ModelStats", "ServeMetrics", "configure_logging"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# time in the batcher's queue: --max-wait-ms is 2 ms by default, so the fine end matters
QUEUE_WAIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25,
                      0.5, 1.0, 2.5, 5.0)


@dataclass
class Duration:
    """Triton's `$duration_stat`: how many times, and their total in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)


@dataclass
class ModelStats:
    """Cumulative per-model statistics in Triton's terms (statistics extension), updated on the event loop
    by the batcher's hooks: plain ints, no locks."""

    inference_count: int = 0  # images answered (each image of a batched request counts)
    execution_count: int = 0  # batches the runtime ran
    last_inference_ms: int = 0  # ms since the epoch, of the last request that completed
    success: Duration = field(default_factory=Duration)  # requests answered: queue + compute
    fail: Duration = field(default_factory=Duration)  # requests whose batch failed
    queue: Duration = field(default_factory=Duration)  # waiting in the batcher before their batch started
    compute_infer: Duration = field(default_factory=Duration)  # their batch's time in the runtime
    batches: dict[int, Duration] = field(default_factory=lambda: defaultdict(Duration))  # batch size -> runtime time


class ServeMetrics:
    """The server's metrics in a registry of its own (several apps can live in one process, e.g. tests)."""

    def __init__(self, max_batch: int) -> None:
        # prometheus_client adds a `<name>_created` series beside every counter and histogram (their start
        # time) in the text format: a duplicate series per metric that dashboards do not use. A process-wide
        # switch of the library: this process serves, so its metrics are these.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        # the process itself (memory, CPU seconds, open and maximum fds, start time), the interpreter, the GC:
        # what every Prometheus client exposes by default, here registered in this server's registry
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.model_stats = ModelStats()
        self.requests = Counter("parnet_requests", "HTTP requests by endpoint, method and status code",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("parnet_request_duration_seconds", "HTTP request latency, first byte in to "
                                 "response sent", ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("parnet_batch_size", "Images per inference batch sent to the runtime",
                                    buckets=tuple(float(b) for b in range(1, max_batch + 1)), registry=self.registry)
        self.batch_seconds = Histogram("parnet_batch_inference_seconds", "Runtime time per batch (submit to logits)",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("parnet_queue_wait_seconds", "Time a request waits in the batcher's queue before "
                                    "its batch starts (tune --max-wait-ms and --max-batch with it)",
                                    buckets=QUEUE_WAIT_BUCKETS, registry=self.registry)

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, images: int, seconds: float) -> None:
        self.batch_size.observe(images)
        self.batch_seconds.observe(seconds)
        stats = self.model_stats
        stats.execution_count += 1
        stats.batches[images].add(seconds)

    def observe_item(self, ok: bool, images: int, queue_s: float, compute_s: float) -> None:
        """One request (or one max_batch chunk of a larger one) left the batcher: answered or failed after
        `queue_s` in the queue and `compute_s` in the runtime (the batcher's `on_item` hook)."""
        self.queue_wait.observe(queue_s)
        stats = self.model_stats
        stats.queue.add(queue_s)
        if ok:
            stats.inference_count += images
            stats.success.add(queue_s + compute_s)
            stats.compute_infer.add(compute_s)
        else:
            stats.fail.add(queue_s + compute_s)
        stats.last_inference_ms = int(time.time() * 1e3)

    def bind_live(self, batcher, stage_summary: Callable[[], dict], info: dict[str, str],
                  healthy: Callable[[], bool] | None = None, restarts: Callable[[], int] | None = None) -> None:
        """Register the scrape-time collector for the batcher and the runtime (after start-up)."""
        self.registry.register(_LiveCollector(batcher, stage_summary, info, healthy, restarts))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """(body, content type) in the format the scraper's Accept header asks for: OpenMetrics for
        `application/openmetrics-text` (prometheus_client's own negotiation), else Prometheus text 0.0.4.
        A malformed Accept (e.g. `version=abc`, which the library's parser raises on) gets the text format."""
        try:
            encode, content_type = choose_encoder(accept or "")
        except (TypeError, ValueError):
            encode, content_type = generate_latest, CONTENT_TYPE_LATEST
        return encode(self.registry), content_type


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
