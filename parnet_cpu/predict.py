"""`parnet-cpu predict`: the top-k classes of every image under folders and files, one row per image.

Images are found as every other command finds them (`data.list_images`, recursively, the same file-name
allow-list; a file named explicitly is tried whatever its name, the decoder decides by content). Decoding
runs in `data.BatchLoader`'s thread pool while the `Runtime` classifies the previous batches (`submit`,
up to `inflight` batches in flight), so decode and inference overlap. The ranking is `runtime.classify`'s
(the one `Runtime.classify` and `serve`'s /v1/classify give). A file that cannot be decoded (corrupt,
truncated, too large) gets a row with the reason and the run goes on.

Rows are written, in input order, into a temporary file next to the output, renamed over it only when the
run ends (`outputs.atomic_write`): readers never see half a file. Ctrl-C or SIGTERM ends the run early
but still commits the rows done so far, so `resume=True` continues from them. Torch-free.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from parnet_cpu.outputs import OutputError, check_output_file, file_kind, output_file
from parnet_cpu.data import IMAGE_EXTENSIONS, BatchLoader, DecodeReport, list_images
from parnet_cpu.runtime.classify import TopK, check_top_k, softmax_top_k

__all__ = ["FORMATS", "PredictError", "PredictSummary", "collect_images", "output_format", "predict_folder"]

FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
NON_FINITE = "the model produced non-finite logits (NaN or infinity) for this image; no answer is given"


class PredictError(ValueError):
    """A predict request that cannot run (bad output, no images, unreadable earlier output...)."""


@dataclass
class PredictSummary:
    out: str
    images: int  # image files found
    classified: int = 0  # rows with predictions written by this run
    skipped: int = 0  # rows with a reason written by this run
    resumed: int = 0  # rows kept from an earlier run (--resume)
    wall_s: float = 0.0
    interrupted: bool = False  # Ctrl-C / SIGTERM: the rows so far were committed
    error: str | None = None  # what stopped the run early (the rows so far were committed)
    not_images: list[tuple[str, str]] = field(default_factory=list)  # other files under the folders, and why

    @property
    def images_per_s(self) -> float:
        return (self.classified + self.skipped) / self.wall_s if self.wall_s > 0 else 0.0

    def line(self) -> str:
        s = (f"{self.classified + self.skipped} images in {self.wall_s:.1f} s ({self.images_per_s:.1f} img/s): "
             f"{self.classified} classified, {self.skipped} skipped")
        if self.resumed:
            s += f", {self.resumed} kept from the earlier run"
        if self.not_images:
            s += f"; {len(self.not_images)} other file(s) not read as images (first: {self.not_images[0][0]}: " \
                 f"{self.not_images[0][1]})"
        return s + f" -> {self.out}"


def output_format(out: str | os.PathLike) -> str:
    """jsonl, csv or parquet, from the output's suffix; parquet only where pyarrow is installed."""
    fmt = FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise PredictError(f"--out {out}: name a .jsonl, .csv or .parquet file (the suffix picks the format)")
    if fmt == "parquet" and importlib.util.find_spec("pyarrow") is None:
        raise PredictError(f"--out {out}: writing Parquet needs pyarrow, which is not installed: pip install pyarrow "
                           "(or write .jsonl or .csv)")
    return fmt


def collect_images(data: Sequence[str | os.PathLike]) -> tuple[list[str], list[tuple[str, str]]]:
    """(image paths in order, without repeats; other files under the folders with the reason each is not
    read). Folders are walked recursively; a file named explicitly is always tried."""
    paths, others, seen = [], [], set()
    for item in data:
        p = Path(item)
        if p.is_dir():
            found = [str(x) for x in list_images(p, recursive=True, skipped=others)]
        elif p.is_file():
            found = [str(p)]
        elif os.path.lexists(p):
            raise PredictError(f"--data {item} is a {file_kind(p)}, not an image file or a folder")
        else:
            raise PredictError(f"--data {item}: no such file or folder")
        for f in found:
            if f not in seen:
                seen.add(f)
                paths.append(f)
    others = [(path, why) for path, why in others if why != "hidden"]
    return paths, others


# ---------------------------------------------------------------------------------------------- rows

