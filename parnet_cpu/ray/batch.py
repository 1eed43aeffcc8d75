"""Ray Data offline scoring: `parnet-cpu predict`'s rows, computed on a Ray cluster.

The paths are listed as `predict` lists them (`predict.collect_images`); Ray tasks decode them
(`data.load_and_preprocess`, the same rules and skip reasons as the local loader); an actor pool classifies
the decoded batches, each actor one `Runtime` on its leased share of its node's cores (`placement`); rows
come back in input order, shaped as the local path shapes them (path + `TopK.to_dict()`, or path + the
reason it was skipped), so `predict_folder` writes them exactly as it writes its own. Images must be
readable at the same path on every node (a shared file system). Torch-free.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Sequence

import numpy as np

from parnet_cpu.artifacts import ModelDir
from parnet_cpu.data.preprocess import ImageDecodeError, load_and_preprocess
from parnet_cpu.predict import NON_FINITE
from parnet_cpu.ray.placement import check_address, pin_process, pool_cores, pool_env, resolved
from parnet_cpu.runtime.classify import check_top_k, softmax_top_k

DECODE_CPUS = 1.0  # Ray CPUs of one decoding task (Ray's default for tasks)

__all__ = ["Classifier", "RayPredictor", "check_cluster_cpus", "decode_batch", "predict"]


def decode_batch(batch: dict, cfg) -> dict:
    """A Ray task: paths -> preprocessed images, and the skip reason of each file that does not decode."""
    paths = list(batch["path"])
    images = np.zeros((len(paths), *cfg.output_shape), np.float32)
    errors = []
    for i, p in enumerate(paths):
        try:
            load_and_preprocess(p, cfg, images[i])
            errors.append("")
        except ImageDecodeError as exc:
            errors.append(exc.reason)
    return {"i": np.asarray(batch["i"]), "path": np.asarray(paths, dtype=object), "image": images,
            "error": np.asarray(errors, dtype=object)}


class Classifier:
    """An actor of the pool: one Runtime on its leased share of the node's cores; batches -> JSON rows."""

    def __init__(self, model_dir: str, cores: str, top_k: int, precision: str | None, max_batch: int) -> None:
        from parnet_cpu.runtime.runtime import Runtime

        self.rt = Runtime(model_dir, cores=cores, precision=precision, max_batch=max_batch)
        pin_process(self.rt.plan.cpus)
        self.k, self.names = top_k, self.rt.class_names

    def __call__(self, batch: dict) -> dict:
        errors, paths = batch["error"], batch["path"]
        ok = np.flatnonzero(errors == "")
        rows = [json.dumps({"path": p, "skipped": e}) if e else None for p, e in zip(paths, errors)]
        if len(ok):
            logits = self.rt.infer(np.ascontiguousarray(batch["image"][ok]))
            finite = np.isfinite(logits).all(axis=1)
            tops = iter(softmax_top_k(logits[finite], self.k, self.names) if finite.any() else [])
            for j, good in zip(ok, finite):
                rows[j] = json.dumps({"path": paths[j], **next(tops).to_dict()} if good else
                                     {"path": paths[j], "skipped": NON_FINITE})
        return {"i": batch["i"], "row": np.asarray(rows, dtype=object)}


