"""Dynamic batching: concurrent requests grouped into one `Runtime.submit` call.

Requests wait in a bounded FIFO queue (counted in images). A collector task takes a free runtime
slot (at most `inflight` batches are in the runtime at once, so the runtime never queues behind our
back), then gathers queued images until it has `max_batch` of them or the oldest has waited
`max_wait` seconds. While every slot is busy, requests keep arriving, so batches grow with load and
stay small (low latency) when the server is quiet.

Everything here runs on the event loop except the inference itself: the runtime's future completes
on its own thread and hands the logits back with `call_soon_threadsafe`. A full queue is refused at
once (`QueueFullError`), and a request cancelled before it is batched (client gone) is dropped
without running.

`Batcher` is the public face of the same collector for any asyncio server (FastAPI, Starlette, aiohttp...):
built on a `Runtime`, with `await batcher.infer(images)` and `await batcher.classify(images)`.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import Future as ThreadFuture
from dataclasses import dataclass
from typing import Callable

import numpy as np

from parnet_cpu.data.inputs import preprocess_batch
from parnet_cpu.options import check_all
from parnet_cpu.runtime.classify import TopK, check_top_k, softmax_top_k
from parnet_cpu.runtime.leases import ProcessBound
from parnet_cpu.runtime.runtime import check_images

__all__ = ["Batcher", "BatcherClosedError", "DynamicBatcher", "QueueFullError"]

SubmitFn = Callable[[np.ndarray], ThreadFuture]
BatchHook = Callable[[int, float], None]  # (images in the batch, seconds in the runtime)
# per request (or max_batch chunk of one) leaving the batcher: (answered, images, seconds queued before its batch
# started, seconds its batch took in the runtime); what the queue-wait histogram and Triton's statistics count
ItemHook = Callable[[bool, int, float, float], None]


class QueueFullError(Exception):
    """The queue holds `max_queue` images already: answer 503 now rather than queue without bound."""


class BatcherClosedError(Exception):
    """The server is shutting down and takes no new work."""


@dataclass(eq=False)
class _Item:
    images: np.ndarray  # (n, C, H, W) float32
    future: asyncio.Future
    enqueued: float  # loop.time()
    batched: bool = False
    dropped: bool = False

    @property
    def n(self) -> int:
        return int(self.images.shape[0])


@dataclass
class BatcherStats:
    """Counters read by the metrics endpoint (plain ints: cheaper than touching Prometheus per item)."""

    batches: int = 0
    images: int = 0
    dropped_images: int = 0  # cancelled (client gone) before they were batched
    rejected_requests: int = 0  # queue full
    failed_batches: int = 0
    last_error: str | None = None


class DynamicBatcher(ProcessBound):
    """Groups images from concurrent requests into batches for a `submit(batch) -> Future` runtime.
    Not copyable (`ProcessBound`): a copy would share its queue, task and runtime slots."""

    _OWNS = "its queue, collector task and runtime slots on this process's event loop (and the Runtime they feed)"
    _TRANSFER_FIX = "pass the model folder and create a Runtime and a Batcher on it in the other process"

    def __init__(self, submit: SubmitFn, max_batch: int = 8, max_wait_s: float = 0.002, max_queue: int = 256,
                 inflight: int = 2, on_batch: BatchHook | None = None, on_item: ItemHook | None = None) -> None:
        check_all(max_batch=max_batch, max_wait_s=max_wait_s, max_queue=max_queue, inflight=inflight)
        self._submit = submit
        self.max_batch, self.max_wait_s, self.max_queue, self.inflight = max_batch, max_wait_s, max_queue, inflight
        self._on_batch, self._on_item = on_batch, on_item
        self._queue: deque[_Item] = deque()
        self._queued = 0  # images waiting (cancelled ones excluded)
        self._running = 0  # batches inside the runtime
        self.stats = BatcherStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._arrived: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the collector on the running loop (asyncio objects must be created on it)."""
        self._loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(self.inflight)
        self._task = asyncio.create_task(self._collect_forever(), name="parnet-batcher")

    async def close(self, timeout: float = 60.0) -> None:
        """Refuse new work, run everything already queued, and wait for the batches in flight."""
        self._closing = True
        if self._task is None:
            return
        self._arrived.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
            for _ in range(self.inflight):  # every slot back = nothing left in the runtime
                await asyncio.wait_for(self._slots.acquire(), timeout)
        except asyncio.TimeoutError:
            self._task.cancel()
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(BatcherClosedError("server shut down before this request ran"))
        self._queue.clear()

    # ------------------------------------------------------------------ state read by the app and metrics
    @property
    def queued_images(self) -> int:
        return self._queued

    @property
    def running_batches(self) -> int:
        return self._running

    @property
    def closing(self) -> bool:
        return self._closing

    def retarget(self, submit: SubmitFn) -> None:
        """Send later batches to another runtime (the server replaced one whose worker died)."""
        self._submit = submit

    def is_full(self) -> bool:
        """Cheap pre-check before reading a body: no room for even one more image."""
        return self._queued >= self.max_queue

    # ------------------------------------------------------------------ request side
    def enqueue(self, images: np.ndarray) -> asyncio.Future:
        """Queue (N, C, H, W) float32 images; returns a future of their (N, classes) logits.

        Raises `QueueFullError` / `BatcherClosedError` synchronously, before anything is queued.
        Requests larger than `max_batch` are split into chunks that may land in different batches.
        Cancelling the returned future drops whatever has not been batched yet.
        """
        if self._closing:
            raise BatcherClosedError("server is shutting down")
        n = int(images.shape[0])
        if self._queued + n > self.max_queue:
            self.stats.rejected_requests += 1
            raise QueueFullError(f"queue full ({self._queued} of {self.max_queue} images waiting)")
        now = self._loop.time()
        futures = []
        for start in range(0, n, self.max_batch):
            item = _Item(images[start:start + self.max_batch], self._loop.create_future(), now)
            item.future.add_done_callback(lambda f, it=item: self._on_item_done(it))
            self._queue.append(item)
            self._queued += item.n
            futures.append(item.future)
        self._arrived.set()
        return futures[0] if len(futures) == 1 else self._joined(futures)

    def _joined(self, futures: list[asyncio.Future]) -> asyncio.Future:
        """One future for a request split into chunks: concatenated logits; cancelling it cancels all."""
        outer = self._loop.create_future()
        gathered = asyncio.gather(*futures)

        def done(g: asyncio.Future) -> None:
            if outer.done():
                return
            if g.cancelled():
                outer.cancel()
            elif g.exception() is not None:
                outer.set_exception(g.exception())
            else:
                outer.set_result(np.concatenate(g.result()))

        gathered.add_done_callback(done)
        outer.add_done_callback(lambda o: gathered.cancel() if o.cancelled() else None)
        return outer

    def _on_item_done(self, item: _Item) -> None:
        if item.future.cancelled() and not item.batched and not item.dropped:
            item.dropped = True  # stays in the deque until the collector skips it
            self._queued -= item.n
            self.stats.dropped_images += item.n

    # ------------------------------------------------------------------ collector
    async def _collect_forever(self) -> None:
        while True:
            await self._slots.acquire()
            items = await self._collect()
            if not items:
                self._slots.release()
                return  # closing and nothing left
            self._launch(items)

    async def _collect(self) -> list[_Item]:
        """Wait for work, then for a full batch or the oldest request's deadline."""
        while True:
            self._skip_dropped()
            if self._queue:
                break
            if self._closing:
                return []
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._queue[0].enqueued + self.max_wait_s
        while self._queued < self.max_batch and not self._closing:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return self._take()

    def _skip_dropped(self) -> None:
        while self._queue and self._queue[0].dropped:
            self._queue.popleft()

    def _take(self) -> list[_Item]:
        """FIFO items up to `max_batch` images (never reorders: a large head item waits its turn)."""
        items, n = [], 0
        while self._queue:
            item = self._queue[0]
            if item.dropped:
                self._queue.popleft()
                continue
            if n + item.n > self.max_batch:
                break
            self._queue.popleft()
            item.batched = True
            self._queued -= item.n
            items.append(item)
            n += item.n
        return items

    def _launch(self, items: list[_Item]) -> None:
        batch = items[0].images if len(items) == 1 else np.concatenate([it.images for it in items])
        started, launched = time.perf_counter(), self._loop.time()  # launched: the clock of `_Item.enqueued`
        try:
            fut = self._submit(batch)
        except Exception as exc:  # runtime closed or refused the batch: fail these requests only
            self._slots.release()
            self._fail(items, exc, launched)
            return
        self._running += 1
        loop = self._loop

        def on_done(f: ThreadFuture) -> None:  # runtime thread
            try:
                loop.call_soon_threadsafe(self._finish, items, f, started, launched)
            except RuntimeError:
                pass  # loop already closed: nobody is waiting any more

        fut.add_done_callback(on_done)

    def _finish(self, items: list[_Item], fut: ThreadFuture, started: float, launched: float) -> None:
        self._running -= 1
        self._slots.release()
        exc = fut.exception()
        if exc is not None:
            self._fail(items, exc, launched)
            return
        logits = fut.result()
        n = sum(it.n for it in items)
        self.stats.batches += 1
        self.stats.images += n
        seconds = time.perf_counter() - started
        if self._on_batch is not None:
            self._on_batch(n, seconds)
        if self._on_item is not None:
            for item in items:
                self._on_item(True, item.n, launched - item.enqueued, seconds)
        offset = 0
        for item in items:
            if not item.future.done():  # a client that left meanwhile is simply not answered
                item.future.set_result(logits[offset:offset + item.n])
            offset += item.n

    def _fail(self, items: list[_Item], exc: BaseException, launched: float) -> None:
        self.stats.failed_batches += 1
        self.stats.last_error = f"{type(exc).__name__}: {exc}"
        if self._on_item is not None:
            now = self._loop.time()
            for item in items:
                self._on_item(False, item.n, launched - item.enqueued, now - launched)
        for item in items:
            if not item.future.done():
                item.future.set_exception(exc)


