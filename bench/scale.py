"""Fixed costs from a thousand images to ten million: does the job's cost per image stay flat?

    python bench/scale.py                                   # 1,000-image archive, 10 M-row plan, 2,000 S3 files
    python bench/scale.py --archives 1000 10000 --s3-files 4000
    python bench/scale.py --archives --plan-rows 0           # ledger (S3) case only

1. Archives of N small images (192 px crops of four faces from ../shared/images, shifted per image, JPEG)
   through `job.run` on a local Ray of this machine's CPUs and one logical GPU (Ray started before the
   clock), real mobile0.25 detector, the tiny seeded GFP-GAN of the golden fixture, untrained ArcFace
   (ONNX). Per N: images/s; framework overhead per image = (wall x cores - the stages' own CPU seconds
   summed from the result rows' ``cpu_s``) / N, i.e. what is neither decoding, detecting, restoring nor
   composing, split into the CPU the rest used (the machine's busy time from /proc/stat less the stages':
   Ray, the driver, serialisation) and idle cores (pipeline bubbles, waits); stage CPU rather than stage
   wall time, which counts a stage's waits for a core when stages share them (the wall-time form came
   out negative here at 10,000 images); the driver's peak RSS (sampled); result files before and after the run's fold; a re-run with nothing
   to do; `status` against the manifest.
2. Planning a 10 M-image archive with 9 M done (`bench/plan_scale.py`, a fresh process; time and peak RSS).
3. The ledger on S3 (an S3 server on 127.0.0.1: moto, or with `--s3-server s3rver` the Node.js s3rver, which
   costs less than half moto's CPU per file): K per-batch result files of 50 rows, read as planning
   reads them, through s3fs (the baseline) and Arrow's S3 client (what the reader uses), each twice in
   the order s3fs, Arrow, Arrow, s3fs (means printed);
   extrapolated to 20,000 files = 1 M images in 50-image batches, by the wall per file here (the
   server shares the two cores, so this is the server's cost as much as the reader's) and by the
   reader's CPU per file (what bounds a driver against a real S3, whose server costs it nothing; its
   latency is hidden by 16 reading threads); then `compact`, files per million images after it, and
   the same read again.

The last line is `overhead_ms_per_image=<x> noop_rerun_s=<s> plan_10m_s=<s> plan_10m_peak_gb=<g>
files_per_1m=<n>` (overhead and no-op re-run of the largest archive).
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared"
FACES = ("cropped/Adele_crop.png", "cropped/Julia_Roberts_crop.png", "gray/Einstein01.png",
         "cropped/Justin_Timberlake_crop.png")


class PeakRSS:
    """The process's peak resident memory while the block runs (VmRSS sampled every 20 ms), in GB."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            with open("/proc/self/status") as f:
                kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            self.peak = max(self.peak, kb)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.gb = self.peak / 1024**2


