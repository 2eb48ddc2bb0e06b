"""Peak memory (RSS) of each stage actor/task on one batch, per master size: what `job.py` declares to Ray.

    python bench/stage_memory.py                        # 12 and 100 MP JPEG masters, the default batch sizes
    python bench/stage_memory.py --mp 12 --drift 40     # also: DecodeDetect's RSS over 40 batches of mixed sizes
    python bench/stage_memory.py --mp 12 --ray 240      # each stage process's RSS over a job of 240 masters

Each stage runs in a fresh interpreter (as a fresh Ray worker would) with the default cluster batch sizes:
DecodeDetect (real mobile0.25 detector) on a batch of `decode_batch_size` masters, Restore (the
production-size GFP-GAN with seeded weights, on CPU, ONNX identity) on `restore_batch_size` images' faces,
Compose on `compose_batch_size` images. Printed: the process's RSS after its imports and models load
(base) and its peak (ru_maxrss) after the batch, in MB. `--drift` runs DecodeDetect over batches of
masters of changing sizes and prints RSS every few batches (the growth the issue saw over a run).
`--ray N` runs the job itself (`job.run`, a local Ray of this machine's CPUs and one logical GPU, the
tiny seeded GFP-GAN: this traces the stages' memory, not GFP-GAN's) over N masters of the same six
sizes and samples the RSS of every Ray worker process by its title (DecodeDetect, Restore, Compose) each
second: the trace of each stage's longest-lived process, at tenths of its samples (for Compose, a task
worker's samples while it ran Compose), as RSS and the two parts of it that matter here: anonymous memory
(the process's own) and shared memory (pages of Ray's object store it has touched).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ARCHIVE_SHARED_DIR", ROOT.parent / "shared"))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(stage: str, mp: float, work: str, drift: int) -> dict:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import numpy as np
    import pyarrow as pa

    from cpu_side import make_master
    from pipeline.config import load_config
    from pipeline.stages import Compose, DecodeDetect, Restore

    work = Path(work)
    cfg = load_config(None, {"weights_dir": str(work / "w"), "allow_download": False, "untrained": True,
                             "detect.model": "retinaface_mobile0.25", "qa.identity_backend": "onnx",
                             "output.root": str(work / f"out-{stage}-{mp:g}"), "review.crops": True}, environ={})
    cc = cfg.cluster
    n = cc.decode_batch_size if stage == "decode" else cc.compose_batch_size
    master = make_master(work, mp, "jpeg")
    batch = {"image_id": np.array([f"i{k}" for k in range(n)], object),
             "uri": np.array([str(master)] * n, object)}
    if stage == "decode":
        dd = DecodeDetect(cfg, root=str(work) + "/")
        base = _rss_mb()
        if drift:
            sizes = [mp * f for f in (1.0, 0.5, 0.8, 0.3, 0.9, 0.6)]
            masters = [make_master(work, s, "jpeg") for s in sizes]
            trace = []
            for b in range(drift):
                m = masters[b % len(masters)]
                dd({"image_id": np.array([f"d{b}-{k}" for k in range(n)], object),
                    "uri": np.array([str(m)] * n, object)})
                if b % 5 == 4:
                    trace.append(round(_rss_mb()))
            return {"stage": stage, "mp": mp, "base_mb": round(base), "rss_every_5_batches_mb": trace,
                    "peak_mb": round(_peak_mb())}
        dd(batch)
        return {"stage": stage, "mp": mp, "images": n, "base_mb": round(base), "peak_mb": round(_peak_mb())}
    import pyarrow.feather as feather

    # The later stages' inputs come from files made by a "prepare" child, so that each peak is its own.
    if stage == "prepare":
        detected = DecodeDetect(cfg, root=str(work) + "/")(batch)
        feather.write_feather(detected, work / f"detected-{mp:g}-{n}.arrow", compression="uncompressed")
        big = {"image_id": np.array([f"i{k}" for k in range(cc.restore_batch_size)], object),
               "uri": np.array([str(master)] * cc.restore_batch_size, object)}
        feather.write_feather(DecodeDetect(cfg, root=str(work) + "/")(big), work / f"detected-{mp:g}-r.arrow",
                              compression="uncompressed")
        feather.write_feather(Restore(cfg, device="cpu")(detected), work / f"restored-{mp:g}.arrow",
                              compression="uncompressed")
        return {"stage": stage}
    if stage == "restore":
        table = feather.read_table(work / f"detected-{mp:g}-r.arrow")
        r = Restore(cfg, device="cpu")
        base = _rss_mb()
        r(table)
        faces = int(sum(table["n_faces"].to_pylist()))
    else:
        table = feather.read_table(work / f"restored-{mp:g}.arrow")
        c = Compose(cfg, "r", "fp", True)
        base = _rss_mb()
        c(table)
        faces = int(sum(table["n_faces"].to_pylist()))
    return {"stage": stage, "mp": mp, "images": table.num_rows, "faces": faces, "base_mb": round(base),
            "peak_mb": round(_peak_mb())}


def ray_trace(n: int, mp: float, work: Path) -> dict:
    """RSS (MB) of each stage's worker processes over a job of ``n`` masters, sampled every second."""
    import threading
    import time

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from cpu_side import make_master
    from pipeline import job
    from pipeline.config import load_config

    sizes = [mp * f for f in (1.0, 0.5, 0.8, 0.3, 0.9, 0.6)]
    masters = [make_master(work, s, "jpeg") for s in sizes]
    src = work / "in"
    src.mkdir()
    for i in range(n):  # distinct files (hard links): each is read, hashed and written as its own image
        os.link(masters[i % len(masters)], src / f"{i:05d}.jpg")
    (work / "m.csv").write_text("uri\n" + "".join(f"{p}\n" for p in sorted(src.iterdir())))
    cfg = load_config(None, {"weights_dir": str(work / "w"), "allow_download": False, "untrained": True,
                             "detect.model": "retinaface_mobile0.25", "qa.identity_backend": "onnx",
                             "restore.model": str(SHARED / "fixtures/gfpgan/gfpgan_tiny_a_checkpoint.pth"),
                             "input.manifest": str(work / "m.csv"), "output.root": str(work / "out"),
                             "cluster.num_gpus": 1}, environ={})
    trace: dict[str, dict[int, list[float]]] = {}
    stop = threading.Event()

    def sample():  # /proc directly: Ray's workers set their title (ray::...(DecodeDetect) etc.) as cmdline
        while not stop.is_set():
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        title = f.read().replace(b"\0", b" ").decode(errors="replace")
                    stage = next((s for s in ("DecodeDetect", "Restore", "compose_and_record") if s in title), None)
                    if stage:  # RSS, and the part of it that is the process's own (not shared: Ray's object store)
                        with open(f"/proc/{pid}/status") as f:
                            kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)
                                  if k in ("VmRSS", "RssAnon", "RssShmem")}
                        trace.setdefault(stage, {}).setdefault(int(pid), []).append(
                            (kb["VmRSS"] / 1024, kb["RssAnon"] / 1024, kb["RssShmem"] / 1024))
                except (OSError, KeyError, ValueError):  # the process ended meanwhile
                    continue
            time.sleep(1.0)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    record = job.run(cfg)
    stop.set()
    t.join()
    out = {"images": n, "by_status": record["summary"]["by_status"]}
    for stage, by_pid in trace.items():
        longest = max(by_pid.values(), key=len)  # the process that lived through the run
        at = [min(len(longest) - 1, k * len(longest) // 10) for k in range(10)] + [len(longest) - 1]
        out[stage] = {"processes": len(by_pid), **{f"{name}_mb_at_tenths": [round(longest[i][j]) for i in at]
                                                   for j, name in enumerate(("rss", "anon", "shmem"))},
                      "peak_mb": round(max(s[0] for s in longest)), "peak_anon_mb": round(max(s[1] for s in longest))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mp", type=float, nargs="+", default=[12, 100])
    ap.add_argument("--stages", nargs="+", default=["decode", "restore", "compose"])
    ap.add_argument("--drift", type=int, default=0, help="DecodeDetect batches for the RSS-over-a-run trace")
    ap.add_argument("--ray", type=int, default=0, help="masters for the RSS-over-a-job trace (job.run on local Ray)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(args.child[0], float(args.child[1]), args.child[2], args.drift)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "w").mkdir()
        for name in ("detection_mobilenet0.25_Final.pth", "identity_mobilefacenet_arcface.onnx"):
            os.symlink(SHARED / "models" / name, Path(tmp) / "w" / name)
        if args.ray:
            print(json.dumps(ray_trace(args.ray, args.mp[0], Path(tmp))))
            return
        jobs = [(s, mp) for mp in args.mp for s in ["prepare", *args.stages]]
        if args.drift:
            jobs = [("decode", args.mp[0])]
        for stage, mp in jobs:
            p = subprocess.run([sys.executable, __file__, "--child", stage, str(mp), tmp, "--drift", str(args.drift)],
                               capture_output=True, text=True)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                print(f"{stage} {mp:g} MP failed:\n{p.stderr[-2000:]}")
                continue
            r = json.loads(line[0][7:])
            if stage != "prepare":
                print(json.dumps(r))


if __name__ == "__main__":
    main()
