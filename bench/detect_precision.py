"""Detection in bfloat16 on the CPU: what it would save, and how far it moves the faces.

    python bench/detect_precision.py [--photos N]   # N: the first N photos only (default: all)

The CPU side's largest step is RetinaFace mobile0.25 on the 1,600 px detection copy (~8.2 GFLOP; ~130 ms
on one core in float32, BENCHMARKS.md). CPUs with AVX512-BF16 or AMX run it about twice as fast under
``torch.autocast("cpu", dtype=torch.bfloat16)`` (AVX512 without them: emulated, likely no faster). This
bench measures both halves of that trade on this machine (where oneDNN runs bfloat16 at all: natively, or
emulated through AVX512): the network's time on
one core (median of 5 interleaved runs, after a warm-up), float32 against bfloat16; and, over every photo
of ../shared/images (whole/, old/, gray/, identity/, in that order) enlarged so that its detection copy is
1,600 px (as for a 12 MP master), the faces bfloat16 finds against float32's: photos whose face count
differs, and, on the others, the largest landmark distance (pixels at the detection scale) between faces
paired by their nearest box centres. The last line is
``net_ms_fp32=<ms> net_ms_bf16=<ms> photos_count_differs=<n> worst_landmark_px=<px> median_face_worst_px=<px>``.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT / "bench"))
from cpu_side import SHARED, bench_config  # noqa: E402
from pipeline import weights  # noqa: E402
from pipeline.faces import FaceDetector  # noqa: E402


class _Autocast(torch.nn.Module):
    """The detector's network under bfloat16 autocast, its outputs back in float32 for the post-processing."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.mean_tensor, self.cfg = net, net.mean_tensor, net.cfg

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return tuple(t.float() for t in self.net(x))


def _interleaved_ms(fns, n: int = 5) -> list[float]:
    """The median time of each of ``fns``, run in turn ``n`` times after a warm-up (this machine's speed drifts
    between minutes: interleaving exposes both to the same drift)."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(n):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) * 1e3 for ts in times]


def _faces(det: FaceDetector, net: torch.nn.Module, small: np.ndarray):
    det.net, keep = net, det.net
    try:
        return det.select(det._detect_faces(small), 1.0)[0]
    finally:
        det.net = keep


def _distance(fa, b) -> float:
    """The largest landmark distance between face ``fa`` and the face of ``b`` nearest its box centre."""
    ca = (fa.bbox[:2] + fa.bbox[2:]) / 2
    fb = min(b, key=lambda f: float(np.linalg.norm((f.bbox[:2] + f.bbox[2:]) / 2 - ca)))
    return float(np.linalg.norm(fa.landmarks - fb.landmarks, axis=1).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=None, help="compare the faces of the first N photos only")
    args = ap.parse_args()
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print("oneDNN has no bfloat16 arithmetic on this CPU: nothing to measure")
        print("net_ms_fp32=nan net_ms_bf16=nan photos_count_differs=nan worst_landmark_px=nan median_face_worst_px=nan")
        return
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        cfg = bench_config(Path(tmp))
        det = FaceDetector(cfg.detect, weights.resolve(cfg.detect.model, cfg))
    fp32, bf16 = det.net, _Autocast(det.net)
    long_side = cfg.detect.long_side

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    x = (torch.rand(1, 3, 1060, 1600) * 255).contiguous(memory_format=torch.channels_last) - fp32.mean_tensor
    with torch.inference_mode():
        ms32, ms16 = _interleaved_ms([lambda: fp32(x), lambda: bf16(x)])
    print(f"mobile0.25 on a 1,600 x 1,060 copy, one core: float32 {ms32:.1f} ms, bfloat16 {ms16:.1f} ms "
          f"({ms32 / ms16:.2f}x)")

    torch.set_num_threads(os.cpu_count() or 1)
    differs, per_face, worst, compared = 0, [], 0.0, 0
    photos = [p for d in ("whole", "old", "gray", "identity") for p in sorted((SHARED / "images" / d).iterdir())]
    for path in photos[: args.photos]:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise SystemExit(f"{path}: OpenCV cannot read it")
        compared += 1
        f = long_side / max(img.shape[:2])
        small = cv2.resize(img, (round(img.shape[1] * f), round(img.shape[0] * f)),
                           interpolation=cv2.INTER_CUBIC if f > 1 else cv2.INTER_AREA)
        a, b = _faces(det, fp32, small), _faces(det, bf16, small)
        if len(a) != len(b):  # a face lost or gained: no pairing of the rest is trustworthy
            differs += 1
            print(f"  {path.parent.name}/{path.name}: {len(a)} faces in float32, {len(b)} in bfloat16")
        elif a:
            w = [_distance(fa, b) for fa in a]
            per_face += w
            worst = max(worst, *w)
            if max(w) > 1.0:
                print(f"  {path.parent.name}/{path.name}: landmarks up to {max(w):.2f} px apart")
    med = statistics.median(per_face) if per_face else float("nan")
    print(f"{compared} photos, {len(per_face)} faces where the counts agree: median of each face's largest "
          f"landmark distance {med:.2f} px, largest "
          f"{worst:.2f} px; {differs} photos with another face count")
    print(f"net_ms_fp32={ms32:.1f} net_ms_bf16={ms16:.1f} photos_count_differs={differs} "
          f"worst_landmark_px={worst:.2f} median_face_worst_px={med:.2f}")


if __name__ == "__main__":
    main()
