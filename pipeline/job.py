"""The only module that imports Ray: preflight, lease, plan, and the Ray Data chain

    from_arrow(todo) -> DecodeDetect (CPU actors) -> Restore (1 actor per GPU)
                     -> Compose + its batch's result file (CPU tasks) -> summaries to the driver
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import math
import os
import platform
import signal
import threading
import time
import warnings
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from . import __version__, compaction, layout, ledger, metadata, provenance, resume, runs, storage, weights
from .config import ClusterConfig, RunConfig
from .errors import ConfigError, Stalled, Stopped, StorageError
from .manifest import Manifest, read_manifest
from .report import count_by_status
from .schema import RESULT_SCHEMA, Status

log = logging.getLogger(__name__)

# _execute passes max_restarts through ray_remote_args: Ray 2.60 has no named parameter for it, and warns
# that the route goes away in 2.64 (Ray is pinned).
warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", module="pipeline.job")

# Ray keeps one object reference per block in the driver; this bounds them for huge manifests.
MAX_BLOCKS = 20_000


@dataclass(frozen=True)
class ResourcePlan:
    device: str               # where Restore restores: "cuda" (actors ask for a GPU each) or "cpu"
    restore_min: int
    restore_max: int | None   # None: no cap, the pool grows as GPU nodes join
    restore_gpus: float       # per Restore actor
    restore_cpus: float
    decode_min: int
    decode_max: int | None    # None: no cap, the pool grows as CPU nodes join
    decode_cpus: float
    compose_cpus: float


def resolve_device(resources: dict[str, float], cfg: RunConfig) -> str:
    """``restore.device`` for this cluster; auto is cuda when a GPU is there or promised (cluster.max_gpus)."""
    device = cfg.restore.device
    if device == "auto":  # a Restore actor needs a whole GPU: fractional GPUs do not count
        device = "cuda" if resources.get("GPU", 0) >= 1 or cfg.cluster.max_gpus else "cpu"
        if device == "cpu":
            log.warning("restoring on CPU: the cluster has no whole GPU at submission. If GPU nodes are starting "
                        "(an autoscaler), run with --set restore.device=cuda to wait for them")
    return device


def resolve_detect_device(cfg: RunConfig, device: str) -> str:
    """``detect.device`` when the Restore actors restore on ``device`` (cuda or cpu): auto is gpu on CUDA,
    where the CPU stages would otherwise run the default ResNet-50 detector at ~6 s of CPU a 12 MP image
    (~810-890 cores to feed an H100; BENCHMARKS.md, thirteenth session), and cpu otherwise, where the device
    path costs more CPU than DecodeDetect."""
    if cfg.detect.device != "auto":
        return cfg.detect.device
    return "gpu" if device == "cuda" else "cpu"


def with_detect_device(cfg: RunConfig, device: str) -> RunConfig:
    """``cfg`` with ``detect.device`` resolved for Restore actors on ``device``: what the stages are given."""
    return cfg.model_copy(update={"detect": cfg.detect.model_copy(
        update={"device": resolve_detect_device(cfg, device)})})


TYPICAL_MAX_PIXELS = 50_000_000


def memory_plan(cfg: RunConfig, device: str) -> dict[str, int]:
    """Bytes declared to Ray per DecodeDetect actor, Restore actor and Compose task, so that a node is packed
    with what fits its memory rather than with one actor per CPU (16 DecodeDetect actors on a 32 GiB node).
    From peaks measured by bench/stage_memory.py; explicit ``cluster.*_memory_gb`` settings win."""
    cc = cfg.cluster
    # Sized for masters up to 50 MP (or input.max_pixels when lower): sizing every actor for the 200 MP
    # guard would leave most of a node's cores idle, and on one node could need more memory than it has.
    # An actor that meets a larger scan uses more than declared; archives of larger scans set the
    # cluster.*_memory_gb settings.
    px = min(cfg.input.max_pixels, TYPICAL_MAX_PIXELS)
    gb = 1e9
    decode = cc.decode_actor_memory_gb or 1.1 + 8 * px / gb
    restore = cc.restore_actor_memory_gb or (3.0 if device == "cuda" else 1.0 + 0.6 * cfg.restore.micro_batch)
    if resolve_detect_device(cfg, device) == "gpu" and not cc.restore_actor_memory_gb:
        # masters arrive compressed (~0.5 GB for the batches in flight); on CPU a detection batch of them
        # is also decoded in host memory, plus one in float32 for its detection copy (not yet measured)
        restore += 0.5 if device == "cuda" else 0.5 + (3 * cfg.detect.gpu_batch + 12) * px / gb
    compose = cc.compose_task_memory_gb or 0.7 + 24 * px / gb
    return {"decode": int(decode * gb), "restore": int(restore * gb), "compose": int(compose * gb)}


def plan_resources(resources: dict[str, float], cfg: RunConfig, elastic: bool) -> ResourcePlan:
    """Size the actor pools.

    On a cluster, a Restore actor per GPU when restoring on CUDA, asking for its GPU and no CPU: a CPU
    reservation could be taken by a CPU stage placed first and leave it pending for good (GPU nodes keep a
    core for it by advertising one CPU fewer). On CPU, one Restore actor with ``restore_actor_cpus``.

    ``elastic`` (a cluster the job joined): pools have a minimum of one and grow as nodes join, without a
    cap unless configured, and nothing needs to be there at submission: Ray Data asks the autoscaler for
    what is pending. Otherwise (a local Ray the job started: a fixed machine) the pools fit the machine's
    ``resources``: on one too small for one of each at the configured sizes, every reservation is scaled
    down together (Ray accepts fractional CPUs) rather than leaving a stage that can never be scheduled,
    which hangs Ray Data instead of failing.
    """
    cc = cfg.cluster
    device = resolve_device(resources, cfg)
    cuda = device == "cuda"
    if cfg.detect.device == "gpu" and not cuda:
        log.warning("detect.device=gpu while restoring on CPU: every JPEG master is decoded and searched for faces "
                    "in the one Restore actor instead of the DecodeDetect actors; set detect.device=cpu")
    dc, cc_cpus = cc.decode_actor_cpus, cc.compose_task_cpus
    if elastic:
        restore_max = cc.max_gpus if cuda else 1
        rc = 0.0 if cuda else cc.restore_actor_cpus
        return ResourcePlan(device, 1, restore_max, 1.0 if cuda else 0.0, rc, 1, cc.decode_actors_max, dc, cc_cpus)
    # One fixed machine: every actor is placed at the start, within the budget below, so the GPU actor can
    # reserve its core (nothing else is scheduled first), and the CPU stages leave it alone.
    rc = cc.restore_actor_cpus
    cpus, gpus = float(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    if cpus <= 0:
        raise ConfigError("Ray reports no CPUs (cluster.num_cpus)")
    if cuda and not gpus:
        raise ConfigError("restore.device=cuda, but Ray reports no whole GPU (cluster.num_gpus; or restore.device="
                          "cpu, or cluster.elastic=true to wait for GPU nodes)")
    actors = max(1, min(gpus, cc.max_gpus or gpus)) if cuda else 1
    need = actors * rc + dc + cc_cpus
    if need > cpus:
        f = cpus / need
        rc, dc, cc_cpus = rc * f, dc * f, cc_cpus * f
    decode_max = max(1, int((cpus - actors * rc - cc_cpus) / dc + 1e-9))
    if cc.decode_actors_max:
        decode_max = min(decode_max, cc.decode_actors_max)

    def down(x: float) -> float:  # rounding down keeps the sum within the machine
        return math.floor(x * 1e4) / 1e4

    return ResourcePlan(device, actors, actors, 1.0 if cuda else 0.0, down(rc), 1, decode_max, down(dc),
                        down(cc_cpus))


@dataclass
class Preflight:
    manifest: Manifest
    resolved: dict[str, weights.Resolved]
    fingerprint: str
    untrained: bool
    signing: provenance.Material | None = None
    hashes: dict[str, str] | None = None  # weights sha256 by name: in the fingerprint, and what workers must load
    accepted: list[str] | None = None  # fingerprints that count as current (RunConfig.accepted_fingerprints)


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
                     signing, hashes, cfg.accepted_fingerprints(hashes))


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


_started_session: str | None = None  # the session folder of the local Ray this process started


def _init_ray(cfg: RunConfig) -> str | None:
    """Connect to (or start) Ray; the session folder of a local Ray started here (also when asked again:
    a run that processes and then derives must see the same Ray as the same machine), else None."""
    global _started_session
    import ray

    if ray.is_initialized():
        node = ray._private.worker._global_node
        session = node.get_session_dir_path() if node is not None else None
        return session if session is not None and session == _started_session else None
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return None
    # "local": always a fresh local instance. A bare ray.init() would follow /tmp/ray/ray_current_cluster,
    # which a head that died without `ray stop` leaves behind, and fail to connect to it.
    ray.init(address="local", num_cpus=cfg.cluster.num_cpus, num_gpus=cfg.cluster.num_gpus,
             include_dashboard=False)
    _started_session = ray._private.worker._global_node.get_session_dir_path()
    return _started_session


class Progress:
    """What the driver learns from each finished Compose batch: counts for the log and the run record."""

    def __init__(self):
        self.by_status: dict[str, int] = {}
        self.by_device: dict[str, int] = {}  # images restored, by what ran GFP-GAN
        self.images = self.faces = self.reused = self.parts = 0

    def add(self, t: pa.Table) -> None:
        self.images += t.num_rows
        self.faces += int(pc.sum(t["n_faces"]).as_py() or 0)
        self.reused += int(pc.sum(pc.cast(pc.fill_null(t["detect_reused"], False), pa.int64())).as_py() or 0)
        self.parts += len(pc.unique(t["part"]))
        for k, v in count_by_status(t).items():
            self.by_status[k] = self.by_status.get(k, 0) + v
        if "restore_device" in t.column_names:
            for d in t["restore_device"].drop_null().to_pylist():
                self.by_device[d] = self.by_device.get(d, 0) + 1

    def summary(self, elapsed_s: float) -> dict:
        return {"images": self.images, "by_status": dict(sorted(self.by_status.items())), "faces": self.faces,
                "detections_reused": self.reused, "restored_on": dict(sorted(self.by_device.items())),
                "result_files": self.parts, "elapsed_s": round(elapsed_s, 2),
                "images_per_s": round(self.images / elapsed_s, 3) if elapsed_s > 0 else None,
                "faces_per_s": round(self.faces / elapsed_s, 3) if elapsed_s > 0 else None}


def _start_ray(cfg: RunConfig, lease: runs.Lease) -> str | None:
    session = _init_ray(cfg)
    _rearm_sigterm()
    if session:  # a killed driver leaves some of its local Ray behind: the next run stops them (runs.py)
        lease.update(ray_session=session)
        lease.renew()
    return session


def _elastic(cfg: RunConfig, session: str | None) -> bool:
    """Size pools for a cluster that grows (``cluster.elastic``; None: unless the job started its own local
    Ray, ``session``)."""
    return cfg.cluster.elastic if cfg.cluster.elastic is not None else session is None


def _accepted(cfg: RunConfig, pre: Preflight, records: list[dict]) -> tuple[list[str], dict[str, str | None]]:
    """The fingerprints that count as current, and for each legacy one the access spec its rows were made
    with. Before the settings that only add files left the fingerprint (``config._ADDS_FILES``) it hashed
    their values: a past run whose settings give today's fingerprint made current results under another
    value, which its record keeps (as today's settings give ``legacy=True``)."""
    accepted, specs = list(pre.accepted or [pre.fingerprint]), {}
    legacy = cfg.fingerprint(pre.hashes or {}, legacy=True)
    if legacy != pre.fingerprint:
        specs[legacy] = cfg.output.access_spec
    today = cfg.unresolved().fingerprint(pre.hashes or {})
    for r in records:
        if r.get("kind", "job") != "job" or not r.get("config") or r.get("fingerprint") in (None, *accepted):
            continue
        try:
            past = RunConfig.model_validate(r["config"])
        except Exception:  # noqa: BLE001 - a record of a version whose settings no longer parse
            continue
        # Today's fingerprint from its settings (both in the form that hashes the precision as written, as
        # that run did), and its own from them with today's weights and code: a run with other weights (or
        # before an OUTPUT_VERSION change) gives another value and stays outdated.
        if past.unresolved().fingerprint(pre.hashes or {}) == today and \
                past.fingerprint(pre.hashes or {}, legacy=True) == r["fingerprint"]:
            if r["fingerprint"] not in accepted:
                accepted.append(r["fingerprint"])
            specs[r["fingerprint"]] = past.output.access_spec
    return accepted, specs


def _derive(cfg: RunConfig, pre: Preflight, derive: pa.Table, manifest: pa.Table, run_id: str,
            lease: runs.Lease, input_folders) -> dict:
    """Access copies for images left alone (``resume.plan``'s ``derive``; see derive.py): their latest ``ok``
    rows read from the ledger files planning found them in, with today's manifest's URI and pass-through
    values (as a processed image gets) and the key planned with today's settings (its access name), then one
    CPU task per batch. Returns the counts and the first reasons for the run record."""
    import ray

    from .derive import derive_and_record

    out = storage.normalize(cfg.output.root)
    wanted = derive["image_id"].combine_chunks()
    files = sorted(set(derive["_source"].drop_null().cast(pa.string()).to_pylist())) or None
    rows = ledger.load_results(out, cfg.storage, files=files, transform=lambda t: t.filter(pc.and_(
        pc.is_in(t["image_id"], value_set=wanted), pc.equal(t["status"], Status.OK.value))))
    rows = resume.latest_rows(rows)
    mine = pc.index_in(rows["image_id"], value_set=wanted)
    at = pc.take(derive["_row"], mine)  # manifest positions
    rows = rows.drop_columns([c for c in rows.column_names if c not in RESULT_SCHEMA.names or c == "uri"])
    for name in ["uri", *pre.manifest.passthrough.names]:
        rows = rows.append_column(name, pc.take(manifest[name], at))
    for name in ("access_key", "key_error"):
        rows = rows.append_column(name, pc.take(derive[name], mine))
    log.info("run %s: making %d access copies from derivatives (no restoration)", run_id, rows.num_rows)
    made, errors = 0, {}
    batches = []
    if rows.num_rows:
        session = _start_ray(cfg, lease)
        elastic = _elastic(cfg, session)
        # A derive task holds what a Compose task does (a derivative's pixels, a copy, their encodings)
        memory = declared_memory(cfg, "cpu", elastic)["compose"]
        cpus = cfg.cluster.compose_task_cpus  # on one fixed machine: never more than it has, or nothing runs
        cpus = cpus if elastic else min(cpus, float(ray.cluster_resources().get("CPU", 1)))
        per_block = max(1, cfg.cluster.compose_batch_size)
        ds = ray.data.from_arrow([rows.slice(i, per_block) for i in range(0, rows.num_rows, per_block)])
        ds = ds.map_batches(derive_and_record, fn_kwargs={
            "cfg": cfg, "run_id": run_id, "fingerprint": pre.fingerprint, "untrained": pre.untrained,
            "passthrough": pre.manifest.passthrough, "software": _software(cfg, pre), "fence": lease.fence(),
            "input_folders": input_folders, "provenance": pre.signing}, batch_size=None, batch_format="pyarrow",
            num_cpus=cpus, memory=memory)
        batches = _consume(ds, cfg.cluster)
    for batch in batches:
        if lease.lost.is_set():
            raise StorageError("this run lost the output's lease (another run may have taken it over); stopping")
        made += batch["error"].null_count
        for i, e in zip(batch["image_id"].to_pylist(), batch["error"].to_pylist()):
            if e is not None:
                errors[i] = e
    missing = len(wanted) - rows.num_rows  # their ok row vanished from the ledger since planning
    if errors or missing:
        log.warning("run %s: %d access copies not made (they are tried again next run), e.g. %s", run_id,
                    len(errors) + missing, next(iter(errors.items()), None))
    return {"access_copies": made, "failed": len(errors) + missing, "errors": dict(list(errors.items())[:20])}


def _execute(cfg: RunConfig, pre: Preflight, todo: pa.Table, run_id: str, lease: runs.Lease, record: dict,
             progress: Progress, t0: float, input_folders) -> None:
    import ray
    from ray.data import ActorPoolStrategy

    from .stages import DecodeDetect, Restore, compose_and_record

    session = _start_ray(cfg, lease)
    resources = ray.cluster_resources()
    elastic = _elastic(cfg, session)
    # The memory of each live node with CPUs: where the CPU stages can run.
    cpu_nodes = [n["Resources"].get("memory", 0) for n in ray.nodes()
                 if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    if not elastic and len(cpu_nodes) > 1:
        log.warning("cluster.elastic=false on a Ray of several nodes: pools are sized as if it were one machine, "
                    "and a stage may find no node with room for its share")
    rp = plan_resources(resources, cfg, elastic=elastic)
    cfg = with_detect_device(cfg, rp.device)  # the stages are given cpu or gpu, never auto
    # The device is known now: results carry the fingerprint of the precision they are restored in (one of
    # those planning accepted): the plan's, or that of the device a row's faces were restored on when it is
    # another (a Restore actor given a GPU that finds no CUDA restores on CPU, in fp32). The record holds
    # them all, as decisions and reports look settings up by fingerprint.
    device_fps = {d: cfg.fingerprint(pre.hashes or {}, device=d) for d in ("cuda", "cpu")}
    pre.fingerprint = device_fps[rp.device]
    record.update(fingerprint=pre.fingerprint, device_fingerprints=device_fps)
    runs.write_record(storage.normalize(cfg.output.root), record, cfg.storage)
    memory = declared_memory(cfg, rp.device, elastic)
    _check_memory(memory, rp, elastic, cpu_nodes)
    log.info("resources: %s; memory per actor/task: %s", rp, memory)
    _log_waiting(resources, rp)
    calls = restore_calls(cfg, rp)
    record["restore_plan"] = {"device": rp.device, "gpus_per_actor": rp.restore_gpus,
                              "actors": [rp.restore_min, rp.restore_max], "memory_bytes": memory,
                              "detect_device": cfg.detect.device,
                              "calls_in_flight": calls}
    per_block = max(cfg.cluster.rows_per_block, math.ceil(todo.num_rows / MAX_BLOCKS))
    # Pre-split in the driver: small manifests would otherwise be one block feeding one actor.
    blocks = [todo.slice(i, per_block) for i in range(0, todo.num_rows, per_block)]
    ds = ray.data.from_arrow(blocks)
    passthrough = pre.manifest.passthrough
    expected = pre.hashes  # workers refuse files other than those preflight checked
    # An actor whose process or node dies is restarted up to cluster.actor_restarts times and its batches
    # retried (Ray Data's default is without end: a lost GPU node then hung the run silently); a Compose
    # task whose worker dies is retried (a retried batch rewrites the same result file). The watchdog in
    # _consume ends a run that stops making progress.
    actor_args = {"max_restarts": cfg.cluster.actor_restarts, "max_task_retries": -1}
    ds = ds.map_batches(
        DecodeDetect, fn_constructor_kwargs={"cfg": cfg, "root": pre.manifest.root, "passthrough": passthrough,
                                             "expected_weights": expected},
        batch_size=cfg.cluster.decode_batch_size, batch_format="pyarrow", num_cpus=rp.decode_cpus,
        memory=memory["decode"], compute=ActorPoolStrategy(min_size=rp.decode_min, max_size=rp.decode_max),
        **actor_args)
    ds = ds.map_batches(
        Restore, fn_constructor_kwargs={"cfg": cfg, "passthrough": passthrough, "expected_weights": expected,
                                        "device": None if rp.device == "cuda" else "cpu", "planned": rp.device,
                                        "calls_in_flight": calls},
        batch_size=cfg.cluster.restore_batch_size, batch_format="pyarrow", num_gpus=rp.restore_gpus,
        num_cpus=rp.restore_cpus, memory=memory["restore"],
        compute=ActorPoolStrategy(min_size=rp.restore_min, max_size=rp.restore_max,
                                  max_concurrent_calls_per_actor=calls, enable_true_multi_threading=calls > 1),
        **actor_args)
    ds = ds.map_batches(
        compose_and_record, fn_kwargs={"cfg": cfg, "run_id": run_id, "fingerprint": pre.fingerprint,
                                       "untrained": pre.untrained, "passthrough": passthrough,
                                       "software": _software(cfg, pre), "fence": lease.fence(),
                                       "input_folders": input_folders, "provenance": pre.signing,
                                       "device_fingerprints": device_fps},
        batch_size=cfg.cluster.compose_batch_size, batch_format="pyarrow", num_cpus=rp.compose_cpus,
        memory=memory["compose"])
    last = time.monotonic()
    for batch in _consume(ds, cfg.cluster):
        progress.add(batch)
        if lease.lost.is_set():
            raise StorageError("this run lost the output's lease (another run may have taken it over); stopping")
        if time.monotonic() - last >= cfg.cluster.progress_s:
            last = time.monotonic()
            record["progress"] = progress.summary(time.perf_counter() - t0)
            log.info("run %s: %d of %d images done (%s)", run_id, progress.images, todo.num_rows,
                     record["progress"]["by_status"])
            runs.write_record(storage.normalize(cfg.output.root), record, cfg.storage)


def restore_calls(cfg: RunConfig, rp: "ResourcePlan") -> int:
    """Restore calls each actor runs at once (``cluster.restore_calls_in_flight``; None: 3 on a pool of
    fixed size, 1 on one that grows). Ray Data 2.60 asks for another actor when its tasks in flight reach
    1.75 x (calls x actors): with 2 or 3 calls an actor, a GPU node that joined mid-run got none in the
    cluster test (tests/test_cluster.py (c)), so a growing pool keeps one call an actor unless told."""
    if cfg.cluster.restore_calls_in_flight is not None:
        return cfg.cluster.restore_calls_in_flight
    return 3 if rp.restore_min == rp.restore_max else 1


def declared_memory(cfg: RunConfig, device: str, elastic: bool) -> dict[str, int | None]:
    """``memory_plan`` where it is declared: on a cluster, where it decides how many actors and tasks a node
    takes, or when set explicitly; a local Ray the job started is one fixed machine whose pools already
    follow its CPUs (None: nothing declared)."""
    cc = cfg.cluster
    explicit = any(v is not None for v in (cc.decode_actor_memory_gb, cc.restore_actor_memory_gb,
                                            cc.compose_task_memory_gb))
    return memory_plan(cfg, device) if elastic or explicit else {"decode": None, "restore": None, "compose": None}


def _check_memory(memory: dict, rp: ResourcePlan, elastic: bool, nodes: list[float]) -> None:
    """One DecodeDetect actor and one Compose task (and a CPU Restore actor) must fit on a node together, or
    the run cannot move: refused on a fixed machine, said on a cluster (a larger node may still join).
    ``nodes``: the memory of each live node with CPUs."""
    need = (memory["decode"] or 0) + (memory["compose"] or 0) + (0 if rp.restore_gpus else memory["restore"] or 0)
    if not need or not nodes or need <= max(nodes):
        return
    msg = (f"the memory declared for one DecodeDetect actor, one Compose task"
           f"{'' if rp.restore_gpus else ' and the CPU Restore actor'} ({need / 1e9:.1f} GB) is more than any "
           f"node with CPUs offers ({max(nodes) / 1e9:.1f} GB); lower restore.micro_batch or the "
           "cluster.*_memory_gb settings")
    if not elastic:
        raise ConfigError(msg)
    log.warning("%s, or the run waits for a larger node", msg)


def _log_waiting(resources: dict[str, float], rp: ResourcePlan) -> None:
    """Say so when the stages cannot start yet: Ray Data asks the autoscaler for what they need and waits."""
    missing = []
    if resources.get("CPU", 0) < rp.decode_cpus:
        missing.append(f"CPU nodes (DecodeDetect needs {rp.decode_cpus:g} CPU per actor)")
    if rp.restore_gpus and not resources.get("GPU", 0):
        missing.append("GPU nodes (a Restore actor needs 1 GPU)")
    if missing:
        log.warning("waiting for %s: the cluster has none yet; an autoscaler starts them on demand "
                    "(cluster.stall_timeout_s)", " and ".join(missing))


def _consume(ds, cc: ClusterConfig):
    """The dataset's output batches, under Ray Data's no-progress guard set to ``cluster.stall_timeout_s``: a
    run in which no stage takes or hands on a block for that long (no node ever joins; a lost GPU node's
    actor cannot restart anywhere) ends with ``Stalled``. The guard raises inside the iteration, so Ray
    Data shuts its execution down on the way out; by then the actors are released, so what they were
    doing comes from snapshots taken while waiting."""

    from ray.data.exceptions import ExecutionTimeoutError

    ds.context.execution_no_progress_timeout_s = cc.stall_timeout_s
    seen: dict[str, str] = {}
    done = threading.Event()

    def snapshots() -> None:
        while not done.wait(min(30.0, cc.stall_timeout_s / 3)):
            seen["states"] = _actor_states()

    threading.Thread(target=snapshots, name="archive-restore-actor-states", daemon=True).start()
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
    except ExecutionTimeoutError as e:
        stages = "; ".join(line.strip(" -") for line in str(e).splitlines() if line.startswith("  - "))
        raise Stalled(f"no progress for {cc.stall_timeout_s:g} s (cluster.stall_timeout_s); "
                      f"{seen.get('states') or _actor_states()}; stages not finished: {stages or '?'}. "
                      "Run again to resume: finished images are kept") from None
    finally:
        done.set()


def _actor_states() -> str:
    """Which stage actors are not alive, for the stall message (best effort: the state API may be down)."""
    try:
        from ray.util.state import list_actors

        import ray

        job_id = ray.get_runtime_context().get_job_id()  # this run's actors, not another job's on the cluster
        actors = list_actors(filters=[("state", "!=", "ALIVE"), ("state", "!=", "DEAD"), ("job_id", "=", job_id)],
                             limit=1000)
        counts: dict[str, int] = {}
        for a in actors:
            name = str(a.class_name).split("(")[-1].rstrip(")")
            key = f"{name} {a.state}"
            counts[key] = counts.get(key, 0) + 1
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        return f"actor states unavailable ({type(e).__name__})"
    if not counts:
        return "every stage actor is alive (a batch is slow, or Ray Data is backpressured)"
    return "actors not running: " + ", ".join(f"{n} x {k}" for k, n in sorted(counts.items())) + \
        " (RESTARTING or PENDING_CREATION: a lost node, or no node with the resources they need)"


def _fold(out: str, cfg: RunConfig, run_id: str, lease: runs.Lease) -> dict | None:
    """The per-batch result files into a few (compaction.py). The run's work is saved either way, so a
    failure here is a warning and the record's ``ledger_fold``."""
    try:
        return compaction.fold_loose(out, cfg.storage, by=run_id, still_ours=lambda: not lease.lost.is_set())
    except Exception as e:  # noqa: BLE001 - the next run or `archive-restore compact` folds them
        log.warning("the run's result files were not folded (the next run will): %s: %s", type(e).__name__, e)
        return {"error": f"{type(e).__name__}: {e}"}


def _stop(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the record be written
    raise Stopped(f"stopped by {signal.Signals(signum).name}")


_trapping = threading.Event()  # set while a run in the main thread turns SIGTERM into Stopped


@contextlib.contextmanager
def _stop_on_sigterm():
    """SIGTERM becomes ``Stopped`` in the main thread, so a stopped run ends like Ctrl-C: its record says
    ``stopped`` with what it finished (every finished batch is already in the ledger), and it releases the
    output's lease, so the next run starts at once instead of waiting for the lease to lapse. Without it the
    process died mid-statement, its record saying ``running``."""
    if threading.current_thread() is not threading.main_thread():  # e.g. a test's thread: leave signals be
        yield
        return
    previous = signal.signal(signal.SIGTERM, _stop)
    _trapping.set()
    try:
        yield
    finally:
        _trapping.clear()
        signal.signal(signal.SIGTERM, previous)


def _hold_sigterm() -> None:
    if _trapping.is_set() and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _rearm_sigterm() -> None:
    """After ``ray.init``: Ray's core worker installs its own SIGTERM handler in the driver (it logs and
    dies), which replaced ours (found by the SIGTERM test: the process ended by the signal, record
    ``running``)."""
    if _trapping.is_set() and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)


def run(cfg: RunConfig) -> dict:
    """Run (or resume) the job described by ``cfg``; return the run record."""
    with _stop_on_sigterm():
        return _run(cfg)


def _run(cfg: RunConfig) -> dict:
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
        lease.begin(record, cfg.cluster.takeover_grace_s)
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
        accepted, legacy_specs = _accepted(cfg, pre, runs.read_records(out, cfg.storage))
        record["fingerprints"] = accepted
        plan = resume.plan(manifest.table, results, accepted, cfg.reprocess, cfg.max_attempts,
                           resume.Wants.of(cfg.output, legacy_specs))
        record.update(plan=plan.counts, phase="processing")
        runs.write_record(out, record, cfg.storage)
        log.info("run %s: %d of %d images to process (%s)", run_id, plan.counts["todo"], plan.counts["manifest"],
                 plan.counts)
        derive = todo = None
        if plan.todo.num_rows or plan.derive is not None:
            keyed = resume.assign_keys(manifest.table, manifest.root, cfg.output, resume.claims(results))
            todo = resume.keyed_todo(plan, keyed) if plan.todo.num_rows else None
            if plan.derive is not None:  # the access name's key, planned with today's settings
                derive = plan.derive.append_column("access_key", pc.take(keyed["output_key"], plan.derive["_row"]))
                derive = derive.append_column("key_error", pc.take(keyed["key_error"], plan.derive["_row"]))
            del keyed  # 10 M keys must not stay in the driver for the whole run
        if todo is not None:
            if not cfg.redetect or cfg.review.carry_decisions:
                todo = resume.attach_prior(todo, results, out, cfg.storage)
            del results
            _execute(cfg, pre, todo, run_id, lease, record, progress, t0, inputs.folders)
        if derive is not None:
            record["derived"] = _derive(cfg, pre, derive, manifest.table, run_id, lease, inputs.folders)
        # Also with nothing to do: a run killed before its fold left one file per batch, which every read
        # of the ledger pays for until some run folds them (one listing when there are none).
        record["ledger_fold"] = _fold(out, cfg, run_id, lease)
        record.update(state="finished", phase="done", finished_at=runs.now_iso(),
                      summary=progress.summary(time.perf_counter() - t0), results=ledger.results_dir(out))
        record.pop("progress", None)
    except BaseException as e:  # Ctrl-C and SIGTERM included: the record says how the run ended
        state = "lost" if lease.lost.is_set() else "stopped" if isinstance(e, KeyboardInterrupt) else "failed"
        record.update(state=state, phase=record.get("phase"),
                      error=f"{type(e).__name__}: {e}", finished_at=runs.now_iso(),
                      summary=progress.summary(time.perf_counter() - t0))
        raise
    finally:
        _hold_sigterm()  # a second SIGTERM must not cut the record or the lease's release short
        lease.end(record)
    log.info("run %s finished: %s", run_id, record["summary"])
    return record
