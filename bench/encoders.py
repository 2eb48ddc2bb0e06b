"""Lossless encoder settings for derivatives: time and size per setting, one core.

    python bench/encoders.py            # 12 MP, 8- and 16-bit, best of 2

The master is the two-face photograph cpu_side.py uses, scaled to the size: once as it is (a smooth upscale,
whose 16-bit samples are multiples of 257 and compress like the 8-bit ones) and once with the grain of a scan
(``--grain``: Gaussian, in 8-bit levels; the same amplitude in 16 bits, which fills the low byte with noise, as
a scanner's 16-bit output is). Each row calls ``imageio.encode`` with the setting, as Compose does;
``output.png_level`` null is OpenCV's default.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from cpu_side import make_master  # noqa: E402
from pipeline import imageio  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mp", type=float, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--grain", type=float, default=2.0, help="the grainy masters' noise, 8-bit levels (sigma)")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        px8 = cv2.imread(str(make_master(Path(tmp), args.mp, "jpeg")))
    noise = np.random.default_rng(0).normal(0, args.grain, px8.shape).astype(np.float32)
    masters = [("8-bit", "smooth", px8), ("16-bit", "smooth", px8.astype(np.uint16) * 257),
               ("8-bit", "grain", np.clip(px8 + noise, 0, 255).round().astype(np.uint8)),
               ("16-bit", "grain", np.clip(px8 * 257.0 + noise * 257, 0, 65535).round().astype(np.uint16))]
    settings = [(".png", {"png_level": lvl}, f"png_level={lvl}") for lvl in (None, 1, 3, 6, 9)]
    settings += [(".tif", {"tiff_compression": c}, f"tiff_compression={c}") for c in ("lzw", "deflate", "none")]
    for depth, kind, px in masters:
        for ext, kw, label in settings:
            best, data = float("inf"), b""
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                data = imageio.encode(px, ext, **kw)
                best = min(best, time.perf_counter() - t0)
            assert np.array_equal(imageio.decode(data, 10**9).pixels, px), label  # lossless
            print(f"{args.mp:g} MP {depth:<7}{kind:<7}{label:<28}{best * 1000:8.0f} ms {len(data) / 1e6:8.1f} MB")


if __name__ == "__main__":
    main()
