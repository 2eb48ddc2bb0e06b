"""GFP-GAN faces/s: the official-style loop vs our batched paths, measured in one run.

    python bench/gfpgan_throughput.py                  # CPU: production architecture, small counts
    python bench/gfpgan_throughput.py --faces 512      # CUDA: adds the half-precision rows
    python bench/gfpgan_throughput.py --smoke          # every row's code on a tiny model (checks the script)

Rows: official-style (grouped modulated conv and upstream's separate elementwise passes, one face at a time,
fp32); ours fp32 batched (gain and bias inside the convolutions, the rest in place); on CUDA ours
fp16 channels_last at micro-batch 1/8/32/64, the same with CUDA graphs at 1 and 8, bf16 at the best
micro-batch; and the whole GPU actor (``FaceRestorer.restore``: uint8 crops in and out, ArcFace scoring of
input and output, the half-precision guard, the copy/compute pipeline) at the best micro-batch. Each row
shows achieved TFLOP/s against 395.5 GFLOP per 512x512 face. Weights are seeded random in the production
shape (same FLOPs as GFPGANv1.4). The roofline is the dense matmul rate of this device in the half dtype,
measured in the same run (``peak_tflops``), never a quoted figure (BENCHMARKS.md has the H100's and the
H200's). ``--fp32-faces`` keeps the slow fp32 rows short on a GPU. The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pipeline.accel import accelerate
from pipeline.config import load_config
from pipeline.models.gfpgan import gfpgan_v1_clean, to_channels_last
from pipeline.restorer import FaceRestorer

GFLOP_PER_FACE = 395.5
TINY = dict(num_style_feat=64, narrow=0.125)  # --smoke: same code, ~1/60 of the work


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def faces_per_s(forward, device, dtype, micro_batch, n_faces, channels_last=False, warmup=2):
    x = torch.rand(micro_batch, 3, 512, 512, device=device).mul(2).sub(1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(warmup):
        forward(x)
    _sync(device)
    steps = max(1, n_faces // micro_batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = forward(x)
    _sync(device)
    assert torch.isfinite(out).all(), "non-finite output"
    return steps * micro_batch / (time.perf_counter() - t0)


@torch.inference_mode()
def peak_tflops(device, dtype, n: int, repeat: int = 10) -> float:
    """Dense matmul TFLOP/s of ``device`` in ``dtype`` (n x n x n), best of a few timed bursts."""
    a = torch.rand(n, n, device=device).to(dtype)
    b = torch.rand(n, n, device=device).to(dtype)
    a @ b
    _sync(device)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeat):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * repeat / (time.perf_counter() - t0) / 1e12)
    return best


def restorer_faces_per_s(precision, micro_batch, n_faces, smoke, device):
    """The GPU actor end to end on random uint8 crops, production architecture, untrained (seeded) weights."""
    cfg = load_config(None, {"untrained": True, "allow_download": False, "restore.precision": precision,
                             "restore.micro_batch": micro_batch, "restore.model": "GFPGANv1.4",
                             "qa.identity_backend": "arcface_ir_se50"}, environ={})
    fr = FaceRestorer(cfg, device)
    if smoke:
        fr.model = fr.forward = to_channels_last(gfpgan_v1_clean(**TINY).eval().to(device, fr.dtype))
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (n_faces, 512, 512, 3), dtype=np.uint8)
    mats = np.tile(np.array([[0.25, 0, -8], [0, 0.25, -8]], np.float32), (n_faces, 1, 1))
    fr.restore(crops[:micro_batch], mats[:micro_batch])  # warm-up: cuDNN algorithm search, lazy init
    _sync(device)
    t0 = time.perf_counter()
    out = fr.restore(crops, mats)
    fps = n_faces / (time.perf_counter() - t0)
    assert np.isfinite(out.similarity).all(), "non-finite identity score"
    return fps, int(out.fp32_fallback.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=int, default=None, help="faces per measurement (default: 4 CPU, 512 CUDA)")
    ap.add_argument("--fp32-faces", type=int, default=None,
                    help="faces per fp32 measurement (default: --faces); fewer keeps a GPU run short")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument("--repeat", type=int, default=5,
                    help="interleaved repeats of the fp32 rows; the ratio is the median of the repeats' ratios")
    ap.add_argument("--micro-batches", default=None, help="half-precision micro-batches (default 1,8,32,64)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny architecture, 2 faces, half-precision rows in bf16 on CPU: checks that every "
                         "row runs; its figures mean nothing")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cudnn.benchmark = True  # as FaceRestorer sets it
    n = args.faces or (2 if args.smoke else 512 if cuda else 4)
    torch.manual_seed(0)
    model = gfpgan_v1_clean(**(TINY if args.smoke else {})).eval().to(device)
    name = torch.cuda.get_device_name() if cuda else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {n} faces per row; {GFLOP_PER_FACE} GFLOP/face"
          + (" (SMOKE: tiny model, figures meaningless)" if args.smoke else ""))

    def record(label, fps):
        print(f"{label:<52}{fps:10.2f} faces/s {fps * GFLOP_PER_FACE / 1e3:9.3f} TFLOP/s")
        return fps

    mb32 = 8 if cuda else 2
    n32 = args.fp32_faces or n
    officials, ours = [], []
    for _ in range(args.repeat):  # interleaved, so a noisy neighbour hurts both rows of a repeat alike
        model.set_modconv_impl("grouped").set_upstream_ops(True)  # upstream's formulation and passes
        officials.append(faces_per_s(model, device, torch.float32, 1, n32))
        # per layer: shared-weight where it wins (all of CUDA), grouped elsewhere; gain and bias folded in
        model.set_modconv_impl("auto").set_upstream_ops(False)
        ours.append(faces_per_s(model, device, torch.float32, mb32, max(n32, mb32)))
    official, ours32 = float(np.median(officials)), float(np.median(ours))
    ratios = [o / b for o, b in zip(ours, officials)]
    record("official-style loop (grouped, fp32, batch 1)", official)
    record(f"ours fp32 auto (micro-batch {mb32})", ours32)
    print(f"per-repeat ratios: {' '.join(f'{r:.3f}' for r in ratios)}")
    line = f"speedup_fp32_vs_official_loop={float(np.median(ratios)):.2f}"
    if not (cuda or args.smoke):
        fps, _ = restorer_faces_per_s("fp32", mb32, n, False, device)
        record(f"FaceRestorer fp32 end to end (micro-batch {mb32})", fps)
        print(line)
        return

    half_dtype, prec = (torch.float16, "fp16") if cuda else (torch.bfloat16, "bf16")
    half = to_channels_last(model.to(half_dtype))
    mbs = [int(m) for m in (args.micro_batches or ("1,4" if args.smoke else "1,8,32,64")).split(",")]
    by_mb = {}
    for mb in mbs:
        by_mb[mb] = record(f"ours {prec} channels_last (micro-batch {mb})",
                           faces_per_s(half, device, half_dtype, mb, max(n, mb), channels_last=True))
    for mb in sorted({1, min(8, max(mbs))}):  # graphs matter where launches outnumber the work
        graphed, _ = accelerate(half, compile=False, cuda_graphs=True)
        fps = faces_per_s(graphed, device, half_dtype, mb, max(n, mb), channels_last=True)
        record(f"ours {prec} + CUDA graphs (micro-batch {mb})" + ("" if graphed.active else " [fell back]"), fps)
    best_mb = max(by_mb, key=by_mb.get)
    best = by_mb[best_mb]
    other = torch.bfloat16 if cuda else torch.float32
    record(f"ours {str(other)[6:]} channels_last (micro-batch {best_mb})",
           faces_per_s(to_channels_last(model.to(other)), device, other, best_mb, max(n, best_mb), True))
    actor, fallbacks = restorer_faces_per_s(prec, best_mb, max(n, best_mb), args.smoke, device)
    record(f"FaceRestorer {prec} end to end (micro-batch {best_mb})", actor)
    peak = peak_tflops(device, half_dtype, 8192 if cuda else 512)
    frac = best * GFLOP_PER_FACE / 1e3 / peak
    print(f"best {prec}: {best:.1f} faces/s at micro-batch {best_mb} = {frac:.1%} of this device's dense "
          f"{prec} matmul rate, {peak:.1f} TFLOP/s measured just now; the whole actor keeps {actor / best:.0%} "
          f"of it ({fallbacks} fp32 re-runs)")
    line += (f" speedup_{prec}_vs_official_loop={best / official:.2f} roofline_fraction={frac:.3f}"
             f" actor_fraction_of_model={actor / best:.2f} peak_tflops_measured={peak:.1f}")
    print(line)


if __name__ == "__main__":
    main()
