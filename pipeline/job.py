"""The only module that imports Ray: preflight, lease, plan, and the Ray Data chain

    from_arrow(todo) -> DecodeDetect (CPU actors) -> Restore (1 actor per GPU)
                     -> Compose + its batch's result file (CPU tasks) -> summaries to the driver
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import platform
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from . import __version__, layout, ledger, metadata, provenance, resume, runs, storage, weights
from .config import ClusterConfig, RunConfig
from .errors import ConfigError, StorageError
from .manifest import Manifest, read_manifest
from .report import count_by_status

log = logging.getLogger(__name__)

# Ray keeps one object reference per block in the driver; this bounds them for huge manifests.
MAX_BLOCKS = 20_000


@dataclass(frozen=True)
class ResourcePlan:
    restore_actors: int
    restore_gpus: float       # per Restore actor: 1 on a GPU cluster, 0 on a CPU-only one
    restore_cpus: float
    decode_min: int
    decode_max: int
    decode_cpus: float
    compose_cpus: float


def plan_resources(resources: dict[str, float], cc: ClusterConfig) -> ResourcePlan:
    """Size the actor pools from the cluster's resources (``ray.cluster_resources()``).

    One Restore actor per GPU. What CPUs remain after the Restore actors and one Compose task go to
    DecodeDetect actors. On a machine too small for one of each at the configured sizes, every
    reservation is scaled down together (Ray accepts fractional CPUs) rather than leaving the pipeline
    with a stage that can never be scheduled — which hangs Ray Data instead of failing.
    """
    cpus, gpus = float(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    if cpus <= 0:
        raise ConfigError("the Ray cluster reports no CPUs")
    actors = max(1, gpus)
    rc, dc, cc_cpus = cc.restore_actor_cpus, cc.decode_actor_cpus, cc.compose_task_cpus
    need = actors * rc + dc + cc_cpus
    if need > cpus:
        f = cpus / need
        rc, dc, cc_cpus = rc * f, dc * f, cc_cpus * f
    decode_max = max(1, int((cpus - actors * rc - cc_cpus) / dc + 1e-9))
    if cc.decode_actors_max:
        decode_max = min(decode_max, cc.decode_actors_max)
    def down(x: float) -> float:  # rounding down keeps the sum within the cluster
        return math.floor(x * 1e4) / 1e4

    return ResourcePlan(actors, 1.0 if gpus else 0.0, down(rc), 1, decode_max, down(dc), down(cc_cpus))


@dataclass
class Preflight:
    manifest: Manifest
    resolved: dict[str, weights.Resolved]
    fingerprint: str
    untrained: bool
    signing: provenance.Material | None = None
    hashes: dict[str, str] | None = None  # weights sha256 by name: in the fingerprint, and what workers must load


def _probe_input(manifest: Manifest, cfg: RunConfig, tries: int = 3) -> None:
    """Read the first bytes of a listed input, so that missing credentials, a wrong endpoint or a denied
    bucket stop the run at once instead of becoming a million read_error rows. Missing files are the
    inputs' own problem (their rows will say so): up to ``tries`` are tried before giving up quietly."""
    uris = manifest.table["uri"]
    for i in range(min(tries, len(uris))):
        uri = uris[i].as_py()
        try:
            storage.read_head(uri, cfg.storage)
            return
        except (FileNotFoundError, IsADirectoryError, ValueError):
            continue  # that row's own problem (missing, a folder, a malformed URI): its row will say so
        except Exception as e:
            raise StorageError(f"cannot read the inputs: {uri}: {type(e).__name__}: {e} (check credentials, "
                               "endpoint and permissions)") from None


def _probe_output(out: str, run_id: str, cfg: RunConfig) -> None:
    probe = storage.join(runs.runs_dir(out), f".preflight-{run_id}")
    try:
        storage.write_bytes(probe, b"ok", cfg.storage)
        storage.delete(probe, cfg.storage)
    except Exception as e:
        raise StorageError(f"cannot write to output {out!r}: {type(e).__name__}: {e}") from None


def preflight(cfg: RunConfig, run_id: str, manifest: Manifest) -> Preflight:
    """The checks that need the lease held: an input readable, the weights found and hashed, the signing
    material usable."""
    _probe_input(manifest, cfg)
    signing = provenance.load(cfg.provenance, cfg.storage)
    resolved = weights.resolve_all(cfg)
    hashes = {name: r.sha256 for name, r in resolved.items()}
    return Preflight(manifest, resolved, cfg.fingerprint(hashes), any(r.untrained for r in resolved.values()),
                     signing, hashes)


