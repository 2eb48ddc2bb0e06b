"""How many worker processes the Compose tasks of one run use (issue 10: a fresh worker per task paid
~5 CPU-s of imports each time).

    python bench/compose_workers.py            # 240 small images, Compose batches of 10

Local Ray (2 CPUs, 1 logical GPU, dashboard on for the state API), the scale bench's archive and models.
Prints the run's time and, from Ray's task table, the Compose tasks and the distinct processes they ran
in. The last line is `compose_tasks=<n> compose_worker_processes=<m>`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=240)
    args = ap.parse_args()
    import ray
    from ray.util.state import list_tasks

    from pipeline import job
    from pipeline.config import load_config

    ray.init(address="local", num_cpus=2, num_gpus=1, log_to_driver=False, include_dashboard=True)
    try:
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            manifest = scale.make_archive(d, args.images)
            weights = d / "weights"
            weights.mkdir()
            for name in ("detection_mobilenet0.25_Final.pth", "identity_mobilefacenet_arcface.onnx"):
                (weights / name).symlink_to(scale.SHARED / "models" / name)
            cfg = load_config(None, {
                "weights_dir": str(weights), "allow_download": False, "untrained": True,
                "detect.model": "retinaface_mobile0.25",
                "restore.model": str(scale.SHARED / "fixtures" / "gfpgan" / "gfpgan_tiny_a_checkpoint.pth"),
                "qa.identity_backend": "onnx", "output.root": str(d / "out"), "input.manifest": str(manifest),
                "cluster.rows_per_block": 20, "cluster.decode_batch_size": 10, "cluster.restore_batch_size": 20,
                "cluster.compose_batch_size": 10}, environ={})
            t0 = time.perf_counter()
            record = job.run(cfg)
            print(f"run: {time.perf_counter() - t0:.1f} s, {record['summary']['by_status']}")
            time.sleep(3)  # the task table lags a little
            tasks = [t for t in list_tasks(limit=10000, detail=True) if "compose" in (t.name or "").lower()]
            pids = {t.worker_pid for t in tasks}
            print(f"compose_tasks={len(tasks)} compose_worker_processes={len(pids)}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