def _csv_columns(k: int) -> list[str]:
    return ["path"] + [f"{name}_{i}" for i in range(1, k + 1) for name in ("label", "index", "probability")] + \
        ["skipped"]


def _row(path: str, top: TopK | None, reason: str | None) -> dict:
    if top is None:
        return {"path": path, "skipped": reason}
    return {"path": path, **top.to_dict()}


class _Writer:
    """Rows into an open text file (jsonl, csv) or collected for one Parquet table."""

    def __init__(self, fmt: str, f, k: int, fresh: bool) -> None:
        self.fmt, self.f, self.k, self.rows = fmt, f, k, []
        if fmt == "csv":
            self.csv = csv.writer(f, lineterminator="\n")
            if fresh:
                self.csv.writerow(_csv_columns(k))

    def write(self, row: dict) -> None:
        if self.fmt == "jsonl":
            self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        elif self.fmt == "csv":
            cells = [row["path"]]
            for i in range(self.k):
                cells += ([row["labels"][i], row["indices"][i], repr(row["probabilities"][i])]
                          if "labels" in row else ["", "", ""])
            self.csv.writerow(cells + [row.get("skipped") or ""])
        else:
            self.rows.append({"path": row["path"], "labels": row.get("labels"), "indices": row.get("indices"),
                              "probabilities": row.get("probabilities"), "skipped": row.get("skipped")})


