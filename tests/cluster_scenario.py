"""A job on a multi-node local Ray (``ray.cluster_utils.Cluster``) shaped like the shipped cluster configs:
a head with no CPUs, CPU worker nodes, and GPU worker nodes (logical GPUs) that advertise one CPU fewer
than they have (here: 0 of 1), the core kept for the Restore actor. Run by tests/test_cluster.py in its own
interpreter (a Ray session of its own); prints one JSON line with what happened.

    python tests/cluster_scenario.py grow OUT    # no workers at submission; nodes join; a 2nd GPU mid-run
    python tests/cluster_scenario.py lose OUT    # the GPU node is killed mid-run; then a re-run on a new one
    python tests/cluster_scenario.py many OUT [N]   # N (2,000) small images on head(0) + CPU(2) + GPU(0+1)
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path

import numpy as np
import ray
from ray.cluster_utils import Cluster

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from conftest import IMAGES, MODELS, TINY_GFPGAN, test_overrides  # noqa: E402

from pipeline import job, ledger, resume, runs  # noqa: E402
from pipeline import weights as weights_mod  # noqa: E402
from pipeline.config import StorageConfig, detect_fingerprint, load_config  # noqa: E402

# Small portraits with one or two faces each (the identity/ and whole/ photos).
PHOTOS = ["identity/brad_1.jpg", "identity/nicole_1.jpg", "identity/brad_2.jpg", "identity/nicole_2.jpg",
          "whole/facexlib_test.jpg", "whole/gfpgan_Blake_Lively.jpg", "whole/codeformer_04.jpg"]


def _archive(out: Path, n: int) -> Path:
    src = out / "in"
    src.mkdir(parents=True)
    for i in range(n):
        p = PHOTOS[i % len(PHOTOS)]
        (src / f"{i:04d}-{Path(p).name}").write_bytes((IMAGES / p).read_bytes())
    manifest = out / "manifest.csv"
    manifest.write_text("uri\n" + "".join(f"{f}\n" for f in sorted(src.iterdir())))
    return manifest


def _cfg(out: Path, manifest: Path, **extra):
    weights = out / "weights"
    weights.mkdir(exist_ok=True)
    for name in ("detection_mobilenet0.25_Final.pth", "identity_mobilefacenet_arcface.onnx"):
        if not (weights / name).exists():
            (weights / name).symlink_to(MODELS / name)
    o = test_overrides(weights, out / "out", manifest, **{"qa.identity_backend": "onnx", "review.crops": False,
                                                          "restore.device": "cuda", **extra})
    return load_config(None, o, environ={})


class Watch:
    """Polls the state API: on which node each stage's actors and tasks ran."""

    def __init__(self):
        self.nodes: dict[str, set[str]] = {"Restore": set(), "DecodeDetect": set(), "compose_and_record": set()}
        self.names: set[str] = set()  # task names seen, for a failure's message
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sweep(self, alive_only: bool):
        from ray.util.state import list_actors, list_tasks

        try:
            actors = list_actors(filters=[("state", "=", "ALIVE")] if alive_only else None, limit=10000)
            for a in actors:
                for stage in ("Restore", "DecodeDetect"):
                    if stage in str(a.class_name) and a.node_id:
                        self.nodes[stage].add(a.node_id)
            tasks = list_tasks(filters=[("state", "=", "RUNNING")] if alive_only else None, limit=10000)
            for t in tasks:
                self.names.add(str(t.name))
                if "compose_and_record" in str(t.name) and t.node_id:
                    self.nodes["compose_and_record"].add(t.node_id)
        except Exception as e:  # the state API is best effort while nodes come and go
            self.errors.append(f"{type(e).__name__}: {e}"[:300])

    def _run(self):
        # Polling catches actors on nodes that are later killed (their records may go with them)
        while not self.stop.is_set():
            self._sweep(alive_only=True)
            time.sleep(0.5)

    def result(self) -> dict:
        self.stop.set()
        self.thread.join(5)
        # Compose tasks can start and finish between polls on a loaded machine (CI saw none caught):
        # one sweep over finished tasks and dead actors too.
        self._sweep(alive_only=False)
        return {**{k: sorted(v) for k, v in self.nodes.items()}, "task_names": sorted(self.names)[:40],
                "errors": self.errors[-3:]}



