"""Host side of the Restore stage: faces/s it can feed a GPU, with the network itself taking no time.

    python bench/restore_host.py                       # 32 images x 2 faces, 6 MB masters
    python bench/restore_host.py --master-mb 120       # 16-bit TIFF masters
    python bench/restore_host.py --ray 40              # also through one actor on a local Ray

A GPU actor has one CPU. Everything it does around the network (Arrow batch in, crops out of it, results
and restored crops into the Arrow batch going out) is host work that the GPU waits for unless it is
cheaper than the GPU's rate (the ~2,000 faces/s ceiling this was written against, 395.5 GFLOP/face at
~790 TFLOP/s, is 6-7x what an H100 or H200 restored when measured: ~300 faces/s, BENCHMARKS.md). Here the
FaceRestorer is replaced by a stub that returns copies of its input, so what is timed is exactly that
host work. The baseline row is the Python-rows round trip the stage first used (``to_pylist`` and back),
which copies every column, including the compressed master carried to Compose.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import pyarrow as pa

from pipeline.config import load_config
from pipeline.restorer import Restored
from pipeline.schema import WORK_SCHEMA, Status, rows_to_table
from pipeline.stages import Restore

GPU_CEILING_FACES_S = 2000.0


def work_batch(images: int, faces: int, master_mb: float, rng: np.random.Generator) -> pa.Table:
    mat = [[0.25, 0.0, -8.0], [0.0, 0.25, -8.0]]
    rows = []
    for i in range(images):
        rows.append({
            "image_id": f"img{i:05d}", "uri": f"s3://archive/img{i:05d}.jpg", "output_key": f"img{i:05d}.jpg",
            "status": Status.OK.value, "src_bytes": rng.bytes(int(master_mb * 2**20)), "src_format": "jpeg",
            "width": 4000, "height": 3000, "n_faces": faces, "faces_skipped": 0,
            "faces_json": json.dumps({"faces": [{"box": [0, 0, 1, 1], "score": 0.99, "arcface": mat}] * faces}),
            "crops": rng.integers(0, 256, (faces, 512, 512, 3), dtype=np.uint8).tobytes(),
        })
    return rows_to_table(rows, WORK_SCHEMA)


def stub_restore(crops: np.ndarray, mats: np.ndarray) -> Restored:
    """What FaceRestorer.restore hands back, at no compute: a fresh uint8 array, scores, flags."""
    n = len(crops)
    return Restored(crops.copy(), np.full(n, 0.9, np.float32), np.zeros(n, bool))


class StubRestore(Restore):
    """The Restore stage with the stub restorer, as a Ray actor would hold it."""

    def __init__(self, cfg):
        super().__init__(cfg, device="cpu")
        self.restorer.restore = stub_restore


def through_ray(cfg, batch: pa.Table, batches: int) -> float:
    """faces/s of one Restore actor inside Ray Data (local Ray, 2 CPUs, 1 logical GPU): adds Ray's moving
    of batches in and out of the actor (object store writes, on the actor's own thread)."""
    import ray

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, address="local")
    try:
        blocks = [batch] * batches
        ds = ray.data.from_arrow(blocks).map_batches(
            StubRestore, fn_constructor_kwargs={"cfg": cfg}, batch_size=batch.num_rows, batch_format="pyarrow",
            num_gpus=1, num_cpus=1, compute=ray.data.ActorPoolStrategy(size=1))
        rows, t_first = 0, None
        for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if t_first is None:  # from the first output on: actor start-up and model load are not timed
                t_first = time.perf_counter()
            else:
                rows += b.num_rows
        seconds = time.perf_counter() - t_first
        assert rows == (batches - 1) * batch.num_rows
        return rows * float(batch["n_faces"].to_numpy().mean()) / seconds
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32, help="images per Ray batch (cluster.restore_batch_size)")
    ap.add_argument("--faces", type=int, default=2, help="faces per image")
    ap.add_argument("--master-mb", type=float, default=6.0, help="compressed master size carried to Compose")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--ray", type=int, default=0, metavar="BATCHES",
                    help="also run BATCHES batches through one Restore actor on a local Ray")
    args = ap.parse_args()
    batch = work_batch(args.images, args.faces, args.master_mb, np.random.default_rng(0))
    n_faces = args.images * args.faces
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, {"untrained": True, "allow_download": False, "restore.model": "GFPGANv1.4",
                                 "output.root": out}, environ={})
        stage = Restore(cfg, device="cpu")
    stage.restorer.restore = stub_restore

    def best_of(fn) -> float:
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t0)
        assert result.num_rows == args.images
        return min(times)

    base = best_of(lambda: rows_to_table(batch.to_pylist(), WORK_SCHEMA))
    stage_s = best_of(lambda: stage(batch))
    done = stage(batch)
    assert done["restored"][0].as_py() == batch["crops"][0].as_py(), "restored crops lost on the way"
    assert done["crops"].null_count == args.images and done["src_bytes"] == batch["src_bytes"]
    print(f"{args.images} images x {args.faces} faces, {args.master_mb:g} MB masters, one thread")
    for label, s in (("baseline: Python-rows round trip only", base), ("Restore stage host work", stage_s)):
        print(f"{label:<40}{s * 1e3:9.1f} ms/batch {n_faces / s:10.0f} faces/s")
    fps = n_faces / stage_s
    line = (f"host_faces_per_s={fps:.0f} vs_gpu_ceiling={fps / GPU_CEILING_FACES_S:.2f} "
            f"speedup_vs_row_round_trip={base / stage_s:.2f}")
    if args.ray:
        ray_fps = through_ray(cfg, batch, args.ray)
        print(f"{'Restore actor in Ray Data (stub network)':<40}{n_faces / ray_fps * 1e3:9.1f} ms/batch "
              f"{ray_fps:10.0f} faces/s")
        line += f" ray_actor_faces_per_s={ray_fps:.0f} ray_vs_gpu_ceiling={ray_fps / GPU_CEILING_FACES_S:.2f}"
    print(line)


if __name__ == "__main__":
    main()
