"""Issue 21: decode cost is bounded on the work of every preprocessing step, not on the decoded size only.

One plan (`data.preprocess.plan_preprocess`), computed from the image header and the PreprocessConfig
before any pixel is decoded or resized, bounds the decoded pixels, every intermediate (mode conversion,
the shorter-side resize) and so the aspect ratio. Real PNG/JPEG/TIFF/GIF files made here, real `eval`
subprocesses (peak RSS measured), a real `parnet-cpu serve` answering over HTTP.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from parnet_cpu.data import ImageDecodeError, ImageTooLargeError, PreprocessConfig, bundled_calibration_dir
from parnet_cpu.data.inputs import MAX_IMAGE_PIXELS, preprocess_input
from parnet_cpu.data.preprocess import (load_and_preprocess, plan_image,
                                        plan_preprocess, preprocess)
from conftest import GatedWork, eventually
from test_serve import ServerProcess

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("own_lease_namespace")  # conftest: leases are machine-wide

CONFIGS = {
    "default": PreprocessConfig(),
    "narrow_grey": PreprocessConfig(input_size=64, channels=1, interpolation="bilinear"),
}


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def normal_images() -> dict[str, bytes]:
    """Ordinary images in every decoding branch (lossless synthetic ones, so their pixels do not depend on
    an encoder's version) plus the bundled photos: their tensors are pinned in GOLDEN."""
    rng = np.random.default_rng(21)

    def px(h: int, w: int, c: int | None = None, hi: int = 256, dtype=np.uint8) -> np.ndarray:
        return rng.integers(0, hi, (h, w) if c is None else (h, w, c)).astype(dtype)

    pal = Image.fromarray(px(90, 130), "L").convert("P")
    pal_t = pal.copy()
    pal_t.info["transparency"] = 7
    out = {
        "rgb.png": encode(Image.fromarray(px(200, 300, 3), "RGB"), "PNG"),
        "grey.png": encode(Image.fromarray(px(301, 97), "L"), "PNG"),
        "bilevel.png": encode(Image.fromarray(px(70, 50) > 127), "PNG"),
        "grey16.png": encode(Image.fromarray(px(80, 120, hi=65536, dtype=np.uint16)), "PNG"),
        "palette.png": encode(pal, "PNG"),
        "palette_transparent.png": encode(pal_t, "PNG", transparency=7),
        "la.png": encode(Image.fromarray(px(64, 48, 2), "LA"), "PNG"),
        "rgba.png": encode(Image.fromarray(px(100, 150, 4), "RGBA"), "PNG"),
        "float.tiff": encode(Image.fromarray(rng.random((60, 90), dtype=np.float32) * 1.2 - 0.1, "F"), "TIFF"),
        "int32.tiff": encode(Image.fromarray(px(50, 70, hi=70000, dtype=np.int32) - 1000, "I"), "TIFF"),
        "cmyk.tiff": encode(Image.fromarray(px(40, 60, 4), "CMYK"), "TIFF"),
        "wide_50to1.png": encode(Image.fromarray(px(40, 2000, 3), "RGB"), "PNG"),
        "thin_600x1.png": encode(Image.fromarray(px(1, 600, 3), "RGB"), "PNG"),
        "gif_frame.gif": encode(Image.fromarray(px(33, 77), "L").convert("P"), "GIF"),
    }
    photos = bundled_calibration_dir()
    assert photos is not None
    for p in sorted(Path(photos).glob("*.jpg")):
        out[p.name] = p.read_bytes()
    return out


# sha256[:16] of load_and_preprocess(bytes, config) as the code gave them before issue 21 (Pillow 13.0.0)
GOLDEN = {
    "astronaut.jpg|default": "044c89c8c1a3cd3a",
    "astronaut.jpg|narrow_grey": "1b3b3e4fe6b52bf5",
    "astronaut_helmet.jpg|default": "5e09995a0c0419a8",
    "astronaut_helmet.jpg|narrow_grey": "285d0bea8686c172",
    "astronaut_portrait.jpg|default": "b68698e6f3c1a5b6",
    "astronaut_portrait.jpg|narrow_grey": "91b86f4447ee81a4",
    "bilevel.png|default": "af113f2d93a8cdfc",
    "bilevel.png|narrow_grey": "006e905e54617d04",
    "brick_wall_gray.jpg|default": "b679fd8ff2409cf1",
    "brick_wall_gray.jpg|narrow_grey": "f902affe89432876",
    "cameraman_gray.jpg|default": "b57f3c07a3ebfbdc",
    "cameraman_gray.jpg|narrow_grey": "13b6dbf896655b97",
    "cameraman_tripod_gray_portrait.jpg|default": "9859d11b455327d5",
    "cameraman_tripod_gray_portrait.jpg|narrow_grey": "08367ffe1693a15b",
    "cat_chelsea.jpg|default": "7efbde761d5bfac0",
    "cat_chelsea.jpg|narrow_grey": "b13e77f23f9e16a7",
    "cat_chelsea_face.jpg|default": "5c0dd1462ba54801",
    "cat_chelsea_face.jpg|narrow_grey": "6ca548ced39d93bb",
    "china_pagoda_portrait.jpg|default": "29726ddb4437bef7",
    "china_pagoda_portrait.jpg|narrow_grey": "ca785ba4d3f317ab",
    "china_summer_palace.jpg|default": "b14c70249d2c9e46",
    "china_summer_palace.jpg|narrow_grey": "337a15b66a514219",
    "clock_motion_blur_gray.jpg|default": "d721ea81cc0d5f58",
    "clock_motion_blur_gray.jpg|narrow_grey": "efd3a0aac504b426",
    "cmyk.tiff|default": "a24a6842d09f48c4",
    "cmyk.tiff|narrow_grey": "715d192fe64581c6",
    "coffee_cup.jpg|default": "c44e4565b2b2bfd3",
    "coffee_cup.jpg|narrow_grey": "2f73253d02e8bbab",
    "coffee_cup_closeup.jpg|default": "655db678b0dba0ac",
    "coffee_cup_closeup.jpg|narrow_grey": "29d7e9ec74fe651d",
    "float.tiff|default": "505340170c56c888",
    "float.tiff|narrow_grey": "19a7b1c9aae69fd8",
    "flower_dahlia.jpg|default": "b3f54958ebd9cd1b",
    "flower_dahlia.jpg|narrow_grey": "83674f8f6e58d49e",
    "flower_dahlia_closeup.jpg|default": "796b82c8116bf498",
    "flower_dahlia_closeup.jpg|narrow_grey": "a66772dcf74d34a3",
    "gif_frame.gif|default": "00aa263d1f6bbf5a",
    "gif_frame.gif|narrow_grey": "56dd8723a7c9e081",
    "grass_gray.jpg|default": "1643830d8dea8d1a",
    "grass_gray.jpg|narrow_grey": "fedd645ee453fe53",
    "gravel_gray.jpg|default": "9b8b33ff2697714f",
    "gravel_gray.jpg|narrow_grey": "dfd1266e3c448fbc",
    "grey.png|default": "5fbb36e319076eb2",
    "grey.png|narrow_grey": "2b2237d89bb3f183",
    "grey16.png|default": "8a1ff4bb4f3a6053",
    "grey16.png|narrow_grey": "7b9e54377b2d6a61",
    "handwriting_gray.jpg|default": "db20e97d56c77ad7",
    "handwriting_gray.jpg|narrow_grey": "1ecf08a1c7715af0",
    "hubble_deep_field.jpg|default": "81d13c60db5d60c8",
    "hubble_deep_field.jpg|narrow_grey": "2a506fc73af0e0b0",
    "hubble_deep_field_detail.jpg|default": "4a4c0c057720901c",
    "hubble_deep_field_detail.jpg|narrow_grey": "fdb1d4c8a2c1a050",
    "int32.tiff|default": "719a63110dcf36f9",
    "int32.tiff|narrow_grey": "55e3209c49db0702",
    "la.png|default": "d667776da8d83a22",
    "la.png|narrow_grey": "4e462c37b4468368",
    "palette.png|default": "3e3e1b4369f21442",
    "palette.png|narrow_grey": "517607077a697f65",
    "palette_transparent.png|default": "85ca0c0f1c144840",
    "palette_transparent.png|narrow_grey": "2b799cb2d6932a3c",
    "retina_fundus.jpg|default": "0bea565013089b57",
    "retina_fundus.jpg|narrow_grey": "a33efb513530685d",
    "retina_optic_disc.jpg|default": "b7364d997dfa8b51",
    "retina_optic_disc.jpg|narrow_grey": "c128d8fe8e471e51",
    "rgb.png|default": "f6224f4b10e47d55",
    "rgb.png|narrow_grey": "f4188bd64c65a3a5",
    "rgba.png|default": "e84f1ecc463dade2",
    "rgba.png|narrow_grey": "618f1430ae4f2a85",
    "rocket_launch.jpg|default": "49d7ae3a6abccc3f",
    "rocket_launch.jpg|narrow_grey": "6787dee7eaf0b38a",
    "rocket_launch_portrait.jpg|default": "351a925a27749507",
    "rocket_launch_portrait.jpg|narrow_grey": "f4527e97a35cf7ae",
    "thin_600x1.png|default": "189b8f35d4d43fbf",
    "thin_600x1.png|narrow_grey": "32b3a33d51dad653",
    "wide_50to1.png|default": "2a7159ac8d4342fc",
    "wide_50to1.png|narrow_grey": "d92861a423d5c75e",
}


def thin_files(folder: Path) -> dict[str, Path]:
    """Hostile shapes: the issue's three, and thin images in other formats and modes (16-bit, palette, LA,
    TIFF, GIF, JPEG). Each is small on disk and few pixels decoded, but its shorter-side resize is huge: at
    least 40000:1, so over Pillow's 179 M-pixel limit (eval's default) even at the narrow model's 73 px."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {
        "wide_40000x1.png": (Image.new("RGB", (40000, 1), (200, 10, 10)), "PNG"),
        "tall_1x40000.png": (Image.new("RGB", (1, 40000), (10, 200, 10)), "PNG"),
        "wide_100000x1.png": (Image.new("RGB", (100000, 1), (10, 10, 200)), "PNG"),
        "wide_65000x1.jpg": (Image.new("RGB", (65000, 1), (90, 90, 90)), "JPEG"),
        "grey16_50000x1.png": (Image.new("I;16", (50000, 1), 40000), "PNG"),
        "palette_1x60000.gif": (Image.new("P", (1, 60000), 3), "GIF"),
        "la_60000x1.png": (Image.new("LA", (60000, 1), (100, 128)), "PNG"),
        "cmyk_2x100000.tiff": (Image.new("CMYK", (2, 100000), (0, 50, 100, 0)), "TIFF"),
    }
    out = {}
    for name, (img, fmt) in shapes.items():
        (folder / name).write_bytes(encode(img, fmt))
        out[name] = folder / name
    return out


# ---------------------------------------------------------------------------------------------- the plan

@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_ordinary_images_give_the_same_tensors_as_before(config):
    """Bit-identical to the code before the plan existed, in every decoding branch (grey, 1-bit, 16-bit,
    float, int32, palette +- transparency, LA, RGBA, CMYK, GIF, a 50:1 banner, a 600x1 line) and the photos."""
    cfg = CONFIGS[config]
    got = {f"{name}|{config}": hashlib.sha256(load_and_preprocess(data, cfg, name=name).tobytes()).hexdigest()[:16]
           for name, data in normal_images().items()}
    assert got == {k: v for k, v in GOLDEN.items() if k.endswith(f"|{config}")}


def test_thin_images_are_refused_from_the_header_with_the_step_and_numbers_and_allocate_nothing(tmp_path):
    """Every entry (path, bytes, file object, PIL image, uint8 array, decode_image with a config,
    resize_shorter_side, plan_image) refuses each thin file as ImageTooLargeError naming the resize and its
    numbers, at the server's limit and at the default one; a fresh process doing all of it stays small."""
    files = thin_files(tmp_path / "thin")
    script = r"""
import io, json, sys
import numpy as np
from PIL import Image
from parnet_cpu.data import ImageDecodeError, ImageTooLargeError, PreprocessConfig
from parnet_cpu.data.inputs import preprocess_input
from parnet_cpu.data.preprocess import decode_image, load_and_preprocess, plan_image, resize_shorter_side
cfg, out = PreprocessConfig(), {}
for path in sys.argv[1:]:
    data = open(path, "rb").read()
    lazy = Image.open(path)
    calls = {
        "path": lambda: load_and_preprocess(path, cfg),
        "bytes_40M": lambda: load_and_preprocess(data, cfg, max_pixels=40_000_000),
        "file_object": lambda: load_and_preprocess(io.BytesIO(data), cfg),
        "plan_image": lambda: plan_image(data, cfg, max_pixels=40_000_000),
        "decode_image_cfg": lambda: decode_image(data, cfg=cfg),
        "lazy_pil": lambda: preprocess_input(lazy, cfg),
        "uint8_array": lambda: preprocess_input(np.zeros((lazy.height, lazy.width, 3), np.uint8), cfg),
        "resize_shorter_side": lambda: resize_shorter_side(Image.new("L", lazy.size), 256),
    }
    for how, call in calls.items():
        try:
            call()
            out[f"{path}|{how}"] = "ACCEPTED"
        except ImageTooLargeError as exc:
            out[f"{path}|{how}"] = exc.reason
        except ImageDecodeError as exc:
            out[f"{path}|{how}"] = "NOT TOO LARGE: " + exc.reason
# VmHWM, not ru_maxrss: the kernel carries the forking parent's peak (pytest's) into ru_maxrss across exec
out["maxrss_mb"] = int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")).split()[1]) / 1024
print(json.dumps(out))
"""
    run = subprocess.run([sys.executable, "-c", script, *map(str, files.values())], capture_output=True, text=True,
                         timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout)
    assert res.pop("maxrss_mb") < 250  # before: 10.8 GB for the first file alone; MemoryError for 100000x1
    assert len(res) == 8 * len(files)
    for key, reason in res.items():
        path = key.split("|")[0]
        w, h = Image.open(path).size
        assert reason.startswith("resize: the shorter-side resize of a "), key + ": " + reason
        assert f"{w}x{h} image" in reason and "aspect ratio at most" in reason, key + ": " + reason
    assert "10240000x256 intermediate of 2621440000 pixels" in res[f"{files['wide_40000x1.png']}|path"]
    assert "more than the limit of 40000000" in res[f"{files['wide_40000x1.png']}|bytes_40M"]


def test_limits_are_exact_and_a_small_limit_still_resizes_ordinary_images():
    """At a 120000-pixel limit with a 64 px input (resize to 73): 400x300 (exactly the limit) passes and
    401x300 is refused at decode; 1x22 (resize 73x1606 = 117238 px) passes, 1x23 (122567 px) is refused at
    resize. A limit below what any resize needs (100 px) refuses every image: no bound grows with the config."""
    cfg = PreprocessConfig(input_size=64)
    r = cfg.resize_size
    assert r == 73

    def run(w: int, h: int, limit: int) -> str:
        try:
            load_and_preprocess(encode(Image.new("RGB", (w, h), (1, 2, 3)), "PNG"), cfg, max_pixels=limit)
            return "ok"
        except ImageTooLargeError as exc:
            return exc.reason

    assert run(400, 300, 120_000) == "ok"
    assert run(401, 300, 120_000).startswith("decode: image of 401x300 pixels is larger than the limit of 120000")
    assert run(1, 22, 120_000) == "ok"
    assert run(1, 23, 120_000).startswith("resize: ") and "73x1679 intermediate of 122567 pixels" in run(1, 23, 120_000)
    # no bound scales with the config: below the resize's 73x73 even a 10x10 image is refused (hostile21 #7)
    assert run(10, 10, 100).startswith("resize: ") and "73x73 intermediate of 5329 pixels" in run(10, 10, 100)
    assert run(1, 16, 100).startswith("resize: ")
    # a 3000x2 JPEG: refused at the server's 40 M; under Pillow's default limit (eval, quantize) its
    # 384000x256 resize is allowed, and the plan says what it costs before anything is decoded
    with pytest.raises(ImageTooLargeError, match="384000x256 intermediate of 98304000 pixels"):
        plan_image(encode(Image.new("RGB", (3000, 2)), "JPEG"), PreprocessConfig(), max_pixels=MAX_IMAGE_PIXELS)
    assert 98304000 * 4 < plan_image(encode(Image.new("RGB", (3000, 2)), "JPEG"), PreprocessConfig()).bytes < 2**30
    # the plan counts every step and sizes them from the header
    plan = plan_preprocess((500, 375), "RGBA", PreprocessConfig(), fmt="PNG")
    assert [s[0] for s in plan.steps] == ["decode", "exif orientation", "convert RGBA", "resize (first pass)",
                                          "resize", "crop"]
    assert plan.steps[-2][1:3] == (341, 256) and plan.bytes > 500 * 375 * 4
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        plan_image(b"not an image", cfg)


@pytest.mark.parametrize("fmt,size", [("WEBP", (16383, 1)), ("BMP", (1, 20000)), ("PNG", (3, 30000)),
                                      ("TIFF", (20000, 2))])
def test_thin_images_of_every_format_are_refused_at_the_servers_limit(fmt, size):
    """Formats and shapes nobody listed (WebP at its 16383 px maximum, BMP, a 3 px wide PNG, a 2 px TIFF):
    refused from the header at 40 M pixels, by the plan and by the full decode, naming the resize."""
    data = encode(Image.new("RGB", size, (3, 4, 5)), fmt)
    too_large = rf": resize: .* {size[0]}x{size[1]} image .*more than the limit of 40000000"
    with pytest.raises(ImageTooLargeError, match=too_large):
        plan_image(data, PreprocessConfig(), max_pixels=MAX_IMAGE_PIXELS)
    with pytest.raises(ImageTooLargeError, match="resize: "):
        load_and_preprocess(data, PreprocessConfig(), max_pixels=MAX_IMAGE_PIXELS)


def test_pil_images_and_arrays_keep_the_too_large_class_and_the_callers_limit():
    """A PIL image / array over the resize bound is ImageTooLargeError (the server's 413), not a generic
    'preprocessing failed', and the embedding API's 40 M default is the bound, not Pillow's larger one."""
    thin = Image.new("RGB", (1, 1000), (5, 5, 5))  # resize 256x256000 = 65.5 M pixels: under Pillow's, over 40 M
    with pytest.raises(ImageTooLargeError, match="more than the limit of 40000000"):
        preprocess_input(thin, PreprocessConfig())
    with pytest.raises(ImageTooLargeError, match="more than the limit of 40000000"):
        preprocess_input(np.zeros((1000, 1, 3), np.uint8), PreprocessConfig(), max_pixels=MAX_IMAGE_PIXELS)
    with pytest.raises(ImageTooLargeError, match="resize: "):
        preprocess(Image.new("L", (1, 5000)), PreprocessConfig())
    assert preprocess_input(thin, PreprocessConfig(), max_pixels=100_000_000).shape == (3, 224, 224)


# ---------------------------------------------------------------------------------------------- eval / quantize

@pytest.fixture(scope="module")
def model_dir(narrow_copy, tmp_path_factory) -> Path:
    return narrow_copy(tmp_path_factory.mktemp("guards_decode") / "narrow")


def test_eval_lists_thin_files_as_skipped_with_their_reason_and_stays_small(model_dir, tmp_path):
    """`parnet-cpu eval` over a labelled folder holding the thin files and two photos: exit 0, the photos
    evaluated, every thin file in the JSON's `skipped` with its resize reason, peak RSS of the eval process
    a few hundred MB (before: 11 GB)."""
    data = tmp_path / "val"
    photos = sorted(Path(bundled_calibration_dir()).glob("*.jpg"))[:2]
    (data / "n01440764").mkdir(parents=True)
    for p in photos:
        shutil.copy(p, data / "n01440764" / p.name)
    thin = thin_files(data / "n01443537")
    wrapper = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "parnet_cpu", "eval", "--model-dir",
                          str(model_dir), "--data", str(data), "--json", str(tmp_path / "r.json"), "--quiet",
                          "--workers", "2"], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    peak_mb = int(run.stdout.strip().splitlines()[-1]) / 1024
    assert peak_mb < 400, peak_mb  # ~120 MB for the two photos alone
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["labelled"] == 2
    skipped = dict(result["skipped"])
    assert sorted(skipped) == sorted(str(p) for p in thin.values())
    for path, reason in skipped.items():
        w, h = Image.open(path).size
        assert reason.startswith("resize: ") and f"{w}x{h} image" in reason, reason
    assert "undecodable skipped" in run.stdout


