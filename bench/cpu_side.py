"""The whole CPU side of one image, step by step, on one core: what feeding a GPU costs.

    python bench/cpu_side.py                    # 1 / 12 / 40 MP, JPEG q95 and 16-bit TIFF, 3 repeats
    python bench/cpu_side.py --mp 12 --repeats 5
    python bench/cpu_side.py --mp 12 --formats jpeg --resnet50   # + the default detector's CPU cost

Masters are a real two-face photograph (../shared/images/whole/gfpgan_Blake_Lively.jpg) scaled to the
size. Each step calls the pipeline's own functions, as DecodeDetect and Compose do:
DecodeDetect: read, sha256, decode (header, pixels, monochrome check), detection copy (8-bit BGR,
INTER_AREA to detect.long_side), detect (RetinaFace mobile0.25, the real weights; network and
post-processing), align and crop each face to 512x512. Compose: read again, sha256 check, decode, paste
both faces (the crops stand in for restored faces), encode in the master's format, carry metadata,
write, review crops. Local disk, one torch and one OpenCV thread, median of the repeats. The baseline,
timed in the same run on the same detection copy and left out of the totals: facexlib's own network
(batch norms unfolded, NCHW) and `detect_faces` (prior boxes rebuilt per call), which the pipeline used
before it cached prior boxes and folded the batch norms.

With ``detect.device=gpu`` the DecodeDetect side of a JPEG master is read, sha256 and the header
(``imageio.probe``; steps ``dd.read``, ``dd.sha256``, ``gpu.probe``) and Compose is unchanged; decode,
detection copy, detection and crops move to the GPU actor. That path (``devicefaces.DeviceFaces``) is
also timed here, on this CPU, for information only (``info.device_faces_on_cpu``): on a GPU it costs GPU
time, which this machine cannot measure.

With ``output.device=gpu`` as well, the Restore actor pastes, encodes and crops on the device
(``devicepaste.make_derivative``): the CPU side is DecodeDetect's read, hash and header, the Restore actor
host's header mode and monochrome test of the device's sample (``gm.mode``, ``gm.grey``), and Compose's
read, hash, metadata and writes of the device's JPEGs (``gm.*``). The device's work is timed on this CPU
for information only (``info.device_paste_on_cpu``).

Cores per GPU: at 290 faces/s per H100 (GFP-GAN fp16 at its best micro-batch, measured on an H100 80GB
HBM3: BENCHMARKS.md, twelfth session; until then these figures were set against an assumed 800) and two
faces per image, a GPU takes 145 images/s, so it needs 145 x (CPU seconds per image) cores. The last line is
`cpu_ms_per_12mp_jpeg=<ms> cores_per_h100=<n> gpu_detect_cpu_ms_per_12mp_jpeg=<ms>
gpu_detect_cores_per_h100=<n> gpu_made_cpu_ms_per_12mp_jpeg=<ms> gpu_made_cores_per_h100=<n>` (12 MP JPEG;
the first pair with detection on CPU, the second with ``detect.device=gpu``, the third with
``output.device=gpu`` too).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline import devicepaste, imageio, jpegblocks, metadata, review, storage, weights  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.devicefaces import DeviceFaces  # noqa: E402
from pipeline.faces import FaceDetector, align_matrix, paste_face, warp_face  # noqa: E402

SHARED = Path(os.environ.get("ARCHIVE_SHARED_DIR", ROOT.parent / "shared"))
FACES_PER_S = 290
FACES_PER_IMAGE = 2


def make_master(folder: Path, mp: float, fmt: str) -> Path:
    src = cv2.imread(str(SHARED / "images/whole/gfpgan_Blake_Lively.jpg"))
    f = (mp * 1e6 / (src.shape[0] * src.shape[1])) ** 0.5
    px = cv2.resize(src, (round(src.shape[1] * f), round(src.shape[0] * f)), interpolation=cv2.INTER_CUBIC)
    if fmt == "jpeg":
        path = folder / f"master-{mp:g}mp.jpg"
        cv2.imwrite(str(path), px, [cv2.IMWRITE_JPEG_QUALITY, 95])
    else:
        path = folder / f"master-{mp:g}mp-16bit.tif"
        cv2.imwrite(str(path), px.astype(np.uint16) * 257)
    return path


def bench_config(tmp: Path):
    """The benches' settings: the real mobile0.25 weights (linked into ``tmp``/w), masters up to 200 MP."""
    (tmp / "w").mkdir()
    os.symlink(SHARED / "models/detection_mobilenet0.25_Final.pth", tmp / "w/detection_mobilenet0.25_Final.pth")
    return load_config(None, {"weights_dir": str(tmp / "w"), "allow_download": False,
                              "detect.model": "retinaface_mobile0.25", "input.max_pixels": 200_000_000},
                       environ={})


