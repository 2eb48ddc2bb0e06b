"""GFP-GAN faces/s: the official-style loop vs our batched paths, measured in one run.

    python bench/gfpgan_throughput.py                  # CPU: production architecture, small counts
    python bench/gfpgan_throughput.py --faces 512      # CUDA: adds fp16 at micro-batch 1/8/32/64

Rows: official-style (grouped modulated conv, one face at a time, fp32), ours fp32 batched, and on CUDA
ours fp16 (channels_last) per micro-batch, with achieved TFLOP/s against 395.5 GFLOP per 512x512 face.
Weights are seeded random in the production shape (same FLOPs as GFPGANv1.4). The last line is
machine-readable.
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.models.gfpgan import gfpgan_v1_clean

GFLOP_PER_FACE = 395.5
H100_PEAK_TFLOPS = 790.0  # dense fp16/bf16 tensor throughput measured on the lent H100/H200 machines


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def faces_per_s(model, device, dtype, micro_batch, n_faces, channels_last=False, warmup=1):
    x = torch.rand(micro_batch, 3, 512, 512, device=device).mul(2).sub(1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(warmup):
        model(x)
    _sync(device)
    steps = max(1, n_faces // micro_batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(x)
    _sync(device)
    assert torch.isfinite(out).all(), "non-finite output"
    return steps * micro_batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=int, default=None, help="faces per measurement (default: 4 CPU, 512 CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repeats; the best of each row is kept")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.faces or (512 if device.type == "cuda" else 4)
    torch.manual_seed(0)
    model = gfpgan_v1_clean().eval().to(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {n} faces per row; {GFLOP_PER_FACE} GFLOP/face")
    rows = []

    def record(label, fps):
        tflops = fps * GFLOP_PER_FACE / 1e3
        rows.append((label, fps))
        print(f"{label:<44}{fps:10.2f} faces/s {tflops:9.3f} TFLOP/s")

    mb32 = 8 if device.type == "cuda" else 2
    official = ours32 = 0.0
    for _ in range(args.repeat):  # interleaved, so a noisy neighbour hurts both rows alike
        model.set_modconv_impl("grouped")
        official = max(official, faces_per_s(model, device, torch.float32, 1, n))
        model.set_modconv_impl("auto")  # per layer: shared-weight where it wins (all of CUDA), grouped elsewhere
        ours32 = max(ours32, faces_per_s(model, device, torch.float32, mb32, max(n, mb32)))
    record("official-style loop (grouped, fp32, batch 1)", official)
    record(f"ours fp32 auto (micro-batch {mb32})", ours32)
    line = f"speedup_fp32_vs_official_loop={ours32 / official:.2f}"
    if device.type == "cuda":
        half = model.half().to(memory_format=torch.channels_last)
        best = 0.0
        for mb in (1, 8, 32, 64):
            fps = faces_per_s(half, device, torch.float16, mb, max(n, mb), channels_last=True)
            record(f"ours fp16 channels_last (micro-batch {mb})", fps)
            best = max(best, fps)
        frac = best * GFLOP_PER_FACE / 1e3 / H100_PEAK_TFLOPS
        print(f"best fp16: {best:.1f} faces/s = {frac:.1%} of the {H100_PEAK_TFLOPS:.0f} TFLOP/s peak")
        line += f" speedup_fp16_vs_official_loop={best / official:.2f} roofline_fraction={frac:.3f}"
    print(line)


if __name__ == "__main__":
    main()