def _run_job(cfg, box: dict) -> threading.Thread:
    def go():
        try:
            box["record"] = job.run(cfg)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            box["error"] = f"{type(e).__name__}: {e}"
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def _results_so_far(cfg) -> int:
    try:
        return len(ledger.result_files(cfg.output.root, StorageConfig()))
    except Exception:
        return 0


def _counts(cfg) -> dict:
    t = ledger.load_results(cfg.output.root, StorageConfig(), columns=["image_id", "status", "fingerprint"])
    ids = t["image_id"].to_pylist()
    ok = [i for i, s in zip(ids, t["status"].to_pylist()) if s in ("ok", "no_face")]
    latest = resume.latest_rows(ledger.load_results(cfg.output.root, StorageConfig()))
    return {"rows": len(ids), "distinct_done": len(set(ok)), "done_rows": len(ok),
            "latest_status": sorted(set(latest["status"].to_pylist()))}


def grow(out: Path) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    ray.init(address=cluster.address, log_to_driver=False)
    manifest = _archive(out, 24)
    # The production-size GFP-GAN (seeded random weights: no checkpoint is staged) makes Restore the
    # bottleneck, so a second GPU node has work to take.
    cfg = _cfg(out, manifest, **{"restore.model": "GFPGANv1.4", "cluster.restore_batch_size": 1,
                                 "cluster.rows_per_block": 1})
    watch, box = Watch(), {}
    t0 = time.time()
    thread = _run_job(cfg, box)
    time.sleep(20)
    started_early = {"error": box.get("error"), "results": _results_so_far(cfg)}
    cpu = cluster.add_node(num_cpus=2)
    gpu1 = cluster.add_node(num_cpus=0, num_gpus=1)
    while _results_so_far(cfg) < 1 and thread.is_alive() and time.time() - t0 < 400:
        time.sleep(1)
    gpu2 = cluster.add_node(num_cpus=0, num_gpus=1)
    thread.join(900)
    return {"before_workers": started_early, "error": box.get("error"), "alive": thread.is_alive(),
            "summary": (box.get("record") or {}).get("summary"), "placement": watch.result(),
            "nodes": {"cpu": cpu.node_id, "gpu1": gpu1.node_id, "gpu2": gpu2.node_id}, "counts": _counts(cfg),
            "elapsed_s": round(time.time() - t0, 1)}


def _cli_run(cfg_overrides: dict, address: str, timeout: float) -> dict:
    """``archive-restore run`` in its own process, as a user runs it (its Ray objects die with it)."""
    import subprocess

    sets = [a for k, v in cfg_overrides.items() if v is not None and k not in ("input.manifest", "output.root")
            for a in ("--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}")]
    cmd = [sys.executable, "-c", "from pipeline.cli import main; main()", "run", "-m", cfg_overrides["input.manifest"],
           "-o", cfg_overrides["output.root"], "--ray-address", address, *sets]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    err = [line for line in p.stderr.splitlines() if line.startswith("Error:")]
    return {"rc": p.returncode, "error": err[-1] if err else None, "elapsed_s": round(time.time() - t0, 1)}