def official_detector(weights_file: Path) -> "torch.nn.Module":
    """facexlib's RetinaFace as the official code builds it (batch norms unfolded, NCHW), for the baseline."""
    from facexlib.detection.retinaface import RetinaFace

    net = RetinaFace(network_name="mobile0.25", half=False, device=torch.device("cpu"))
    sd = torch.load(weights_file, map_location="cpu", weights_only=True)
    net.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()}, strict=True)
    return net.eval()


def one_image(path: Path, cfg, detector: FaceDetector, official, device_faces, out: Path,
              resnet50: FaceDetector | None = None) -> dict[str, float]:
    """Seconds per step for one image."""
    t: dict[str, float] = {}

    def step(name, fn):
        t0 = time.perf_counter()
        r = fn()
        t[name] = t.get(name, 0.0) + time.perf_counter() - t0
        return r

    # DecodeDetect
    data = step("dd.read", lambda: storage.read_bytes(str(path), cfg.storage))
    sha = step("dd.sha256", lambda: hashlib.sha256(data).hexdigest())
    img = step("dd.decode", lambda: imageio.decode(data, cfg.input.max_pixels))
    h, w = img.pixels.shape[:2]
    s = min(1.0, cfg.detect.long_side / max(h, w))

    def detection_copy():
        bgr = imageio.to_bgr8(img.pixels)
        small = cv2.resize(bgr, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA) if s < 1 else bgr
        return bgr, small

    bgr, small = step("dd.detection_copy", detection_copy)
    faces, _ = step("dd.detect", lambda: detector.detect(small))
    with torch.inference_mode():  # the network alone, same copy (part of dd.detect: for the floor below)
        x = detector.as_input(small) - detector.net.mean_tensor  # as detect_batch hands it to the network
        step("info.detect_network", lambda: detector.net(x))
    with torch.inference_mode():  # the baseline, same copy: facexlib's own network and detect_faces
        step("baseline.detect_facexlib", lambda: official.detect_faces(
            small, conf_threshold=cfg.detect.threshold, nms_threshold=cfg.detect.nms_threshold))
    faces = faces[:FACES_PER_IMAGE]
    assert len(faces) == FACES_PER_IMAGE, f"{path.name}: {len(faces)} faces found"
    crops = step("dd.align_crops", lambda: [warp_face(bgr, align_matrix(f.landmarks / s)) for f in faces])
    if img.format == "JPEG":  # detect.device=gpu: the CPU reads the header; the device does the rest
        step("gpu.probe", lambda: imageio.probe(data, cfg.input.max_pixels))
    # Compose
    data2 = step("c.read", lambda: storage.read_bytes(str(path), cfg.storage))
    step("c.sha256", lambda: hashlib.sha256(data2).hexdigest() == sha)
    img2 = step("c.decode", lambda: imageio.decode(data2, cfg.input.max_pixels))
    pixels = step("c.copy", lambda: img2.pixels.copy())
    changed = step("c.paste", lambda: [paste_face(pixels, c, align_matrix(f.landmarks / s))
                                       for c, f in zip(crops, faces)])
    fmt = img2.format
    enc = step("c.encode", lambda: imageio.encode(pixels, imageio.FORMATS[fmt], cfg.output.jpeg_quality))
    if fmt == "JPEG":  # the alternative, same pixels, left out of the totals: output.jpeg_mode=blocks
        _, t["info.blocks_share"] = step("alt.encode_blocks", lambda: jpegblocks.splice(data2, pixels, changed))
    enc, _ = step("c.metadata", lambda: metadata.carry(data2, enc, fmt, restored=True, software="bench"))
    step("c.write", lambda: storage.write_bytes(str(out / path.name), enc, cfg.storage))
    step("c.review_crops", lambda: [
        storage.write_bytes(str(out / f"{path.name}-{i}-{k}.jpg"),
                            review.crop_jpeg(px, review.crop_box(f.bbox / s, w, h), 256, 88), cfg.storage)
        for i, f in enumerate(faces) for k, px in (("before", img2.pixels), ("after", pixels))])
    if resnet50 is not None:  # the shipped default detector on the same copy (its cost, not its faces)
        step("info.detect_resnet50", lambda: resnet50.detect(small))
    if img.format == "JPEG":  # output.device=gpu: the device made the derivative and its review crops
        step("gm.mode", lambda: imageio.probe(data, cfg.input.max_pixels).mode)  # Restore._made_here
        g = imageio.grey_step(h, w)  # the monochrome test's sample comes to the host (devicepaste.is_grey)
        step("gm.grey", lambda: imageio.chroma_is_grey(np.ascontiguousarray(bgr[::g, ::g])))
        records = [{"bbox": (f.bbox / s).tolist(), "affine": align_matrix(f.landmarks / s).ravel().tolist(),
                    "action": "restored"} for f in faces]
        master = torch.from_numpy(img2.pixels.copy()).permute(2, 0, 1)
        made = devicepaste.make_derivative(master, records, np.stack(crops), cfg.output.jpeg_quality, None,
                                           (cfg.review.crop_size, cfg.review.crop_quality))
        made_data, _ = step("gm.metadata", lambda: metadata.carry(data2, made.derivative, "JPEG", restored=True,
                                                                  software="bench"))
        step("gm.write", lambda: storage.write_bytes(str(out / ("made-" + path.name)), made_data, cfg.storage))
        step("gm.review_writes", lambda: [storage.write_bytes(str(out / f"made-{path.name}-{i}-{k}.jpg"), b, cfg.storage)
                                          for i, pair in enumerate(made.review) for k, b in zip(("b", "a"), pair)])
    if img.format == "JPEG":  # last: its large float temporaries must not disturb the steps timed above
        head = imageio.probe(data, cfg.input.max_pixels)
        found = step("info.device_faces_on_cpu", lambda: device_faces([data], [head.orientation])[0])
        assert len(found.faces) >= FACES_PER_IMAGE, f"{path.name}: the device path found {len(found.faces)} faces"
        master = torch.from_numpy(img2.pixels.copy()).permute(2, 0, 1)
        step("info.device_paste_on_cpu", lambda: devicepaste.make_derivative(
            master, records, np.stack(crops), cfg.output.jpeg_quality, None,
            (cfg.review.crop_size, cfg.review.crop_quality)))
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mp", type=float, nargs="+", default=[1, 12, 40])
    ap.add_argument("--formats", nargs="+", default=["jpeg", "tiff16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--resnet50", action="store_true",
                    help="also time the shipped default detector (retinaface_resnet50; seeded weights: the file "
                         "cannot be had here, and its cost does not depend on them) on the same copy")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = bench_config(tmp)
        detector = FaceDetector(cfg.detect, weights.resolve(cfg.detect.model, cfg))
        official = official_detector(SHARED / "models/detection_mobilenet0.25_Final.pth")
        device_faces = DeviceFaces(detector, cfg.detect.gpu_batch)
        resnet50 = None
        if args.resnet50:
            r50 = cfg.model_copy(update={"untrained": True, "detect": cfg.detect.model_copy(
                update={"model": "retinaface_resnet50"})})
            resnet50 = FaceDetector(r50.detect, weights.resolve(r50.detect.model, r50))
        out = tmp / "out"
        out.mkdir()
        results = {}
        for fmt in args.formats:
            for mp in args.mp:
                path = make_master(tmp, mp, fmt)
                runs = [one_image(path, cfg, detector, official, device_faces, out, resnet50) for _ in range(args.repeats)]
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                results[(fmt, mp)] = med
                dd = sum(v for k, v in med.items() if k.startswith("dd."))
                c = sum(v for k, v in med.items() if k.startswith("c."))
                total = dd + c
                before = total - med["dd.detect"] + med["baseline.detect_facexlib"]
                print(f"\n{fmt} {mp:g} MP ({path.stat().st_size / 1e6:.1f} MB): DecodeDetect {dd * 1000:.0f} ms + "
                      f"Compose {c * 1000:.0f} ms = {total * 1000:.0f} ms; cores per H100 at {FACES_PER_S} faces/s: "
                      f"{FACES_PER_S / FACES_PER_IMAGE * total:.0f}  (with facexlib's detect_faces, the baseline: "
                      f"{before * 1000:.0f} ms, {FACES_PER_S / FACES_PER_IMAGE * before:.0f} cores)")
                if "gpu.probe" in med:
                    gpu = cpu_side_gpu_detect(med)
                    print(f"  with detect.device=gpu: DecodeDetect {(gpu - c) * 1000:.0f} ms + Compose {c * 1000:.0f} ms "
                          f"= {gpu * 1000:.0f} ms of CPU; cores per H100: {FACES_PER_S / FACES_PER_IMAGE * gpu:.0f} "
                          f"(the device path on this CPU: {med['info.device_faces_on_cpu'] * 1000:.0f} ms)")
                if "gm.metadata" in med:
                    made = cpu_side_gpu_made(med)
                    print(f"  with detect.device=gpu and output.device=gpu: {made * 1000:.0f} ms of CPU; cores per H100: "
                          f"{FACES_PER_S / FACES_PER_IMAGE * made:.1f} (the device's paste, encode and crops on this CPU: "
                          f"{med['info.device_paste_on_cpu'] * 1000:.0f} ms)")
                floor = cpu_floor(med)
                print(f"  floor with CPU detection (two decodes, the INTER_AREA copy, the network alone, the "
                      f"encode; nothing else): {floor * 1000:.0f} ms")
                if "alt.encode_blocks" in med:
                    blocks = total - med["c.encode"] + med["alt.encode_blocks"]
                    print(f"  with output.jpeg_mode=blocks: encode {med['alt.encode_blocks'] * 1000:.0f} ms instead of "
                          f"{med['c.encode'] * 1000:.0f} ms ({med['info.blocks_share']:.0%} of the MCUs encoded "
                          f"again), whole CPU side {blocks * 1000:.0f} ms")
                for k, v in med.items():
                    if k == "info.blocks_share":
                        continue
                    print(f"  {k:<28}{v * 1000:8.1f} ms")
    r = results.get(("jpeg", 12))
    total = sum(v for k, v in r.items() if k.startswith(("dd.", "c."))) if r else float("nan")
    gpu = cpu_side_gpu_detect(r) if r else float("nan")
    made = cpu_side_gpu_made(r) if r else float("nan")
    floor = cpu_floor(r) if r else float("nan")
    per = FACES_PER_S / FACES_PER_IMAGE
    print(f"cpu_ms_per_12mp_jpeg={total * 1000:.1f} cores_per_h100={per * total:.1f} "
          f"gpu_detect_cpu_ms_per_12mp_jpeg={gpu * 1000:.1f} gpu_detect_cores_per_h100={per * gpu:.1f} "
          f"gpu_made_cpu_ms_per_12mp_jpeg={made * 1000:.1f} gpu_made_cores_per_h100={per * made:.1f} "
          f"cpu_floor_ms_per_12mp_jpeg={floor * 1000:.1f}")


def cpu_floor(med: dict[str, float]) -> float:
    """What no CPU-detection implementation of this design avoids, whatever else it cuts: a decode in each
    stage (DecodeDetect, Compose), the INTER_AREA detection copy (a reduced decode instead moved landmarks
    by 2.3 px: BENCHMARKS.md, fourth session), the detector's network in float32 (bfloat16:
    bench/detect_precision.py), and the derivative's encode."""
    return sum(med[k] for k in ("dd.decode", "dd.detection_copy", "info.detect_network", "c.decode", "c.encode"))


def cpu_side_gpu_made(med: dict[str, float]) -> float:
    """CPU seconds of a JPEG master with detect.device=gpu and output.device=gpu: DecodeDetect reads, hashes
    and probes; the Restore actor's host reads the header's mode and tests the monochrome sample; Compose reads
    and hashes the master again, carries its metadata into the device's JPEG and writes it and the crops."""
    return sum(med[k] for k in ("dd.read", "dd.sha256", "gpu.probe", "c.read", "c.sha256")) + \
        sum(v for k, v in med.items() if k.startswith("gm."))


def cpu_side_gpu_detect(med: dict[str, float]) -> float:
    """CPU seconds of a JPEG master with detect.device=gpu: DecodeDetect reads, hashes and probes; Compose
    as with CPU detection."""
    return med["dd.read"] + med["dd.sha256"] + med["gpu.probe"] + sum(v for k, v in med.items() if k.startswith("c."))


if __name__ == "__main__":
    main()
