"""Batching by faces across Ray batches: one Restore actor with 1 call at a time vs 2 and 3 in flight.

    python bench/restore_batching.py                  # 60 batches of 16 images, 0-6 faces an image
    python bench/restore_batching.py --calls 1 3

The Restore stage's host work is real (Arrow batch in, crops gathered, rows and restored crops out, the
face queue's thread hand-offs); the device is a model: a forward of m faces sleeps 2 ms + 1.25 ms x m
(800 faces/s with full micro-batches of 16, plus a fixed cost per forward; a GPU measured ~300 since:
BENCHMARKS.md), releasing the GIL as a
CUDA kernel does, so what is measured is how well the stage keeps such a device busy. Ray batches hold
16 images with 0-6 faces each (mean ~1.6, the mix of a family archive), so most batches end in a
part-filled micro-batch. ``calls`` threads pull batches from one list and call the stage, as Ray Data
does with ``cluster.restore_calls_in_flight`` (1: one batch at a time, each call's faces whole, as
before the face queue). Printed per setting: faces per forward, forwards, the device's busy share of the wall time, and
faces/s. The last line is ``faces_per_forward_<calls>=<x> ... busy_<calls>=<share> ...``.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa

from pipeline.config import load_config
from pipeline.restorer import Restored
from pipeline.stages import Restore

from restore_host import work_batch

FIXED_S, PER_FACE_S, MICRO_BATCH = 0.002, 0.00125, 16


class ModelDevice:
    """FaceRestorer.restore's contract with a modelled device: micro-batches of 16, each a sleep."""

    def __init__(self):
        self.busy = self.forwards = self.faces = 0.0
        self.lock = threading.Lock()

    def __call__(self, crops: np.ndarray, mats: np.ndarray) -> Restored:
        n = len(crops)
        for a in range(0, n, MICRO_BATCH):
            m = min(MICRO_BATCH, n - a)
            t = FIXED_S + PER_FACE_S * m
            time.sleep(t)
            with self.lock:
                self.busy += t
                self.forwards += 1
                self.faces += m
        return Restored(crops.copy(), np.full(n, 0.9, np.float32), np.zeros(n, bool))


def batches(count: int, images: int, rng: np.random.Generator) -> list[pa.Table]:
    faces = rng.choice([0, 1, 1, 1, 2, 2, 3, 4, 6], size=(count, images))
    proto = {n: work_batch(1, n, 0.5, rng) for n in np.unique(faces)}  # one row per face count, reused
    return [pa.concat_tables([proto[n] for n in row]) for row in faces]


def run(stage: Restore, work: list[pa.Table], calls: int) -> dict:
    device = ModelDevice()
    stage.restorer.restore = device
    it, lock, out = iter(work), threading.Lock(), []

    def worker():
        while True:
            with lock:
                batch = next(it, None)
            if batch is None:
                return
            done = stage(batch)
            assert done["status"].to_pylist() == batch["status"].to_pylist()
            with lock:
                out.append(done.num_rows)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    assert sum(out) == sum(b.num_rows for b in work)
    return {"faces_per_forward": device.faces / device.forwards, "forwards": int(device.forwards),
            "busy": device.busy / wall, "faces_s": device.faces / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--images", type=int, default=16, help="images per Ray batch (cluster.restore_batch_size)")
    ap.add_argument("--calls", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved; the median is printed")
    args = ap.parse_args()
    work = batches(args.batches, args.images, np.random.default_rng(0))
    faces = sum(int(np.asarray(b["n_faces"]).sum()) for b in work)
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, {"untrained": True, "allow_download": False, "restore.model": "GFPGANv1.4",
                                 "output.root": out, "restore.micro_batch": MICRO_BATCH}, environ={})
        stages = {c: Restore(cfg, device="cpu", calls_in_flight=c) for c in args.calls}
    print(f"{args.batches} batches x {args.images} images, {faces} faces; modelled device: "
          f"{FIXED_S * 1e3:g} ms + {PER_FACE_S * 1e3:g} ms a face per forward")
    results = {c: [] for c in args.calls}
    for _, c in itertools.product(range(args.repeats), args.calls):
        results[c].append(run(stages[c], work, c))
    med = {c: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for c, rs in results.items()}
    for c, m in med.items():
        print(f"calls in flight {c}: {m['faces_per_forward']:.2f} faces per forward ({m['forwards']:.0f} forwards), "
              f"device busy {m['busy']:.0%} of the wall, {m['faces_s']:.0f} faces/s")
    print(" ".join(f"faces_per_forward_{c}={m['faces_per_forward']:.2f}" for c, m in med.items()) + " " +
          " ".join(f"busy_{c}={m['busy']:.2f}" for c, m in med.items()))


if __name__ == "__main__":
    main()
