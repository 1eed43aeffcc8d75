"""parnet-cpu embedded in a FastAPI app: uploads in, labels out, concurrent requests batched.

    PARNET_MODEL_DIR=parnet_s-int8/ WEB_CONCURRENCY=2 uvicorn examples.fastapi_app:app --workers 2

Each worker process opens its own `Runtime` in the lifespan (after uvicorn started the worker, never before:
a Runtime does not survive a fork) on `cores="share:N"`, N = $WEB_CONCURRENCY (the variable uvicorn and
gunicorn read for their worker count): every worker leases an equal, disjoint part of the free cores
without knowing its index. `Batcher` is the dynamic batcher `parnet-cpu serve` runs: concurrent requests
share batches of up to `max_batch` images. Answers are those of `parnet-cpu serve`'s `/v1/classify`.
Torch-free: the base install plus `fastapi`.

    curl -F file=@cat.jpg 'localhost:8000/classify?top_k=3'     GET /health: 200 while the runtime is healthy
"""
from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse

from parnet_cpu import Batcher, Runtime
from parnet_cpu.data import ImageDecodeError, ImageTooLargeError
from parnet_cpu.serve import BatcherClosedError, QueueFullError

MODEL_DIR = os.environ.get("PARNET_MODEL_DIR", "out/")
WORKERS = int(os.environ.get("WEB_CONCURRENCY", "1"))
MAX_BATCH = int(os.environ.get("PARNET_MAX_BATCH", "8"))
MAX_WAIT_MS = float(os.environ.get("PARNET_MAX_WAIT_MS", "2"))


@asynccontextmanager
async def lifespan(app: FastAPI):
    cores = f"share:{WORKERS}" if WORKERS > 1 else None  # one worker: every free core
    rt = await asyncio.to_thread(Runtime, MODEL_DIR, cores=cores, max_batch=MAX_BATCH)
    try:
        async with Batcher(rt, max_batch=MAX_BATCH, max_wait_ms=MAX_WAIT_MS) as batcher:
            app.state.runtime, app.state.batcher = rt, batcher
            yield
    finally:  # the batcher has drained: nothing is left in the runtime
        await asyncio.to_thread(rt.close)


app = FastAPI(title="parnet-cpu embedded", lifespan=lifespan)


@app.get("/health")
async def health(request: Request) -> JSONResponse:
    rt: Runtime = request.app.state.runtime
    why = rt.failure()  # cheap: probes may call it as often as they like
    return JSONResponse({"healthy": why is None, "error": why, "pid": os.getpid(), "cpus": rt.plan.cpus},
                        status_code=200 if why is None else 503)


@app.post("/classify")
async def classify(request: Request, response: Response, top_k: int | None = Query(None, ge=1)) -> dict:
    """The image as a multipart file (any field name) or the raw body; answers as serve's /v1/classify
    (top_k: default 5, or every class of a model with fewer)."""
    rt: Runtime = request.app.state.runtime
    if top_k is not None and top_k > rt.num_classes:
        raise HTTPException(400, f"top_k must be an integer in 1..{rt.num_classes}")
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        files = [v for v in form.values() if hasattr(v, "read")]
        if not files:
            raise HTTPException(400, "multipart form has no file field")
        data = await files[0].read()
    else:
        data = await request.body()
    try:
        result = (await request.app.state.batcher.classify(data, top_k))[0]
    except ImageTooLargeError as exc:
        raise HTTPException(413, exc.reason) from None
    except ImageDecodeError as exc:
        raise HTTPException(400, f"cannot decode image: {exc.reason}") from None
    except (QueueFullError, BatcherClosedError) as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "1"}) from None
    response.headers["X-Worker-Pid"] = str(os.getpid())
    return {"model": "parnet", "predictions": result.predictions()}