# ---------------------------------------------------------------------------------------------- serve

@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("guards_decode_srv"), "--plan", "single",
                        "--precision", "fp32")
    yield srv
    srv.stop()


def vm_hwm_mb(pid: int) -> float:
    """Peak resident memory of a process so far (VmHWM), in MB."""
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def test_serve_refuses_thin_uploads_with_413_json_while_a_normal_request_answers(server, tmp_path):
    """Raw bodies and multipart uploads of every thin file answer 413 with a JSON error naming the resize,
    sent concurrently with ordinary photos that all answer 200; the server's peak RSS stays where it was
    (before: 10.8 GB for one 40000x1 PNG, and the concurrent photo waited 25.7 s)."""
    files = thin_files(tmp_path / "thin")
    photo = sorted(Path(bundled_calibration_dir()).glob("*.jpg"))[0].read_bytes()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/v1/classify", content=photo, headers={"content-type": "image/jpeg"}).status_code == 200
        before = vm_hwm_mb(server.proc.pid)
        answers: dict[str, httpx.Response] = {}

        def thin_request(name: str, multipart: bool) -> None:
            data = files[name].read_bytes()
            answers[f"{name}|{multipart}"] = (c.post("/v1/classify", files={"file": (name, data)}) if multipart
                                              else c.post("/v1/classify", content=data,
                                                          headers={"content-type": "application/octet-stream"}))

        def normal_request(i: int) -> None:
            answers[f"photo{i}"] = c.post("/v1/classify?top_k=3", content=photo, headers={"content-type": "image/jpeg"})

        threads = [threading.Thread(target=thin_request, args=(name, mp)) for name in files for mp in (False, True)]
        threads += [threading.Thread(target=normal_request, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for key, r in answers.items():
        if key.startswith("photo"):
            assert r.status_code == 200 and len(r.json()["predictions"]) == 3, r.text
        else:
            w, h = Image.open(files[key.split("|")[0]]).size
            assert r.status_code == 413, (key, r.status_code, r.text)
            assert r.json()["error"].startswith("resize: ") and f"{w}x{h} image" in r.json()["error"], r.text
            assert "more than the limit of 40000000" in r.json()["error"]
    assert vm_hwm_mb(server.proc.pid) - before < 100


def test_decode_budget_queues_decodes_that_do_not_fit_and_gives_bytes_back_when_the_thread_ends():
    """The server's decode budget, with real pool threads held on gates: a decode that does not fit waits
    (first come first served) until bytes are given back; bytes are given back when the thread finishes,
    even if the awaiting request was cancelled; a waiter that goes away does not block the queue; a decode
    larger than the whole budget runs alone. Bytes in running threads never exceed the budget."""
    from parnet_cpu.serve.app import DecodeBudget

    gated = GatedWork()
    state, started, gates, work, until = gated.state, gated.started, gated.gates, gated.work, eventually

    async def main() -> None:
        budget, pool = DecodeBudget(100, patience_s=0), ThreadPoolExecutor(8)  # patience 0: strict arrival order
        sizes = {"a": 60, "b": 60, "c": 30, "gone": 10, "d": 5, "huge": 500}
        for name in sizes:
            started[name], gates[name] = threading.Event(), threading.Event()

        def start(name: str, clamp: int | None = None) -> asyncio.Task:
            return asyncio.create_task(budget.run(sizes[name], pool, work, name, clamp or sizes[name]))

        a = start("a")
        await until(started["a"].is_set, "a")
        b, c = start("b"), start("c")  # b does not fit beside a; c fits, but queues behind b
        gone, d = start("gone"), start("d")
        await asyncio.sleep(0.2)
        assert not started["b"].is_set() and not started["c"].is_set() and budget.used == 60
        gone.cancel()  # a waiter that goes away
        a.cancel()  # the request went away, its thread still runs: its bytes stay held
        await asyncio.sleep(0.2)
        assert budget.used == 60 and not started["b"].is_set()
        gates["a"].set()  # the thread ends: b, then c fit (90); d (5) fits too, gone never runs
        await until(lambda: started["b"].is_set() and started["c"].is_set() and started["d"].is_set(), "b, c, d")
        assert budget.used == 95 and not started["gone"].is_set()
        huge = start("huge", 100)
        await asyncio.sleep(0.2)
        assert not started["huge"].is_set()
        for name in ("b", "c", "d"):
            gates[name].set()
        await until(started["huge"].is_set, "huge")
        assert budget.used == 100
        gates["huge"].set()
        assert await huge == "huge" and await b == "b" and await c == "c" and await d == "d"
        await until(lambda: budget.used == 0, "all bytes given back")
        pool.shutdown()

    asyncio.run(main())
    assert state["peak"] <= 100