def make_archive(folder: Path, n: int) -> Path:
    import cv2

    faces = [cv2.resize(cv2.imread(str(SHARED / "images" / p)), (192, 192), interpolation=cv2.INTER_AREA)
             for p in FACES]
    src = folder / "in"
    src.mkdir(parents=True)
    for i in range(n):
        cv2.imwrite(str(src / f"{i:06d}.jpg"), np.roll(faces[i % len(faces)], i % 7, axis=1),
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
    manifest = folder / "manifest.csv"
    manifest.write_text("uri\n" + "".join(f"{p}\n" for p in sorted(src.iterdir())))
    return manifest


def archive_case(n: int, cores: int) -> dict:
    from pipeline import job, ledger, report
    from pipeline.config import load_config
    from pipeline.manifest import read_manifest

    with tempfile.TemporaryDirectory(prefix="scale-") as d:
        d = Path(d)
        manifest = make_archive(d, n)
        weights = d / "weights"
        weights.mkdir()
        for name in ("detection_mobilenet0.25_Final.pth", "identity_mobilefacenet_arcface.onnx"):
            (weights / name).symlink_to(SHARED / "models" / name)
        cfg = load_config(None, {
            "weights_dir": str(weights), "allow_download": False, "untrained": True,
            "detect.model": "retinaface_mobile0.25", "restore.model": str(SHARED / "fixtures" / "gfpgan" / "gfpgan_tiny_a_checkpoint.pth"),
            "qa.identity_backend": "onnx", "output.root": str(d / "out"), "input.manifest": str(manifest),
            "cluster.rows_per_block": 40, "cluster.decode_batch_size": 20, "cluster.restore_batch_size": 40,
            "cluster.compose_batch_size": 40}, environ={})
        with PeakRSS() as rss:
            t0, busy0 = time.perf_counter(), _busy_s()
            record = job.run(cfg)
            wall, busy = time.perf_counter() - t0, _busy_s() - busy0
        rows = ledger.load_results(cfg.output.root, cfg.storage, columns=["status", "cpu_s"])
        stage_s = sum(v for v in rows["cpu_s"].to_pylist() if v)
        assert rows["cpu_s"].null_count == 0 and stage_s > 0
        t0 = time.perf_counter()
        again = job.run(cfg)
        noop = time.perf_counter() - t0
        t0 = time.perf_counter()
        st = report.status(cfg.output.root, cfg.storage, read_manifest(cfg).table)
        status_s = time.perf_counter() - t0
        assert again["plan"]["todo"] == 0 and st["images"] == n, (again["plan"], st["images"])
        fold = record.get("ledger_fold") or {}
        return {"n": n, "wall_s": wall, "images_per_s": n / wall, "stage_s": stage_s,
                "overhead_ms_per_image": 1000 * (wall * cores - stage_s) / n,
                "other_cpu_ms_per_image": 1000 * (busy - stage_s) / n,
                "idle_ms_per_image": 1000 * (wall * cores - busy) / n, "driver_peak_gb": rss.gb,
                "files_written": fold.get("files_before"), "files_after_fold": len(ledger.result_files(
                    cfg.output.root, cfg.storage)), "noop_rerun_s": noop, "status_s": status_s,
                "by_status": record["summary"]["by_status"]}


def plan_case(rows: int) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "plan_scale.py"), "--sizes", str(rows)], capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()
    print("   " + out[0])
    return dict(kv.split("=") for kv in out[-1].split())


# The S3 servers the bench can read from: moto (Python, the tests' server) or s3rver (Node.js, less than half
# moto's CPU per file here; `npm install --prefix DIR s3rver@3.7.1`, then DIR/node_modules/.bin/s3rver).
# Either shares this machine's cores with the reader, so the wall time per file is theirs together.
S3_SERVERS = ("moto", "s3rver")