def read_rows(out: Path, fmt: str, k: int) -> tuple[set[str], str | list[dict]]:
    """Paths already written to `out` and what to carry over (the text as it is, or Parquet rows)."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(out).to_pylist()
            return {r["path"] for r in rows}, rows
        text = out.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PredictError(f"--resume: cannot read {out}: {exc}") from None
    done = set()
    if fmt == "jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            try:
                row = json.loads(line)
                done.add(row["path"])
            except (ValueError, KeyError, TypeError):
                raise PredictError(f"--resume: {out} line {n} is not a row this command wrote; name another "
                                   "--out or pass --overwrite") from None
        return done, text
    rows = list(csv.reader(io.StringIO(text)))
    if rows and rows[0] != _csv_columns(k):
        raise PredictError(f"--resume: {out} has other columns ({len(rows[0])}; top-k {(len(rows[0]) - 2) // 3} "
                           f"rather than {k}?); resume with the same --top-k, or pass --overwrite")
    return {r[0] for r in rows[1:] if r}, text


# ---------------------------------------------------------------------------------------------- the run

def predict_folder(runtime, data: Sequence[str | os.PathLike], out: str | os.PathLike, *, top_k: int | None = None,
                   batch_size: int = 32, workers: int | None = None, resume: bool = False, overwrite: bool = False,
                   progress: bool = True, on_start: Callable[[int, int], None] | None = None,
                   top_k_name: str = "top_k") -> PredictSummary:
    """Classify every image of `data` (folders and files) with `runtime` (a `Runtime`) into `out`. `runtime`
    may instead be an object with `num_classes` and `rows(paths, top_k, batch_size)` that computes the rows
    elsewhere, in order (`parnet_cpu.ray.batch.RayPredictor`: `predict --ray`)."""
    out = Path(out)
    fmt = output_format(out)
    top_k = check_top_k(top_k, runtime.num_classes, top_k_name)
    if out.is_dir():
        raise PredictError(f"--out {out} is a folder; name a .jsonl, .csv or .parquet file")
    if not out.parent.is_dir():
        raise PredictError(f"--out {out}: folder {out.parent} is missing (create it first)")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise PredictError(f"--out {out}: folder {out.parent} is not writable")
    if out.exists() and not (resume or overwrite):
        raise PredictError(f"--out {out} exists: --resume continues it, --overwrite replaces it")
    model = getattr(getattr(runtime, "model_dir", None), "path", None) or getattr(runtime, "model", None)
    inputs = {"--data": list(data), "--model-dir": model}
    try:  # never an input: an image of --data, the model folder or one of its files (any name, hard links)
        check_output_file(out, "--out", inputs, overwrite=True)
    except OutputError as exc:
        raise PredictError(str(exc)) from None
    done, carried = read_rows(out, fmt, top_k) if resume and out.exists() else (set(), "")
    paths, others = collect_images(data)
    if not paths:
        raise PredictError(f"no image files in {', '.join(map(str, data))} (image file names end in "
                           f"{', '.join(sorted(IMAGE_EXTENSIONS))})"
                           + (f"; found e.g. {others[0][0]}: {others[0][1]}" if others else ""))
    todo = [p for p in paths if p not in done]
    summary = PredictSummary(str(out), len(paths), resumed=len(done), not_images=others)
    if on_start is not None:
        on_start(len(todo), len(done))
    t0 = time.perf_counter()
    with output_file(out, "--out", inputs, overwrite=True, mode="w" if fmt != "parquet" else "wb") as f:
        text = f if fmt != "parquet" else None
        if text is not None and carried:
            text.write(carried if carried.endswith("\n") else carried + "\n")
        writer = _Writer(fmt, text, top_k, fresh=not carried)
        if fmt == "parquet" and carried:
            writer.rows.extend(carried)
        try:
            if hasattr(runtime, "rows"):  # rows computed elsewhere, in order (parnet_cpu.ray.batch.RayPredictor)
                _write_rows(runtime.rows(todo, top_k, batch_size), writer, summary, len(todo), progress)
            else:
                _run(runtime, todo, writer, summary, top_k, batch_size, workers, progress)
        except KeyboardInterrupt:
            summary.interrupted = True  # the rows so far are committed below: --resume continues from them
        except Exception as exc:  # e.g. a runtime worker died: keep what was done, say what stopped it
            summary.error = f"{type(exc).__name__}: {exc}"
        if fmt == "parquet":
            _write_parquet(f, writer.rows)
    summary.wall_s = time.perf_counter() - t0
    return summary


def _run(runtime, todo: list[str], writer: _Writer, summary: PredictSummary, k: int, batch_size: int,
         workers: int | None, progress: bool) -> None:
    from tqdm.auto import tqdm

    position = {p: i for i, p in enumerate(todo)}
    report = DecodeReport()
    loader = BatchLoader(todo, runtime.preprocess_config, batch_size, workers, report=report)
    names = runtime.class_names
    pending: deque = deque()  # (batch, future, failures before its last image), in order
    reported = 0
    bar = tqdm(total=len(todo), desc="predict", unit="img", dynamic_ncols=True, disable=not progress)

    def finish(batch, fut, failures) -> None:
        logits = fut.result()
        finite = np.isfinite(logits).all(axis=1)
        tops = iter(softmax_top_k(logits[finite], k, names) if finite.any() else [])
        rows = [(position[p], _row(p, next(tops), None) if ok else _row(p, None, NON_FINITE))
                for p, ok in zip(batch.paths, finite)]
        rows += [(position[p], _row(p, None, why)) for p, why in failures]
        for _, row in sorted(rows, key=lambda r: r[0]):
            writer.write(row)
        summary.classified += int(finite.sum())
        summary.skipped += int((~finite).sum())
        summary.skipped += len(failures)
        bar.update(len(rows))

    try:
        with warnings.catch_warnings():  # the skipped files are rows and a count here, not a warning
            warnings.simplefilter("ignore", UserWarning)
            for batch in loader:
                failures, reported = report.failures[reported:], len(report.failures)
                pending.append((batch, runtime.submit(batch.images), failures))
                while len(pending) > runtime.inflight or (pending and pending[0][1].done()):
                    finish(*pending.popleft())
            while pending:
                finish(*pending.popleft())
            for p, why in report.failures[reported:]:  # undecodable files after the last batch
                writer.write(_row(p, None, why))
                summary.skipped += 1
                bar.update(1)
    finally:
        bar.close()


def _write_rows(rows: Iterable[dict], writer: _Writer, summary: PredictSummary, total: int, progress: bool) -> None:
    """Rows made elsewhere (`predict --ray`), in input order, written and counted as `_run` writes its own."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="predict", unit="img", dynamic_ncols=True, disable=not progress) as bar:
        for row in rows:
            writer.write(row)
            if "skipped" in row:
                summary.skipped += 1
            else:
                summary.classified += 1
            bar.update(1)


def _write_parquet(f, rows: Iterable[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("path", pa.string()), ("labels", pa.list_(pa.string())), ("indices", pa.list_(pa.int64())),
                        ("probabilities", pa.list_(pa.float64())), ("skipped", pa.string())])
    pq.write_table(pa.Table.from_pylist(list(rows), schema=schema), f)