def predict(model_dir: str | os.PathLike, paths: Sequence[str], *, top_k: int | None = None, batch_size: int = 32,
            actors: int = 1, actors_per_node: int | None = None, num_cpus: float = 0.5, precision: str | None = None,
            progress: bool = True) -> Iterator[dict]:
    """The rows of `paths` (as `parnet-cpu predict` writes them), in order, computed on the connected Ray
    cluster (`ray.init` first; one is started locally otherwise): decoding in Ray tasks, inference in a pool
    of `actors` actors, at most `actors_per_node` on a node (default: all on one), each leasing that share
    of its node's cores. `num_cpus` is what Ray's scheduler counts per actor. Arguments are checked at the
    call, the cluster does the work as the rows are read."""
    model = resolved(model_dir)
    md = ModelDir.open(model)
    top_k = check_top_k(top_k, int(md.config["num_classes"]))
    for what, n in (("actors", actors), ("batch_size", batch_size)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{what} must be a positive integer, got {n!r}")
    cores = pool_cores(actors if actors_per_node is None else actors_per_node)
    check_cluster_cpus(actors, num_cpus)
    return _rows(model, md.preprocess_config(), [str(p) for p in paths], cores, top_k, batch_size, actors, num_cpus,
                 precision, progress)


def check_cluster_cpus(actors: int, num_cpus: float) -> None:
    """Refuse an actor pool that leaves the connected cluster no CPU for one decoding task: Ray would wait
    for one forever (the run hangs with every actor idle). Counted in Ray's scheduling CPUs."""
    import ray

    if not ray.is_initialized():
        return  # Ray Data starts a local instance of all this machine's CPUs
    total = ray.cluster_resources().get("CPU", 0.0)
    if actors * num_cpus + DECODE_CPUS > total:
        raise ValueError(f"{actors} actor(s) of {num_cpus:g} Ray CPU each leave no CPU for decoding on a cluster "
                         f"of {total:g} CPUs (each decoding task takes {DECODE_CPUS:g}): use fewer actors or a "
                         "smaller num_cpus (it only tells Ray's scheduler how many fit; the cores are leased)")


def _rows(model: str, cfg, paths: list[str], cores: str, top_k: int, batch_size: int, actors: int, num_cpus: float,
          precision: str | None, progress: bool) -> Iterator[dict]:
    import ray

    if not paths:
        return
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows in input order, as the local path writes them
    ctx.enable_progress_bars = progress
    ds = ray.data.from_items([{"i": i, "path": p} for i, p in enumerate(paths)],
                             override_num_blocks=max(1, min(len(paths) // batch_size, 4 * actors)))
    ds = ds.map_batches(decode_batch, fn_kwargs={"cfg": cfg}, batch_size=batch_size, batch_format="numpy",
                        num_cpus=DECODE_CPUS)
    ds = ds.map_batches(Classifier, fn_constructor_kwargs={
        "model_dir": model, "cores": cores, "top_k": top_k, "precision": precision, "max_batch": batch_size},
        batch_size=batch_size, batch_format="numpy", concurrency=actors, num_cpus=num_cpus,
        runtime_env={"env_vars": pool_env(f"ray-data/{os.getpid()}")})
    for rec in ds.iter_rows():
        yield json.loads(rec["row"])


class RayPredictor:
    """What `predict.predict_folder` takes instead of a `Runtime` to have its rows computed on Ray (`rows`),
    written, resumed and committed as its own: `parnet-cpu predict --ray`. Connects to the cluster at
    `address` (or starts a local one: None) unless Ray is connected already; `close()` disconnects."""

    def __init__(self, model_dir: str | os.PathLike, *, address: str | None = None, actors: int = 1,
                 actors_per_node: int | None = None, num_cpus: float = 0.5, precision: str | None = None,
                 progress: bool = True) -> None:
        import ray

        self.model = resolved(model_dir)
        md = ModelDir.open(self.model)
        self.num_classes = int(md.config["num_classes"])
        self.options = dict(actors=actors, actors_per_node=actors_per_node, num_cpus=num_cpus, precision=precision,
                            progress=progress)
        pool_cores(actors if actors_per_node is None else actors_per_node)  # refuse a bad count before connecting
        self._connected = not ray.is_initialized()
        if self._connected:
            check_address(address)
            ray.init(address=address, include_dashboard=False, log_to_driver=progress)
        try:
            check_cluster_cpus(actors, num_cpus)
        except ValueError:
            self.close()
            raise

    def rows(self, paths: Sequence[str], top_k: int, batch_size: int) -> Iterator[dict]:
        return predict(self.model, paths, top_k=top_k, batch_size=batch_size, **self.options)

    def close(self) -> None:
        import ray

        if self._connected:
            self._connected = False
            ray.shutdown()