class Batcher(DynamicBatcher):
    """Dynamic batching onto a `Runtime` for any asyncio server: the collector `parnet-cpu serve` runs.

    Concurrent `await batcher.infer(x)` / `await batcher.classify(images)` calls are grouped into batches of
    up to `max_batch` images, waiting at most `max_wait_ms` for a batch to fill; at most the runtime's
    `inflight` batches run at once. Cancelling an await drops its images if they are not batched yet and
    otherwise discards their logits: no other call ever receives them. Start and stop it on the server's
    event loop (`async with Batcher(rt) as b:`, or `await b.start()` / `await b.close()` in a lifespan);
    the first call starts it if nobody did. `close()` runs what is queued and leaves the runtime open.
    """

    def __init__(self, runtime, max_batch: int | None = None, max_wait_ms: float = 2.0, max_queue: int = 256,
                 on_batch: BatchHook | None = None) -> None:
        limit = int(runtime.max_batch)
        if isinstance(max_batch, int) and not isinstance(max_batch, bool) and max_batch > limit:
            max_batch = limit  # never more than the runtime takes
        check_all(max_batch=limit if max_batch is None else max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
        super().__init__(runtime.submit, max_batch=max_batch or limit, max_wait_s=max_wait_ms / 1e3,
                         max_queue=max_queue, inflight=int(runtime.inflight), on_batch=on_batch)
        self.runtime = runtime
        self._shape = tuple(runtime.input_shape)

    async def __aenter__(self) -> "Batcher":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def infer(self, images: np.ndarray) -> np.ndarray:
        """Logits (N, classes) for preprocessed float images (N, C, H, W) or one (C, H, W), batched with
        whatever else is queued. Raises `QueueFullError` at once when `max_queue` images already wait."""
        if self._task is None:
            await self.start()
        x = check_images(images, self._shape)  # per request, before batching: a bad one fails no other request
        return await self.enqueue(np.ascontiguousarray(x, dtype=np.float32))

    async def classify(self, images, top_k: int | None = None) -> list[TopK]:
        """`Runtime.classify` through the batcher: images as `Runtime.preprocess` takes them (one or a list),
        or a preprocessed float batch; decoding runs in a thread, off the event loop."""
        rt = self.runtime
        top_k = check_top_k(top_k, rt.num_classes)  # refused before any decoding
        batch = await asyncio.to_thread(preprocess_batch, images, rt.preprocess_config)
        return softmax_top_k(await self.infer(batch), top_k, rt.class_names)
