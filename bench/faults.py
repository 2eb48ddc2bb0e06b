"""Fault injection on a sample archive: each fault of the matrix with a fixed seed, then the archive's
invariants, image by image:

- completed exactly once per fingerprint (``duplicated``: images with more than one final result row);
- nothing lost (``lost``: images of the manifest without a final result once the faults are over);
- every derivative decodes and its sha256 equals the row's ``out_sha256``;
- every original's sha256 unchanged (``originals_changed``).

``redone``: derivatives written again because a fault cut their run short (work, not data, lost), with the
bound it must stay under: the Compose batches that were in flight (one per Compose task).

    python bench/faults.py                     # the whole matrix, then the table and the figures line
    python bench/faults.py --only driver_kills --images 24 --seed 7

The tests (``tests/test_faults.py``) run the same scenarios and assert the counts.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from pipeline import imageio, ledger, runs  # noqa: E402
from pipeline.config import StorageConfig  # noqa: E402
from pipeline.schema import FINAL_STATUSES  # noqa: E402

SHARED = Path(os.environ.get("ARCHIVE_SHARED_DIR", REPO.parent / "shared"))
PHOTOS = ["whole/codeformer_03.jpg", "whole/codeformer_04.jpg", "whole/codeformer_05.jpg", "whole/codeformer_00.jpg",
          "whole/facexlib_test.jpg", "whole/facexlib_test2.jpg", "old/old_a.png", "old/old_d.png"]
FINAL = {s.value for s in FINAL_STATUSES}
COMPOSE_BATCH = 2


@dataclass
class Outcome:
    fault: str
    injected: int
    images: int
    lost: int
    duplicated: int
    redone: int
    originals_changed: int
    bad_derivatives: int = 0
    redone_bound: int = 0
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # anything else that broke a promise (a run failed, ...)

    @property
    def ok(self) -> bool:
        return (self.lost == self.duplicated == self.originals_changed == self.bad_derivatives == 0
                and self.redone <= self.redone_bound and not self.problems)


# --------------------------------------------------------------------------------------------- the archive

def sample_archive(root: Path, n: int, seed: int) -> list[Path]:
    """``n`` real photographs (copies of the shared ones) in nested folders, some with faces, one without."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        rel = PHOTOS[i % len(PHOTOS)] if i < len(PHOTOS) else rnd.choice(PHOTOS)
        dst = root / f"box{i // 8:02d}" / f"{i:03d}-{Path(rel).name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHARED / "images" / rel, dst)
        out.append(dst)
    return out


def write_manifest(path: Path, uris: list[str]) -> Path:
    pacsv.write_csv(pa.table({"uri": uris}), path)
    return path


def weights_dir(work: Path) -> Path:
    d = work / "weights"
    d.mkdir(exist_ok=True)
    for name in ("detection_mobilenet0.25_Final.pth", "identity_mobilefacenet_arcface.onnx"):
        if not (d / name).exists():
            os.symlink(SHARED / "models" / name, d / name)
    return d


def run_args(manifest: str, out: str, work: Path, *extra: str) -> list[str]:
    return ["run", "-m", manifest, "-o", out, "--weights-dir", str(weights_dir(work)),
            "--detector", "retinaface_mobile0.25", "--set", "qa.identity_backend=onnx",
            "--set", f"restore.model={SHARED / 'fixtures' / 'gfpgan' / 'gfpgan_tiny_a_checkpoint.pth'}",
            "--set", "allow_download=false", "--set", "cluster.num_cpus=2", "--set", "cluster.num_gpus=1",
            "--set", "cluster.heartbeat_s=1", "--set", "cluster.progress_s=2", "--set", "cluster.rows_per_block=4",
            "--set", "cluster.decode_batch_size=2", "--set", "cluster.restore_batch_size=4",
            "--set", f"cluster.compose_batch_size={COMPOSE_BATCH}", *extra]


def start(args: list[str], env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "a") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, stdout=out, stderr=out,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))


def finish(args: list[str], env: dict | None = None, log: Path | None = None, timeout: float = 600) -> int:
    p = start(args, env, log)
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------- audit