def lose(out: Path) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.add_node(num_cpus=2)
    gpu = cluster.add_node(num_cpus=0, num_gpus=1)
    manifest = _archive(out, 24)
    weights = out / "weights"
    cfg = _cfg(out, manifest)  # stages the weights folder
    # detect.device=auto, the default: with restore.device=cuda the JPEG masters' faces are found in the Restore
    # actor on the node that is lost (deferred rows in flight there)
    o = test_overrides(weights, out / "out", manifest, **{
        "qa.identity_backend": "onnx", "review.crops": False, "restore.device": "cuda", "detect.device": "auto",
        "restore.model": "GFPGANv1.4", "cluster.restore_batch_size": 1, "cluster.rows_per_block": 1,
        "cluster.stall_timeout_s": 45, "cluster.actor_restarts": 1})
    box: dict = {}
    t0 = time.time()
    first = threading.Thread(target=lambda: box.update(_cli_run(o, cluster.address, 900)), daemon=True)
    first.start()
    while _results_so_far(cfg) < 2 and first.is_alive() and time.time() - t0 < 400:
        time.sleep(0.5)
    cluster.remove_node(gpu, allow_graceful=False)
    t_kill = time.time()
    first.join(600)
    box["ended_after_kill_s"] = round(time.time() - t_kill, 1)
    box["counts"] = _counts(cfg)
    cluster.add_node(num_cpus=0, num_gpus=1)
    second = _cli_run(o, cluster.address, 900)
    plans = [r.get("restore_plan") or {} for r in runs.read_records(cfg.output.root, StorageConfig())]
    # where each image's faces were found: the detection fingerprint says it (stages.py)
    sha = weights_mod.resolve(cfg.detect.model, cfg).sha256
    on = {detect_fingerprint(cfg.detect.model_copy(update={"device": d}), sha): d for d in ("cpu", "gpu")}
    latest = resume.latest_rows(ledger.load_results(cfg.output.root, StorageConfig()))
    found = [on.get(f, f) for f in latest["detect_fingerprint"].to_pylist()]
    return {"first": box, "second": second, "counts": _counts(cfg), "images": 24,
            "detect_devices": sorted({p["detect_device"] for p in plans if "detect_device" in p}),
            "faces_found_on": {d: found.count(d) for d in set(found)}}


def many(out: Path, n: int = 2000) -> dict:
    """2,000 small images on head(0) + CPU(2) + GPU(1 CPU advertised as 0, 1 GPU): the shape that
    stalled when a CPU stage took the GPU node's only CPU."""
    import cv2

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    ray.init(address=cluster.address, log_to_driver=False)
    cpu = cluster.add_node(num_cpus=2)
    gpu = cluster.add_node(num_cpus=0, num_gpus=1)
    src = out / "in"
    src.mkdir(parents=True)
    faces = [cv2.resize(cv2.imread(str(IMAGES / p)), (192, 192), interpolation=cv2.INTER_AREA)
             for p in ("cropped/Adele_crop.png", "cropped/Julia_Roberts_crop.png", "gray/Einstein01.png",
                       "cropped/Justin_Timberlake_crop.png")]
    for i in range(n):
        cv2.imwrite(str(src / f"{i:05d}.jpg"), np.roll(faces[i % len(faces)], i % 7, axis=1),
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
    manifest = out / "manifest.csv"
    manifest.write_text("uri\n" + "".join(f"{f}\n" for f in sorted(src.iterdir())))
    cfg = _cfg(out, manifest, **{"cluster.rows_per_block": 40, "cluster.decode_batch_size": 20,
                                 "cluster.restore_batch_size": 40, "cluster.compose_batch_size": 40,
                                 "cluster.stall_timeout_s": 180})
    watch, box = Watch(), {}
    t0 = time.time()
    _run_job(cfg, box).join(1500)
    return {"error": box.get("error"), "summary": (box.get("record") or {}).get("summary"),
            "placement": watch.result(), "nodes": {"cpu": cpu.node_id, "gpu": gpu.node_id},
            "counts": _counts(cfg), "images": n, "elapsed_s": round(time.time() - t0, 1)}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    mode, out = sys.argv[1], Path(sys.argv[2])
    extra = [int(a) for a in sys.argv[3:]]  # many: the number of images
    result = {"grow": grow, "lose": lose, "many": many}[mode](out, *extra)
    print("RESULT " + json.dumps(result, default=str), flush=True)
    ray.shutdown()
