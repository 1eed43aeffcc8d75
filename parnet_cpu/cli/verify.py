"""`parnet-cpu verify DIR`: check a model folder the way every loader does, and say what it found.

The same checks run at every load (`ModelDir.open` and `ModelDir.ir_path`, hence Runtime, serve, eval and
bench): every manifest field against the schema, the manifest's own content against its digest, each model
file against its recorded size and sha256, and each IR against the manifest (input shape, class count,
whether an "int8" file really is quantized). `--stamp` is the one way to accept a manifest its digest does
not cover (made by an older parnet-cpu, or edited on purpose): it records the current content, once the
model files match their digests (where recorded) and the IRs pass the other checks.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from parnet_cpu.cli.common import add_json_arg, check_output_arg, json_to_stdout, write_json_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a model folder's files and manifest (what every load checks)",
                       description="Check a model folder: manifest fields, sha256 and size of every model file, "
                       "and each IR against the manifest (input shape, classes, precision). Exit 0 when all pass.")
    p.add_argument("model", metavar="DIR", help="model folder written by export or quantize")
    p.add_argument("--stamp", action="store_true",
                   help="accept the folder as it is now: record the digest of parnet.json's content and the "
                   "sha256+size of each model file (for a folder from an older parnet-cpu, or after a deliberate "
                   "edit of parnet.json; refused when a recorded file digest or an IR check fails)")
    add_json_arg(p, "the checks")
    p.set_defaults(handler=run)


def collect(path: str) -> dict:
    """Every check with its outcome: {"manifest": [...problems], "seal": [...], "files": {...}, "precisions": {...}}."""
    from parnet_cpu.artifacts import IR_FILES, ModelDir, ModelDirError, ir_problems, model_files, seal_problems

    try:
        md = ModelDir.open(path, require_seal=False)  # the seal is reported below, with everything else
    except ModelDirError as exc:
        return {"model": path, "manifest": [str(exc)], "ok": False}
    seal = seal_problems(md.manifest)
    recorded = md.manifest.get("files") or {}
    names = sorted(set(model_files(md.path)) | set(recorded))
    t0 = time.perf_counter()
    files = {n: (md.file_problems([n]) or ["ok"]) if recorded else ["not recorded"] for n in names}
    digest_ms = (time.perf_counter() - t0) * 1e3
    precisions = {}
    for p in md.precisions:
        t0 = time.perf_counter()
        precisions[p] = {"problems": ir_problems(md.path / IR_FILES[p], p, md.config),
                         "ms": round((time.perf_counter() - t0) * 1e3, 1)}
    ok = not seal and all(v == ["ok"] for v in files.values())
    ok = ok and all(not v["problems"] for v in precisions.values()) and bool(precisions)
    err = md.seal_error()
    return {"model": str(md.path), "manifest": [], "schema": md.manifest.get("schema", 1), "seal": seal,
            "stamped": not seal, "serving_only": md.manifest.get("serving_only"), "files": files, "digest_ms": round(digest_ms, 1), "precisions": precisions,
            "ok": ok, "hint": str(err) if err else None}


def format_checks(r: dict) -> str:
    lines = [f"model folder  {r['model']}"]
    if r["manifest"]:
        return "\n".join(lines + [f"manifest      FAILED: {r['manifest'][0]}"])
    lines.append(f"manifest      fields ok (schema {r['schema']}); content digest "
                 + ("ok" if not r["seal"] else f"FAILED: {r['seal'][0]}"))
    for name, res in r["files"].items():
        lines.append(f"  {name:<22} {'; '.join(res)}")
    if r.get("serving_only"):
        lines.append(f"serving-only  keeps {', '.join(r['serving_only']['precisions'])} (`parnet-cpu slim` removed "
                     f"{', '.join(r['serving_only']['removed']) or 'nothing'})")
    if r["stamped"]:
        lines.append(f"digests       checked in {r['digest_ms']:.0f} ms")
    for p, res in r["precisions"].items():
        lines.append(f"{p} IR       " + ("ok (input shape, classes, precision)" if not res["problems"] else
                                        "FAILED") + f" ({res['ms']:.0f} ms)")
        lines += [f"  - {x}" for x in res["problems"]]
    if not r["precisions"]:
        lines.append("no OpenVINO IR in the folder")
    if r.get("hint"):
        lines.append(f"note          {r['hint']}")
    lines.append("result        " + ("ok" if r["ok"] else "FAILED"))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from parnet_cpu.artifacts import MANIFEST, ModelDirError, stamp_manifest
    from parnet_cpu.cli import CliError

    check_output_arg(args, "json", "verify")  # before the checks (a FILE inside DIR would change the folder)
    result = collect(args.model)
    if args.stamp and not result["manifest"]:
        if any(v not in (["ok"], ["not recorded"]) for v in result["files"].values()):
            raise CliError(f"{args.model}: files do not match their recorded digests; refusing to re-stamp them "
                           "(re-export or re-quantize the folder)\n" + format_checks(result))
        if not all(not v["problems"] for v in result["precisions"].values()) or not result["precisions"]:
            raise CliError("refusing to stamp a folder whose IR fails its checks\n" + format_checks(result))
        if result["seal"]:
            print(f"stamping: {result['seal'][0]}; the current content of {MANIFEST} is recorded as trusted")
        try:
            stamp_manifest(Path(args.model))
        except ModelDirError as exc:
            raise CliError(str(exc)) from None
        result = collect(args.model)
    if not json_to_stdout(args):
        print(format_checks(result))
    write_json_arg(args, "verify", result)
    if not result["ok"]:
        raise CliError(f"{args.model} failed verification (see above)")
    return 0