class LocalOutput:
    def __init__(self, root: Path):
        self.root = root

    def derivatives(self) -> dict[str, tuple[int, int]]:
        """Derivative (and access copy) -> (inode, mtime): an atomic rewrite gives a new inode."""
        out = {}
        for area in ("images", "access"):
            for p in (self.root / area).rglob("*") if (self.root / area).exists() else []:
                if p.is_file() and not p.name.startswith("."):
                    st = p.stat()
                    out[str(p)] = (st.st_ino, st.st_mtime_ns)
        return out

    def read(self, uri: str) -> bytes:
        return Path(uri).read_bytes()


class S3Output:
    def __init__(self, fs, root: str):
        self.fs, self.root = fs, root

    def derivatives(self) -> dict[str, tuple[str, str]]:
        out = {}
        for area in ("images", "access"):
            prefix = f"{self.root.split('://', 1)[1]}/{area}"
            self.fs.invalidate_cache(prefix)
            if self.fs.exists(prefix):
                for p, info in self.fs.find(prefix, detail=True).items():
                    out["s3://" + p] = (info.get("ETag"), str(info.get("LastModified")))
        return out

    def read(self, uri: str) -> bytes:
        return self.fs.cat_file(uri)


def rewritten(before: dict, after: dict) -> int:
    return sum(1 for k, v in before.items() if k in after and after[k] != v)


def recorded(out: str, storage: StorageConfig) -> set[tuple[str, str]]:
    """(image_id, run_id) of every result row now in the ledger."""
    t = ledger.load_results(out, storage, columns=["image_id", "run_id"])
    return set(zip(t["image_id"].to_pylist(), t["run_id"].to_pylist())) if t.num_rows else set()


def audit(o: Outcome, out: str, storage: StorageConfig, ids: set[str], originals: dict[str, str], read_original,
          reader, seen: set[tuple[str, str]] = frozenset()) -> Outcome:
    """The invariants. ``seen``: rows recorded while the faults ran; each must still be there (a row hidden or
    removed is a lost result, even if a later run redid its image)."""
    rows = ledger.load_results(out, storage).to_pylist()
    gone = set(seen) - {(r["image_id"], r["run_id"]) for r in rows}
    if gone:
        o.problems.append(f"{len(gone)} result rows recorded during the faults vanished, e.g. {sorted(gone)[:2]}")
    final: dict[tuple[str, str], int] = {}
    for r in rows:
        if r["status"] in FINAL:
            final[(r["image_id"], r["fingerprint"])] = final.get((r["image_id"], r["fingerprint"]), 0) + 1
    o.duplicated = sum(1 for n in final.values() if n > 1)
    done = {i for i, _ in final}
    o.lost = len(ids - done) + len({i for i, _ in gone})
    latest: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: r["finished_at"]):
        latest[r["image_id"]] = r
    for r in latest.values():
        if r["status"] == "ok":
            try:
                data = reader.read(r["output_uri"])
                imageio.decode(data, 10**9)
                if sha(data) != r["out_sha256"]:
                    raise ValueError("sha256 differs from the row's out_sha256")
            except Exception as e:
                o.bad_derivatives += 1
                o.problems.append(f"{r['output_uri']}: {type(e).__name__}: {e}")
    o.originals_changed = sum(1 for u, h in originals.items() if sha(read_original(u)) != h)
    o.images = len(ids)
    return o


def image_ids(out: str, storage: StorageConfig) -> set[str]:
    return {r["image_id"] for r in ledger.load_results(out, storage, columns=["image_id"]).to_pylist()}