def _software(cfg: RunConfig, pre: Preflight) -> str:
    """What restored the faces, for the derivative's metadata: tool, model and its weights' hash."""
    w = pre.resolved[cfg.restore.model]
    return metadata.software_label(w.spec.name, w.sha256, w.untrained)


def _versions() -> dict[str, str]:
    """Installed versions, from package metadata: importing torch and facexlib only to ask them cost a run
    with nothing to do 15-17 s on a cold node."""
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    return {"archive_restore": __version__, "python": platform.python_version(), "ray": version("ray"),
            "torch": version("torch"), "facexlib": version("facexlib"), "pyarrow": pa.__version__,
            "jpeglib": version("jpeglib")}


def _init_ray(cfg: RunConfig) -> str | None:
    """Connect to (or start) Ray; the session folder of a local Ray started here, else None."""
    import ray

    if ray.is_initialized():
        return None
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return None
    # "local": always a fresh local instance. A bare ray.init() would follow /tmp/ray/ray_current_cluster,
    # which a head that died without `ray stop` leaves behind, and fail to connect to it.
    ray.init(address="local", num_cpus=cfg.cluster.num_cpus, num_gpus=cfg.cluster.num_gpus,
             include_dashboard=False)
    return ray._private.worker._global_node.get_session_dir_path()


class Progress:
    """What the driver learns from each finished Compose batch: counts for the log and the run record."""

    def __init__(self):
        self.by_status: dict[str, int] = {}
        self.images = self.faces = self.reused = self.parts = 0

    def add(self, t: pa.Table) -> None:
        self.images += t.num_rows
        self.faces += int(pc.sum(t["n_faces"]).as_py() or 0)
        self.reused += int(pc.sum(pc.cast(pc.fill_null(t["detect_reused"], False), pa.int64())).as_py() or 0)
        self.parts += len(pc.unique(t["part"]))
        for k, v in count_by_status(t).items():
            self.by_status[k] = self.by_status.get(k, 0) + v

    def summary(self, elapsed_s: float) -> dict:
        return {"images": self.images, "by_status": dict(sorted(self.by_status.items())), "faces": self.faces,
                "detections_reused": self.reused, "result_files": self.parts, "elapsed_s": round(elapsed_s, 2),
                "images_per_s": round(self.images / elapsed_s, 3) if elapsed_s > 0 else None,
                "faces_per_s": round(self.faces / elapsed_s, 3) if elapsed_s > 0 else None}


def _execute(cfg: RunConfig, pre: Preflight, todo: pa.Table, run_id: str, lease: runs.Lease, record: dict,
             progress: Progress, t0: float, input_folders) -> None:
    import ray
    from ray.data import ActorPoolStrategy

    from .stages import DecodeDetect, Restore, compose_and_record

    session = _init_ray(cfg)
    if session:  # a killed driver leaves some of its local Ray behind: the next run stops them (runs.py)
        lease.update(ray_session=session)
        lease.renew()
    rp = plan_resources(ray.cluster_resources(), cfg.cluster)
    log.info("resources: %s", rp)
    per_block = max(cfg.cluster.rows_per_block, math.ceil(todo.num_rows / MAX_BLOCKS))
    # Pre-split in the driver: small manifests would otherwise be one block feeding one actor.
    blocks = [todo.slice(i, per_block) for i in range(0, todo.num_rows, per_block)]
    ds = ray.data.from_arrow(blocks)
    passthrough = pre.manifest.passthrough
    expected = pre.hashes  # workers refuse files other than those preflight checked
    # Fault tolerance is Ray Data's default, kept on purpose: an actor that dies is restarted
    # (max_restarts=-1) and its batches are retried (max_task_retries=-1); a Compose task whose worker
    # dies is retried (max_retries=-1). A retried Compose batch rewrites the same result file.
    ds = ds.map_batches(
        DecodeDetect, fn_constructor_kwargs={"cfg": cfg, "root": pre.manifest.root, "passthrough": passthrough,
                                             "expected_weights": expected},
        batch_size=cfg.cluster.decode_batch_size, batch_format="pyarrow", num_cpus=rp.decode_cpus,
        compute=ActorPoolStrategy(min_size=rp.decode_min, max_size=rp.decode_max))
    ds = ds.map_batches(
        Restore, fn_constructor_kwargs={"cfg": cfg, "passthrough": passthrough, "expected_weights": expected},
        batch_size=cfg.cluster.restore_batch_size, batch_format="pyarrow", num_gpus=rp.restore_gpus,
        num_cpus=rp.restore_cpus, compute=ActorPoolStrategy(size=rp.restore_actors))
    ds = ds.map_batches(
        compose_and_record, fn_kwargs={"cfg": cfg, "run_id": run_id, "fingerprint": pre.fingerprint,
                                       "untrained": pre.untrained, "passthrough": passthrough,
                                       "software": _software(cfg, pre), "fence": lease.fence(),
                                       "input_folders": input_folders, "provenance": pre.signing},
        batch_size=cfg.cluster.compose_batch_size, batch_format="pyarrow", num_cpus=rp.compose_cpus)
    last = time.monotonic()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        progress.add(batch)
        if lease.lost.is_set():
            raise StorageError("this run lost the output's lease (another run may have taken it over); stopping")
        if time.monotonic() - last >= cfg.cluster.progress_s:
            last = time.monotonic()
            record["progress"] = progress.summary(time.perf_counter() - t0)
            log.info("run %s: %d of %d images done (%s)", run_id, progress.images, todo.num_rows,
                     record["progress"]["by_status"])
            runs.write_record(storage.normalize(cfg.output.root), record, cfg.storage)