def s3_server(kind: str = "moto", s3rver_bin: str = "s3rver", bucket: str = "scale") -> tuple[subprocess.Popen, str]:
    """Start an S3 server on 127.0.0.1 with ``bucket`` in it; its process and endpoint. Sets the credentials it
    accepts in the environment (moto: any; s3rver: its fixed pair)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if kind not in S3_SERVERS:
        raise ValueError(f"unknown S3 server {kind!r}: one of {', '.join(S3_SERVERS)}")
    key = "S3RVER" if kind == "s3rver" else "bench"
    for k, v in (("AWS_ACCESS_KEY_ID", key), ("AWS_SECRET_ACCESS_KEY", key), ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ[k] = v
    if kind == "s3rver":
        data = tempfile.mkdtemp(prefix="s3rver-")
        atexit.register(shutil.rmtree, data, True)
        # s3rver 3.7 signs its listing's continuation tokens with a cipher that OpenSSL 3 keeps in its legacy
        # provider: without it, listing past 1,000 objects fails.
        env = {**os.environ, "NODE_OPTIONS": "--openssl-legacy-provider"}
        cmd = [s3rver_bin, "-d", data, "-a", "127.0.0.1", "-p", str(port), "-s", "--configure-bucket", bucket]
    else:
        env, cmd = None, [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"{kind} did not start ({' '.join(cmd)})")
    endpoint = f"http://127.0.0.1:{port}"
    if kind == "moto":
        import s3fs

        s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True).mkdir(bucket)
    return proc, endpoint


def _busy_s() -> float:
    """CPU seconds this machine has been busy so far, all cores and processes (/proc/stat: user, nice,
    system, irq, softirq; not steal, the hypervisor's): the bench needs an otherwise idle machine."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system, all threads) of process ``pid`` (default: this one) so far. Moto serves
    the requests on the same two cores as the reader: the read's wall time is both, real S3 costs the
    reader only its own share."""
    with open(f"/proc/{pid or 'self'}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def s3_case(files: int, rows_per_file: int = 50, server: str = "moto", s3rver_bin: str = "s3rver") -> dict:
    from pipeline import compaction, ledger, resume
    from pipeline.config import StorageConfig

    proc, endpoint = s3_server(server, s3rver_bin)
    try:
        cfg = StorageConfig(s3_endpoint_url=endpoint)
        out = "s3://scale/out"
        t = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
        for f in range(files):  # rows as planning reads them: ids, status, fingerprint, time, output URIs
            ids = [f"img{f * rows_per_file + i:08d}" for i in range(rows_per_file)]
            ledger.write_part(pa.table({
                "image_id": ids, "status": ["ok"] * len(ids), "fingerprint": ["fp"] * len(ids),
                "finished_at": pa.array([t] * len(ids), pa.timestamp("ms", tz="UTC")), "run_id": ["r"] * len(ids),
                "output_uri": [f"{out}/images/{i}.jpg" for i in ids], "access_uri": pa.nulls(len(ids), pa.string()),
                "faces_skipped": [0] * len(ids)}), ledger.part_uri(out, f"r{f % 7}", ids), cfg)
        from pipeline import storage

        def timed_read(client: str) -> tuple[float, float, float]:
            # s3fs, the baseline: what the reader used before Arrow's own client (storage.read_small)
            storage._ARROW_S3_OFF[:] = ["bench: s3fs"] if client == "s3fs" else []
            t0, server0, client0 = time.perf_counter(), _cpu_s(proc.pid), _cpu_s()
            got = resume.load_for_planning(out, cfg)
            read_s = time.perf_counter() - t0
            assert got.num_rows == files * rows_per_file
            assert storage._ARROW_S3_OFF == (["bench: s3fs"] if client == "s3fs" else []), storage._ARROW_S3_OFF
            return read_s, _cpu_s(proc.pid) - server0, _cpu_s() - client0

        # Each client twice, in the order s3fs, Arrow, Arrow, s3fs, so that neither gains from going first or
        # last (the server's state, caches); the figures are the means of the two.
        times = {c: [] for c in ("s3fs", "arrow")}
        for client in ("s3fs", "arrow", "arrow", "s3fs"):
            times[client].append(timed_read(client))
        (base_s, base_server_s, base_client_s), (read_s, server_s, client_s) = (
            tuple(float(np.mean(v)) for v in zip(*times[c])) for c in ("s3fs", "arrow"))
        t0 = time.perf_counter()
        summary = compaction.compact(out, cfg, by="bench")
        compact_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = resume.load_for_planning(out, cfg)
        read_after_s = time.perf_counter() - t0
        assert again.num_rows == files * rows_per_file
        return {"files": files, "rows": files * rows_per_file, "read_s": read_s, "per_file_ms": 1000 * read_s / files,
                "read_20k_s": read_s / files * 20_000, "client_cpu_ms_per_file": 1000 * client_s / files,
                "server_cpu_ms_per_file": 1000 * server_s / files, "client_bound_20k_s": client_s / files * 20_000,
                "s3fs_per_file_ms": 1000 * base_s / files, "s3fs_client_cpu_ms_per_file": 1000 * base_client_s / files,
                "s3fs_server_cpu_ms_per_file": 1000 * base_server_s / files,
                "s3fs_client_bound_20k_s": base_client_s / files * 20_000,
                "compact_s": compact_s, "files_after": summary["files_after"],
                "read_after_s": read_after_s,
                "files_per_1m": summary["files_after"] * 1_000_000 / (files * rows_per_file)}
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archives", type=int, nargs="*", default=[1000], help="archive sizes (images)")
    ap.add_argument("--plan-rows", type=int, default=10_000_000, help="manifest rows of the planning case (0: skip)")
    ap.add_argument("--s3-files", type=int, default=2000, help="result files of the S3 ledger case (0: skip)")
    ap.add_argument("--s3-server", choices=S3_SERVERS, default="moto", help="the S3 server of the ledger case")
    ap.add_argument("--s3rver-bin", default="s3rver", help="s3rver's executable (with --s3-server s3rver)")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    cores = len(os.sched_getaffinity(0))
    last: dict = {}
    if args.archives:
        import ray

        ray.init(num_cpus=cores, num_gpus=1, log_to_driver=False, address="local")  # up before the clock
        print(f"archives on a local Ray: {cores} CPUs, 1 logical GPU")
        print("      N   img/s   overhead ms/img (other CPU + idle)   driver peak GB   files written -> after fold   "
              "no-op re-run s   status s")
        for n in args.archives:
            r = archive_case(n, cores)
            split = f"({r['other_cpu_ms_per_image']:.1f} + {r['idle_ms_per_image']:.1f})"
            print(f"{r['n']:>7,} {r['images_per_s']:7.2f} {r['overhead_ms_per_image']:17.1f} {split:<17}"
                  f"{r['driver_peak_gb']:16.2f}"
                  f" {r['files_written']!s:>15} -> {r['files_after_fold']:<10} {r['noop_rerun_s']:16.2f} "
                  f"{r['status_s']:10.2f}   {json.dumps(r['by_status'])}")
            last.update(r)
        ray.shutdown()
    plan = {}
    if args.plan_rows:
        print(f"planning {args.plan_rows:,} rows (90% done), bench/plan_scale.py in a fresh process:")
        plan = plan_case(args.plan_rows)
    files_per_1m = None
    if args.s3_files:
        s = s3_case(args.s3_files, server=args.s3_server, s3rver_bin=args.s3rver_bin)
        files_per_1m = s["files_per_1m"]
        print(f"S3 ledger ({args.s3_server}), s3fs (the baseline, same run): {s['s3fs_per_file_ms']:.1f} ms per file; "
              f"CPU per file: reader {s['s3fs_client_cpu_ms_per_file']:.2f} ms, server "
              f"{s['s3fs_server_cpu_ms_per_file']:.1f} ms; "
              f"20,000 files with the reader's CPU as the bound: {s['s3fs_client_bound_20k_s']:.0f} s")
        print(f"S3 ledger ({args.s3_server}): {s['files']:,} files / {s['rows']:,} rows read in {s['read_s']:.1f} s "
              f"({s['per_file_ms']:.1f} ms per file; 20,000 files: {s['read_20k_s']:.0f} s here, where the server's "
              f"own CPU shares the cores; CPU per file: reader {s['client_cpu_ms_per_file']:.2f} ms, server "
              f"{s['server_cpu_ms_per_file']:.1f} ms; 20,000 files with the reader's CPU as the bound: "
              f"{s['client_bound_20k_s']:.0f} s); compact "
              f"{s['compact_s']:.1f} s -> {s['files_after']} file(s), read again {s['read_after_s']:.2f} s; "
              f"{files_per_1m:.0f} files per 1 M images")
    tag = f"{args.plan_rows // 1_000_000}m"
    print(f"overhead_ms_per_image={last.get('overhead_ms_per_image', float('nan')):.1f} "
          f"noop_rerun_s={last.get('noop_rerun_s', float('nan')):.2f} "
          f"plan_{tag}_s={plan.get(f'plan_{tag}_s', 'nan')} plan_{tag}_peak_gb={plan.get(f'plan_{tag}_peak_gb', 'nan')} "
          f"files_per_1m={files_per_1m if files_per_1m is None else round(files_per_1m)}")


if __name__ == "__main__":
    main()