def wait_for(pred, timeout: float, every: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return False


def _local_setup(work: Path, n: int, seed: int):
    files = sample_archive(work / "archive", n, seed)
    manifest = write_manifest(work / "manifest.csv", [str(f) for f in files])
    originals = {str(f): sha(f.read_bytes()) for f in files}
    return files, manifest, originals


def _ids_of(manifest: Path) -> set[str]:
    from pipeline.config import load_config
    from pipeline.manifest import read_manifest

    return set(read_manifest(load_config(None, {"input.manifest": str(manifest)}, environ={})).table["image_id"]
               .to_pylist())


def _sessions_alive(out: Path) -> list[str]:
    """Ray session folders named in the lease files that some live process still uses."""
    sessions = set()
    for p in (out / "_lock").glob("gen-*.json"):
        s = json.loads(p.read_text()).get("ray_session")
        if s:
            sessions.add(s)
    alive = []
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit():
            continue
        for fd in ("1", "2"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                alive += [f"{pid}:{s}" for s in sessions if s in link]
    return alive


# --------------------------------------------------------------------------------------------- scenarios

def driver_kills(work: Path, seed: int = 0, n: int = 64, kills: int = 5) -> Outcome:
    """The driver SIGKILLed at ``kills`` seeded moments of one job (its local Ray left to itself, as kill -9
    leaves it), restarted each time, then a clean finish. The first kill lands while the run starts up;
    the others a seeded 0-1.5 s after the run has written its first new derivative, so they hit images in
    every stage of the pipeline."""
    files, manifest, originals = _local_setup(work, n, seed)
    out = work / "out"
    args = run_args(str(manifest), str(out), work)
    rnd = random.Random(seed)
    o = Outcome("driver SIGKILL x%d" % kills, 0, n, 0, 0, 0, 0)
    view = LocalOutput(out)
    worst = 0
    seen: set[tuple[str, str]] = set()
    for k in range(kills):
        before = view.derivatives()
        p = start(args, log=work / "runs.log")
        if k == 0:
            wait_for(lambda: p.poll() is not None, rnd.uniform(1.0, 6.0))
        else:
            wait_for(lambda: p.poll() is not None or len(view.derivatives()) > len(before), 300)
            wait_for(lambda: p.poll() is not None, rnd.uniform(0.0, 1.5))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)  # the driver only: its Ray is left as a kill -9 leaves it
            o.injected += 1
        p.wait()
        time.sleep(0.5)
        seen |= recorded(str(out), StorageConfig())
        redone = rewritten(before, view.derivatives())
        worst = max(worst, redone)
        o.redone += redone
    before = view.derivatives()
    rc = finish(args, log=work / "runs.log")
    o.redone += rewritten(before, view.derivatives())
    if rc != 0:
        o.problems.append(f"clean finish exited {rc}")
    records = runs.read_records(str(out), StorageConfig())
    states = [r["state"] for r in records]
    if states.count("running"):
        o.problems.append(f"{states.count('running')} run records still say running: {states}")
    leftovers = _sessions_alive(out)
    if leftovers:
        o.problems.append(f"leftover Ray processes of killed runs: {leftovers}")
    o.redone_bound = kills * 2 * COMPOSE_BATCH  # per kill: the Compose batches in flight (2 CPUs: 2 tasks)
    o.notes.append(f"worst kill redid {worst} derivatives; run states {states}; {len(seen)} rows recorded by "
                   "the killed runs")
    return audit(o, str(out), StorageConfig(), _ids_of(manifest), originals, lambda u: Path(u).read_bytes(), view,
                 seen)


def _actor_pid(name: str) -> int | None:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                if f"MapBatches({name})" in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"):
                    return int(pid)
    return None


def _kill_actor(name: str, out: Path, rnd: random.Random, timeout: float, running=lambda: True) -> int:
    """SIGKILL the Ray worker that runs the ``name`` actor mid-run: a seeded 0-1 s after the run has written
    its first derivative, or after the actor has worked 2 s, whichever comes first; 1 if it was killed.
    The actor is looked for again while the run is ``running`` (on a loaded machine it may be between
    processes at that moment), so the outcome does not depend on the machine's speed."""
    if not wait_for(lambda: _actor_pid(name) is not None, timeout, every=0.05):
        return 0
    wait_for(lambda: (out / "images").exists() and any((out / "images").rglob("*.*")), 2.0, every=0.05)
    time.sleep(rnd.uniform(0.0, 1.0))
    deadline = time.monotonic() + timeout
    while running() and time.monotonic() < deadline:
        pid = _actor_pid(name)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            return 1
        time.sleep(0.05)
    return 0


def actor_kill(work: Path, seed: int = 0, n: int = 48, actor: str = "DecodeDetect") -> Outcome:
    """A stage's actor SIGKILLed mid-run: Ray Data restarts it (max_restarts=-1) and retries its batches
    (max_task_retries=-1), as configured on purpose; the job finishes."""
    files, manifest, originals = _local_setup(work, n, seed)
    out = work / "out"
    o = Outcome(f"{actor} actor SIGKILL", 0, n, 0, 0, 0, 0)
    view = LocalOutput(out)
    p = start(run_args(str(manifest), str(out), work), log=work / "runs.log")
    o.injected = _kill_actor(actor, out, random.Random(seed), 300, running=lambda: p.poll() is None)
    records = runs.read_records(str(out), StorageConfig())
    if o.injected and records and records[-1]["state"] != "running":
        o.problems.append("the actor was killed after the run had ended")
    rc = p.wait(600)
    if rc != 0:
        o.problems.append(f"run exited {rc}")
    if not o.injected:
        o.problems.append("the actor was not found mid-run")
    return audit(o, str(out), StorageConfig(), _ids_of(manifest), originals, lambda u: Path(u).read_bytes(), view)


def node_removed(work: Path, seed: int = 0, n: int = 32) -> Outcome:
    """A multi-node local cluster (a head, a CPU node, a node with a logical GPU); the CPU node is removed
    mid-run and a fresh one joins a few seconds later, as an autoscaler replaces a lost node."""
    from ray.cluster_utils import Cluster

    files, manifest, originals = _local_setup(work, n, seed)
    out = work / "out"
    o = Outcome("node removed", 0, n, 0, 0, 0, 0)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cpu = cluster.add_node(num_cpus=2)
        cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        p = start(run_args(str(manifest), str(out), work, "--ray-address", cluster.address,
                           "--set", "cluster.num_cpus=null", "--set", "cluster.num_gpus=null"),
                  log=work / "runs.log")
        view, before = LocalOutput(out), {}
        if wait_for(lambda: (out / "images").exists() and any((out / "images").rglob("*.*")), 300):
            before = view.derivatives()
            cluster.remove_node(cpu)
            o.injected = 1
            time.sleep(5)
            cluster.add_node(num_cpus=2)
        rc = p.wait(600)
        o.redone = rewritten(before, view.derivatives())  # Compose batches retried after the node died
        o.redone_bound = 2 * COMPOSE_BATCH
        if rc != 0:
            o.problems.append(f"run exited {rc}")
        if not o.injected:
            o.problems.append("the run ended before the node could be removed")
    finally:
        cluster.shutdown()
    return audit(o, str(out), StorageConfig(), _ids_of(manifest), originals, lambda u: Path(u).read_bytes(),
                 LocalOutput(out))


@contextlib.contextmanager
def moto_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_for(lambda: _listening(port), 30):
            raise RuntimeError("moto server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        p.terminate()
        p.wait(10)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _s3_env() -> dict:
    return {"AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
            "AWS_DEFAULT_REGION": "us-east-1"}


def _s3_archive(fs, bucket: str, n: int, seed: int, work: Path) -> tuple[str, dict[str, str]]:
    fs.mkdir(bucket)
    files = sample_archive(work / "archive", n, seed)
    originals = {}
    for f in files:
        key = f"{bucket}/scans/{f.parent.name}/{f.name}"
        fs.put_file(str(f), key)
        originals["s3://" + key] = sha(f.read_bytes())
    table = pa.table({"uri": list(originals)})
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink)
    fs.pipe_file(f"{bucket}/manifest.csv", sink.getvalue().to_pybytes())
    for name in ("detection_mobilenet0.25_Final.pth", "identity_mobilefacenet_arcface.onnx"):
        fs.put_file(str(SHARED / "models" / name), f"{bucket}/models/{name}")
    return f"s3://{bucket}/manifest.csv", originals


def s3_faults(work: Path, seed: int = 0, n: int = 16, rates: dict | None = None) -> Outcome:
    """A fault-injecting proxy in front of the S3 server: 503 SlowDown, 500, connection resets and latency
    spikes at seeded rates on every request: manifest, images, weights and output."""
    import s3fs
    from s3_fault_proxy import FaultProxy, Rule

    os.environ.update(_s3_env())
    rates = rates or {"503": 0.08, "500": 0.04, "reset": 0.04, "latency": 0.04}
    o = Outcome("S3 " + " ".join(f"{k} {v:.0%}" for k, v in rates.items()), 0, n, 0, 0, 0, 0)
    with moto_server() as endpoint:
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
        manifest, originals = _s3_archive(fs, "faults", n, seed, work)
        with FaultProxy(endpoint, [Rule(".*", rates, latency_s=0.3)], seed=seed) as proxy:
            args = run_args(manifest, "s3://faults/out", work, "--s3-endpoint-url", proxy.url,
                            "--weights-dir", "s3://faults/models", "--set", "cluster.heartbeat_s=2")
            for attempt in range(3):  # a read_error after all retries is retried by the next run
                rc = finish(args, env=_s3_env(), log=work / "runs.log")
                if rc != 0:
                    o.notes.append(f"run {attempt} exited {rc}")
                proxy.enabled = False
                plan = [r.get("plan", {}) for r in runs.read_records("s3://faults/out", StorageConfig(
                    s3_endpoint_url=endpoint))]
                proxy.enabled = True
                if plan and plan[-1].get("todo") == 0:
                    break
            o.injected = proxy.injected
            o.notes.append(f"{proxy.requests} requests, faults {proxy.counts}, {attempt + 1} runs")
        storage = StorageConfig(s3_endpoint_url=endpoint)
        seen = recorded("s3://faults/out", storage)
        args = run_args(manifest, "s3://faults/out", work, "--s3-endpoint-url", endpoint,
                        "--weights-dir", "s3://faults/models")
        if finish(args, env=_s3_env(), log=work / "runs.log") != 0:  # faults off: anything left is done now
            o.problems.append("the run without faults failed")
        from pipeline.manifest import read_manifest
        from pipeline.config import load_config
        ids = set(read_manifest(load_config(None, {"input.manifest": manifest, "storage.s3_endpoint_url": endpoint},
                                            environ={})).table["image_id"].to_pylist())
        unaccounted = ids - {i for i, _ in seen}
        if unaccounted:
            o.problems.append(f"{len(unaccounted)} images had no row at all after the runs with faults")
        o = audit(o, "s3://faults/out", storage, ids, originals, lambda u: fs.cat_file(u),
                  S3Output(fs, "s3://faults/out"), seen)
    return o


def two_runs(work: Path, seed: int = 0, n: int = 8, s3: bool = False) -> Outcome:
    """Two runs on one output started within 100 ms: one does the work, the other is refused."""
    o = Outcome(f"two runs at once ({'S3' if s3 else 'local'})", 0, n, 0, 0, 0, 0)
    gap = random.Random(seed).uniform(0.0, 0.1)
    with (moto_server() if s3 else contextlib.nullcontext()) as endpoint:
        if s3:
            import s3fs
            os.environ.update(_s3_env())
            fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
            manifest, originals = _s3_archive(fs, "two", n, seed, work)
            out, storage, extra = "s3://two/out", StorageConfig(s3_endpoint_url=endpoint), ["--s3-endpoint-url",
                                                                                            endpoint]
            read_original, view = (lambda u: fs.cat_file(u)), S3Output(fs, "s3://two/out")
        else:
            files, manifest_path, originals = _local_setup(work, n, seed)
            manifest, out, storage, extra = str(manifest_path), str(work / "out"), StorageConfig(), []
            read_original, view = (lambda u: Path(u).read_bytes()), LocalOutput(work / "out")
        args = run_args(manifest, out, work, *extra)
        a = start(args, env=_s3_env(), log=work / "a.log")
        time.sleep(gap)
        both = a.poll() is None
        b = start(args, env=_s3_env(), log=work / "b.log")
        o.injected = int(both)  # the fault: a second run while the first is alive
        codes = sorted([a.wait(600), b.wait(600)])
        logs = (work / "a.log").read_text() + (work / "b.log").read_text()
        if codes != [0, 1] or "still running" not in logs:
            o.problems.append(f"exit codes {codes}, expected one run refused")
        o.notes.append(f"second run started {gap * 1000:.0f} ms after the first")
        from pipeline.config import load_config
        from pipeline.manifest import read_manifest
        ids = set(read_manifest(load_config(None, {"input.manifest": manifest, **(
            {"storage.s3_endpoint_url": endpoint} if s3 else {})}, environ={})).table["image_id"].to_pylist())
        o = audit(o, out, storage, ids, originals, read_original, view)
    return o


def readers_during_job(work: Path, seed: int = 0, n: int = 16) -> Outcome:
    """``status`` and ``report`` polled while a job writes: they change nothing (every file they saw is still
    there, byte for byte, after they ran), and the job's accounting stays exact."""
    files, manifest, originals = _local_setup(work, n, seed)
    out = work / "out"
    o = Outcome("status/report during a job", 0, n, 0, 0, 0, 0)
    p = start(run_args(str(manifest), str(out), work), log=work / "runs.log")
    changed, seen = [], set()
    while p.poll() is None:
        seen |= recorded(str(out), StorageConfig()) if (out / "_results").exists() else set()
        results = out / "_results"
        before = {str(f): f.read_bytes() for f in results.rglob("*") if f.is_file()} if results.exists() else {}
        cmd = ["status", str(out), "--json"] if o.injected % 2 == 0 else ["report", str(out)]
        subprocess.run([sys.executable, "-m", "pipeline.cli", *cmd], cwd=REPO, capture_output=True, timeout=120)
        o.injected += 1
        for f, data in before.items():
            if not Path(f).exists() or Path(f).read_bytes() != data:
                changed.append(f)
    if p.returncode != 0:
        o.problems.append(f"run exited {p.returncode}")
    rec = [r for r in runs.read_records(str(out), StorageConfig()) if r["state"] == "finished"]
    # The run itself folds its per-batch files at its end (compaction.py): those may be gone, no others.
    folded = {str(out / "_results" / f) for r in (out / "_results" / "_folds").glob("*.json")
              for body in [json.loads(r.read_text())] if rec and body["by"] == rec[-1]["run_id"]
              for f in body["replaces"]}
    changed = [f for f in changed if not (f in folded and not Path(f).exists())]
    if changed or list(out.rglob(".torn-*")):
        o.problems.append(f"a reader changed the ledger: {changed[:3]}")
    if not rec or rec[-1]["summary"]["images"] != n:
        o.problems.append(f"the run's summary counts {rec[-1]['summary']['images'] if rec else None} images of {n}")
    o.notes.append(f"{o.injected} reads while the job ran")
    return audit(o, str(out), StorageConfig(), _ids_of(manifest), originals, lambda u: Path(u).read_bytes(),
                 LocalOutput(out), seen)


SCENARIOS = {
    "driver_kills": driver_kills,
    "decode_actor_kill": lambda w, s: actor_kill(w, s, actor="DecodeDetect"),
    "restore_actor_kill": lambda w, s: actor_kill(w, s, actor="Restore"),
    "node_removed": node_removed,
    "s3_faults": s3_faults,
    "s3_throttled": lambda w, s: s3_faults(w, s, rates={"503": 0.5}),  # the measured case; ~5 min
    "two_runs_local": lambda w, s: two_runs(w, s, s3=False),
    "two_runs_s3": lambda w, s: two_runs(w, s, s3=True),
    "readers_during_job": readers_during_job,
}


def run_scenario(name: str, seed: int = 0, keep: bool = False) -> Outcome:
    work = Path(tempfile.mkdtemp(prefix=f"faults-{name}-"))
    try:
        return SCENARIOS[name](work, seed)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=list(SCENARIOS), help="run only these (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep each scenario's folder (printed)")
    args = ap.parse_args()
    results = []
    for name in args.only or list(SCENARIOS):
        t0 = time.perf_counter()
        o = run_scenario(name, args.seed, args.keep)
        results.append(o)
        print(f"# {name}: {time.perf_counter() - t0:.0f} s; " + "; ".join(o.notes), flush=True)
    print("| fault | injected | images | lost | duplicated | redone (bound) | originals changed | bad derivatives "
          "| other problems |")
    print("|---|---|---|---|---|---|---|---|---|")
    for o in results:
        print(f"| {o.fault} | {o.injected} | {o.images} | {o.lost} | {o.duplicated} | {o.redone} ({o.redone_bound}) "
              f"| {o.originals_changed} | {o.bad_derivatives} | {'; '.join(o.problems) or 'none'} |")
    print(f"faults_injected={sum(o.injected for o in results)} lost={sum(o.lost for o in results)} "
          f"duplicated={sum(o.duplicated for o in results)} "
          f"originals_changed={sum(o.originals_changed for o in results)}")
    sys.exit(0 if all(o.ok for o in results) else 1)


if __name__ == "__main__":
    main()