def run(cfg: RunConfig) -> dict:
    """Run (or resume) the job described by ``cfg``; return the run record."""
    run_id = runs.new_run_id()
    t0 = time.perf_counter()
    if not cfg.output.root:
        raise ConfigError("no output: pass --output (a folder or s3:// prefix)")
    out = storage.normalize(cfg.output.root)
    manifest = read_manifest(cfg)
    # Before anything is written, not even the lease: the output may be where the originals are.
    inputs = layout.check(manifest.table["uri"], cfg.input.manifest, out, manifest.root)
    _probe_output(out, run_id, cfg)
    lease = runs.Lease(out, cfg.storage, run_id, cfg.cluster.heartbeat_s).acquire()
    record = {
        "run_id": run_id, "kind": "job", "state": "running", "phase": "preflight", "started_at": runs.now_iso(),
        "reprocess": cfg.reprocess, "manifest": cfg.input.manifest, "input_root": manifest.root, "output": out,
        "manifest_rows": manifest.rows_read, "duplicate_rows": manifest.duplicates,
        "rows_without_uri": manifest.without_uri, "lease_generation": lease.generation,
        "config": cfg.model_dump(mode="json"),
    }
    progress = Progress()
    try:
        if lease.taken_over:
            record["took_over_from"] = lease.retire_prior()
        runs.write_record(out, record, cfg.storage)
        lease.start()
        lease.settle(cfg.cluster.takeover_grace_s)
        pre = preflight(cfg, run_id, manifest)
        if pre.untrained:
            log.warning("UNTRAINED RUN %s: some model files were replaced by seeded random weights; derivatives "
                        "are NOT restorations and every result row says untrained=true", run_id)
        record.update(fingerprint=pre.fingerprint, untrained=pre.untrained, versions=_versions(),
                      software=_software(cfg, pre),
                      weights={n: r.describe() for n, r in pre.resolved.items()},
                      signing=pre.signing.describe() if pre.signing else None)
        torn: list[str] = []
        results = resume.load_for_planning(out, cfg.storage, torn=torn)
        if torn:  # we hold the lease: no live run can be writing them
            record["set_aside"] = ledger.set_aside(torn, cfg.storage)
        plan = resume.plan(manifest.table, results, pre.fingerprint, cfg.reprocess, cfg.max_attempts)
        record.update(plan=plan.counts, phase="processing")
        runs.write_record(out, record, cfg.storage)
        log.info("run %s: %d of %d images to process (%s)", run_id, plan.counts["todo"], plan.counts["manifest"],
                 plan.counts)
        if plan.todo.num_rows:
            keyed = resume.assign_keys(manifest.table.select(["image_id", "uri"]), manifest.root, cfg.output,
                                       resume.claims(results))
            todo = resume.join_keeping_order(plan.todo, keyed.select(["image_id", "output_key", "key_error"]))
            if not cfg.redetect or cfg.review.carry_decisions:
                todo = resume.attach_prior(todo, results, out, cfg.storage)
            del results
            _execute(cfg, pre, todo, run_id, lease, record, progress, t0, inputs.folders)
        record.update(state="finished", phase="done", finished_at=runs.now_iso(),
                      summary=progress.summary(time.perf_counter() - t0), results=ledger.results_dir(out))
        record.pop("progress", None)
    except BaseException as e:  # Ctrl-C included: the record says how the run ended
        record.update(state="lost" if lease.lost.is_set() else "failed", phase=record.get("phase"),
                      error=f"{type(e).__name__}: {e}", finished_at=runs.now_iso(),
                      summary=progress.summary(time.perf_counter() - t0))
        raise
    finally:
        lease.stop()  # no renewal may land after the final record
        try:
            runs.write_record(out, record, cfg.storage)
        finally:
            lease.release()
    log.info("run %s finished: %s", run_id, record["summary"])
    return record
