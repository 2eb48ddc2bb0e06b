"""Whole-job throughput vs the official sequential way, on the shared photographs, in one run.

    python bench/pipeline_throughput.py --weights-dir ../shared/models [--images N] [--max-faces K]

Baseline: what `inference_gfpgan.py` / GFPGANer does — facexlib's FaceRestoreHelper (detect at native
size, threshold 0.97, eye distance >= 5, FFHQ alignment, full-image paste-back with the square mask),
one image and one face at a time, GFP-GAN in fp32 with the official grouped modulated convolution (on
the GPU when there is one, as GFPGANer does), cv2.imwrite of the result. ParseNet is off on both sides (its weights are not obtainable here).

Pipeline: `archive-restore run` over the same images on a local Ray (all CPUs, the machine's GPUs or one
logical GPU), same detector, same GFP-GAN weights; it additionally hashes, scores identity and writes
the results ledger. Ray itself is started before the clock starts (a cluster outlives one job); actor
start-up and model loading are inside the measured time.

GFP-GAN weights: GFPGANv1.4.pth from --weights-dir if present, else seeded random weights of the same
architecture (same FLOPs) on both sides. The pipeline runs with the job's defaults: on a GPU, faces are
found on the device (``detect.device=auto``); without one, on the CPUs (the logical GPU only schedules).
``--set key=value`` (repeatable) overrides a setting of the pipeline's side, e.g. ``--set detect.device=cpu``
or ``--set output.device=gpu``. The last line is
`speedup_vs_sequential=<x>`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import job, weights
from pipeline.config import load_config
from pipeline.restorer import build_gfpgan

SHARED = Path(os.environ.get("ARCHIVE_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
# The crowd photos (14 and 64 faces) are left out by default so a CPU run finishes in minutes.
DEFAULT_IMAGES = sorted(p for d in ("whole", "old") for p in (SHARED / "images" / d).glob("*.*")
                        if "crowd" not in p.name and "oscar" not in p.name)


def sequential(cfg, paths: list[Path], out: Path) -> tuple[float, int]:
    import facexlib.utils.face_restoration_helper as frh

    # FaceRestoreHelper builds ParseNet even with use_parse=False, and its weights cannot be had offline;
    # with use_parse=False it is never called, so a placeholder stands in for it.
    frh.init_parsing_model = lambda *a, **k: None
    FaceRestoreHelper = frh.FaceRestoreHelper

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = build_gfpgan(cfg)
    model = model.to(device).set_modconv_impl("grouped").set_upstream_ops(True)  # upstream's formulation
    det_dir = str(weights.resolve(cfg.detect.model, cfg).path.parent)
    helper = FaceRestoreHelper(1, face_size=512, crop_ratio=(1, 1), det_model=cfg.detect.model, save_ext="png",
                               use_parse=False, device=device, model_rootpath=det_dir)
    out.mkdir(parents=True, exist_ok=True)
    faces = 0
    t0 = time.perf_counter()
    for p in paths:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        helper.clean_all()
        helper.read_image(img)
        helper.get_face_landmarks_5(only_center_face=False, eye_dist_threshold=5)
        helper.all_landmarks_5 = helper.all_landmarks_5[: cfg.detect.max_faces]
        helper.align_warp_face()
        for crop in helper.cropped_faces:
            x = torch.from_numpy(crop[:, :, ::-1].copy()).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
            with torch.no_grad():
                y = model(x[None].to(device))[0]
            face = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()[:, :, ::-1]
            helper.add_restored_face(np.ascontiguousarray(face))
            faces += 1
        helper.get_inverse_affine(None)
        cv2.imwrite(str(out / p.name), helper.paste_faces_to_input_image())
    return time.perf_counter() - t0, faces


def pipeline(cfg_overrides: dict, paths: list[Path], work: Path) -> tuple[float, int]:
    import ray

    manifest = work / "manifest.parquet"
    pq.write_table(pa.table({"uri": [str(p) for p in paths]}), manifest)
    cfg = load_config(None, {**cfg_overrides, "input.manifest": str(manifest), "output.root": str(work / "out")})
    gpus = torch.cuda.device_count()
    ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=gpus or 1, include_dashboard=False,
             log_to_driver=False)
    try:
        t0 = time.perf_counter()
        record = job.run(cfg)
        elapsed = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return elapsed, record["summary"]["faces"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights-dir", default=str(SHARED / "models"))
    ap.add_argument("--detector", default="retinaface_mobile0.25", help="same detector on both sides")
    ap.add_argument("--images", type=int, default=len(DEFAULT_IMAGES), help="how many of the photos to use")
    ap.add_argument("--repeat", type=int, default=1, help="use each photo this many times (distinct copies)")
    ap.add_argument("--max-faces", type=int, default=64)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting of the pipeline's side (repeatable), e.g. detect.device=cpu")
    ap.add_argument("--no-baseline", action="store_true",
                    help="the pipeline alone (a second variant in the same session); last line pipeline_images_per_s")
    args = ap.parse_args()
    if bad := [kv for kv in args.set if "=" not in kv]:
        ap.error(f"--set takes KEY=VALUE, not {bad[0]!r}")

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    paths = []
    for r in range(args.repeat):
        for p in DEFAULT_IMAGES[: args.images]:
            dst = work / "in" / f"copy{r}" / p.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dst)
            paths.append(dst)
    overrides = {"weights_dir": args.weights_dir, "allow_download": False, "untrained": True,
                 "detect.model": args.detector, "detect.long_side": None, "detect.max_faces": args.max_faces,
                 "restore.model": "GFPGANv1.4", "qa.identity_backend": "onnx"}
    cfg = load_config(None, overrides)  # the baseline's: the detector and GFP-GAN, not the pipeline's options
    # the pipeline's own settings: without CUDA the logical GPU restores on CPU, so faces are found as a CPU-only
    # run finds them; then --set
    settings = {} if torch.cuda.is_available() else {"detect.device": "cpu"}
    settings.update(kv.split("=", 1) for kv in args.set)
    overrides.update(settings)
    gfp = weights.resolve("GFPGANv1.4", cfg)
    print(f"{len(paths)} images; detector {args.detector}; pipeline settings {settings or 'default'}; "
          f"GFP-GAN {'UNTRAINED (seeded, same FLOPs)' if gfp.untrained else gfp.path}; "
          f"device {'cuda x%d' % torch.cuda.device_count() if torch.cuda.is_available() else 'cpu x%d' % os.cpu_count()}")

    if args.no_baseline:
        pipe_s, pipe_faces = pipeline(overrides, paths, work)
        print(f"pipeline (Ray Data job):   {pipe_s:8.1f} s  {len(paths) / pipe_s:7.3f} images/s  "
              f"{pipe_faces / pipe_s:7.3f} faces/s  ({pipe_faces} faces)")
        shutil.rmtree(work, ignore_errors=True)
        print(f"pipeline_images_per_s={len(paths) / pipe_s:.3f}")
        return
    seq_s, seq_faces = sequential(cfg, paths, work / "seq")
    print(f"sequential (official way): {seq_s:8.1f} s  {len(paths) / seq_s:7.3f} images/s  {seq_faces / seq_s:7.3f} faces/s"
          f"  ({seq_faces} faces)")
    pipe_s, pipe_faces = pipeline(overrides, paths, work)
    print(f"pipeline (Ray Data job):   {pipe_s:8.1f} s  {len(paths) / pipe_s:7.3f} images/s  {pipe_faces / pipe_s:7.3f} faces/s"
          f"  ({pipe_faces} faces)")
    shutil.rmtree(work, ignore_errors=True)
    print(f"speedup_vs_sequential={seq_s / pipe_s:.2f}")


if __name__ == "__main__":
    main()
