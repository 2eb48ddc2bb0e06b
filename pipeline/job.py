"""The only module that imports Ray: preflight, plan, and the Ray Data chain

    from_arrow(todo) -> DecodeDetect (CPU actors) -> Restore (1 actor per GPU) -> Compose (CPU tasks)
                     -> write_parquet(_results/run=<run_id>)
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from . import __version__, resume, storage, weights
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


def preflight(cfg: RunConfig, run_id: str) -> Preflight:
    """Every check that can fail before any image work: output location, manifest, weights."""
    if not cfg.output.root:
        raise ConfigError("no output: pass --output (a folder or s3:// prefix)")
    manifest = read_manifest(cfg)
    out = storage.normalize(cfg.output.root)
    if manifest.root and storage.is_inside(out, manifest.root):
        raise StorageError(f"output {out!r} is inside the input {manifest.root!r}: choose an output outside it, "
                           "so derivatives can never overwrite or be mistaken for originals")
    if cfg.input.manifest and storage.is_inside(cfg.input.manifest, out) and \
            storage.is_inside(storage.join(out, "images"), cfg.input.manifest):
        raise StorageError("the manifest lies inside the output's images/ folder")
    probe = storage.join(resume.runs_dir(out), f".preflight-{run_id}")
    try:
        storage.write_bytes(probe, b"ok", cfg.storage)
        fs, path = storage.get_fs(probe, cfg.storage)
        fs.rm(path)
    except OSError as e:
        raise StorageError(f"cannot write to output {out!r}: {type(e).__name__}: {e}") from None
    resolved = weights.resolve_all(cfg)
    hashes = {name: r.sha256 for name, r in resolved.items()}
    return Preflight(manifest, resolved, cfg.fingerprint(hashes), any(r.untrained for r in resolved.values()))


def _software(cfg: RunConfig, pre: Preflight) -> str:
    """What restored the faces, for the derivative's metadata: tool, model and its weights' hash."""
    w = pre.resolved[cfg.restore.model]
    return (f"archive-restore {__version__}; {cfg.restore.model} "
            + ("UNTRAINED" if w.untrained else f"sha256:{w.sha256[:16]}"))


def _versions() -> dict[str, str]:
    import ray
    import torch

    import facexlib

    return {"archive_restore": __version__, "python": platform.python_version(), "ray": ray.__version__,
            "torch": torch.__version__, "facexlib": getattr(facexlib, "__version__", "?"), "pyarrow": pa.__version__}


def _init_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local": always a fresh local instance. A bare ray.init() would follow /tmp/ray/ray_current_cluster,
        # which a head that died without `ray stop` leaves behind, and fail to connect to it.
        ray.init(address="local", num_cpus=cfg.cluster.num_cpus, num_gpus=cfg.cluster.num_gpus,
                 include_dashboard=False)


def _execute(cfg: RunConfig, pre: Preflight, todo: pa.Table, run_id: str) -> None:
    import ray
    from ray.data import ActorPoolStrategy

    from .stages import DecodeDetect, Restore, compose_batch

    _init_ray(cfg)
    rp = plan_resources(ray.cluster_resources(), cfg.cluster)
    log.info("resources: %s", rp)
    per_block = max(cfg.cluster.rows_per_block, math.ceil(todo.num_rows / MAX_BLOCKS))
    # Pre-split in the driver: small manifests would otherwise be one block feeding one actor.
    blocks = [todo.slice(i, per_block) for i in range(0, todo.num_rows, per_block)]
    ds = ray.data.from_arrow(blocks)
    passthrough = pre.manifest.passthrough
    ds = ds.map_batches(
        DecodeDetect, fn_constructor_kwargs={"cfg": cfg, "root": pre.manifest.root, "passthrough": passthrough},
        batch_size=cfg.cluster.decode_batch_size, batch_format="pyarrow", num_cpus=rp.decode_cpus,
        compute=ActorPoolStrategy(min_size=rp.decode_min, max_size=rp.decode_max))
    ds = ds.map_batches(
        Restore, fn_constructor_kwargs={"cfg": cfg, "passthrough": passthrough},
        batch_size=cfg.cluster.restore_batch_size, batch_format="pyarrow", num_gpus=rp.restore_gpus,
        num_cpus=rp.restore_cpus, compute=ActorPoolStrategy(size=rp.restore_actors))
    ds = ds.map_batches(
        compose_batch, fn_kwargs={"cfg": cfg, "run_id": run_id, "fingerprint": pre.fingerprint,
                                  "untrained": pre.untrained, "passthrough": passthrough,
                                  "software": _software(cfg, pre)},
        batch_size=cfg.cluster.compose_batch_size, batch_format="pyarrow", num_cpus=rp.compose_cpus)
    fs, path = storage.get_arrow_fs(resume.results_dir(cfg.output.root), cfg.storage)
    # The write must ask for exactly what Compose asks for, so Ray fuses the two into one task. A
    # separate write operator wants 1 CPU by default; on a small node whose CPUs are held by the actor
    # pools it is starved until the actors exit, and every result row waits in memory to the very end
    # (measured: all Parquet files of a run appeared in its last 200 ms), so a killed run kept nothing.
    ds.write_parquet(f"{path}/run={run_id}", filesystem=fs, ray_remote_args={"num_cpus": rp.compose_cpus})


def summarize(results: pa.Table, elapsed_s: float) -> dict:
    by_status = count_by_status(results)
    faces = int(pc.sum(results["n_faces"]).as_py() or 0) if results.num_rows else 0
    reused = int(pc.sum(pc.cast(pc.fill_null(results["detect_reused"], False), pa.int64())).as_py() or 0) \
        if results.num_rows and "detect_reused" in results.column_names else 0
    n = results.num_rows
    return {"images": n, "by_status": by_status, "faces": faces, "detections_reused": reused,
            "elapsed_s": round(elapsed_s, 2),
            "images_per_s": round(n / elapsed_s, 3) if elapsed_s > 0 else None,
            "faces_per_s": round(faces / elapsed_s, 3) if elapsed_s > 0 else None}


def run(cfg: RunConfig) -> dict:
    """Run (or resume) the job described by ``cfg``; return the run record."""
    run_id = resume.new_run_id()
    t0 = time.perf_counter()
    pre = preflight(cfg, run_id)
    out = storage.normalize(cfg.output.root)
    if pre.untrained:
        log.warning("UNTRAINED RUN %s: some model files were replaced by seeded random weights; derivatives are "
                    "NOT restorations and every result row says untrained=true", run_id)
    resume.wait_for_other_runs(out, cfg.storage, run_id, cfg.cluster.heartbeat_s)
    ledger = resume.load_results(out, cfg.storage, columns=resume.LEDGER_COLUMNS)
    plan = resume.plan(pre.manifest.table, ledger, pre.fingerprint, cfg.reprocess)
    record = {
        "run_id": run_id, "state": "running", "started_at": datetime.now(timezone.utc).isoformat(),
        "fingerprint": pre.fingerprint, "untrained": pre.untrained, "reprocess": cfg.reprocess,
        "manifest": cfg.input.manifest, "input_root": pre.manifest.root, "output": out,
        "manifest_rows": pre.manifest.rows_read, "duplicate_rows": pre.manifest.duplicates,
        "rows_without_uri": pre.manifest.without_uri, "plan": plan.counts,
        "weights": {n: {"file": r.spec.filename, "sha256": r.sha256, "untrained": r.untrained,
                        "licence": r.spec.licence} for n, r in pre.resolved.items()},
        "versions": _versions(), "config": cfg.model_dump(mode="json"),
    }
    log.info("run %s: %d of %d images to process (%s)", run_id, plan.counts["todo"], plan.counts["manifest"],
             plan.counts)
    with resume.Heartbeat(out, record, cfg.storage, cfg.cluster.heartbeat_s):
        try:
            if plan.todo.num_rows:
                todo = plan.todo if cfg.redetect else resume.attach_prior_detections(plan.todo, ledger, out,
                                                                                     cfg.storage)
                _execute(cfg, pre, todo, run_id)
        except BaseException as e:  # Ctrl-C included: the record says how the run ended
            record.update(state="failed", error=f"{type(e).__name__}: {e}",
                          finished_at=datetime.now(timezone.utc).isoformat())
            resume.write_run_record(out, record, cfg.storage)
            raise
        mine = resume.load_results(out, cfg.storage, columns=["status", "n_faces", "detect_reused"], run_id=run_id)
        record.update(state="finished", finished_at=datetime.now(timezone.utc).isoformat(),
                      summary=summarize(mine, time.perf_counter() - t0), results=resume.results_dir(out))
    resume.write_run_record(out, record, cfg.storage)
    log.info("run %s finished: %s", run_id, record["summary"])
    return record


