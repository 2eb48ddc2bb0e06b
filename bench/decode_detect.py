"""Decode + detect cost per CPU core, by image size and format, and the CPU cores one GPU needs.

    python bench/decode_detect.py [--detector retinaface_mobile0.25] [--gpu-faces-per-s 800]

Masters are made from a real photograph (shared/images/whole/gfpgan_00.jpg, 2 faces) resized to 1, 12 and
40 MP, as JPEG (quality 90) and 16-bit LZW TIFF. Each case runs the DecodeDetect stage (read, sha256,
header check, decode, detect on a copy downscaled to detect.long_side, align the crops) on one thread in a
fresh process, so its peak RSS is what one DecodeDetect actor needs for that size. The last line is
`images_per_core_s_12mp=<x>` (12 MP JPEG).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
SIZES_MP = (1, 12, 40)


def make(folder: Path) -> list[Path]:
    src = cv2.imread(str(SHARED / "images" / "whole" / "gfpgan_00.jpg"))
    out = []
    for mp in SIZES_MP:
        scale = (mp * 1e6 / (src.shape[0] * src.shape[1])) ** 0.5
        img = cv2.resize(src, (round(src.shape[1] * scale), round(src.shape[0] * scale)), interpolation=cv2.INTER_CUBIC)
        jpg, tif = folder / f"{mp}mp.jpg", folder / f"{mp}mp_16bit.tif"
        cv2.imwrite(str(jpg), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        cv2.imwrite(str(tif), img.astype(np.uint16) * 257, [cv2.IMWRITE_TIFF_COMPRESSION, 5])
        out += [jpg, tif]
    return out


def measure(path: str, detector: str, weights_dir: str, repeat: int) -> None:
    """In a subprocess: one thread, like one DecodeDetect actor with 1 CPU."""
    import resource

    import torch

    torch.set_num_threads(1)
    from pipeline.config import load_config
    from pipeline.stages import DecodeDetect

    cfg = load_config(None, {"weights_dir": weights_dir, "allow_download": False, "detect.model": detector},
                      environ={})
    stage = DecodeDetect(cfg, root=str(Path(path).parent) + "/")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row = stage.process({"image_id": "x", "uri": path})  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        row = stage.process({"image_id": "x", "uri": path})
    per = (time.perf_counter() - t0) / repeat
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"s": per, "faces": row["n_faces"], "status": row["status"], "decode_s": row["decode_s"],
                      "peak_gb": peak / 1024**2, "model_gb": base / 1024**2}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", default="retinaface_mobile0.25")
    ap.add_argument("--weights-dir", default=str(SHARED / "models"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gpu-faces-per-s", type=float, default=800.0,
                    help="GPU throughput to feed (default: 40%% of the 395.5 GFLOP/face roofline of an H100, "
                         "issue 3's target; replace with the figure measured in BENCHMARKS.md)")
    ap.add_argument("--_measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._measure:
        measure(args._measure, args.detector, args.weights_dir, args.repeat)
        return
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-dd-") as d:
        for path in make(Path(d)):
            out = subprocess.run([sys.executable, __file__, "--_measure", str(path), "--detector", args.detector,
                                  "--weights-dir", args.weights_dir, "--repeat", str(args.repeat)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[path.stem] = r
            print(f"{path.stem:>12}: {1 / r['s']:6.2f} images/s per core ({r['s'] * 1e3:7.0f} ms, decode "
                  f"{r['decode_s'] * 1e3:5.0f} ms), {r['faces']} faces, peak RSS {r['peak_gb']:.2f} GB "
                  f"(models loaded: {r['model_gb']:.2f} GB)")
    faces_per_image = 2  # this photograph; archives of portraits are similar, group photos more
    for key in ("12mp", "40mp"):
        per_core = 1 / results[key]["s"]
        cores = args.gpu_faces_per_s / faces_per_image / per_core
        print(f"to feed one GPU at {args.gpu_faces_per_s:.0f} faces/s with {key.upper()} JPEGs of "
              f"{faces_per_image} faces: {cores:.0f} CPU cores of decode+detect ({args.detector})")
    print(f"images_per_core_s_12mp={1 / results['12mp']['s']:.3f}")


if __name__ == "__main__":
    main()
