"""Resume and re-processing: the results ledger, the run record, and what a run still has to do.

The ledger is ``<output>/_results/run=<run_id>/*.parquet``: every run appends its own rows, so the
history stays; the latest row per image is current. Planning is column projection plus Arrow
joins — no Python loop over rows — so a 10-million-image archive plans in seconds.
"""

from __future__ import annotations

import json
import logging
import posixpath
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .config import StorageConfig
from .schema import ERROR_STATUSES, FINAL_STATUSES, Status

log = logging.getLogger(__name__)

LEDGER_COLUMNS = ["image_id", "status", "fingerprint", "finished_at"]


def results_dir(output_root: str) -> str:
    return storage.join(output_root, "_results")


def runs_dir(output_root: str) -> str:
    return storage.join(output_root, "_runs")


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def result_files(output_root: str, cfg: StorageConfig, run_id: str | None = None) -> list[str]:
    where = results_dir(output_root)
    fs, path = storage.get_fs(storage.join(where, f"run={run_id}") if run_id else where, cfg)
    if not fs.exists(path):
        return []
    return sorted(p for p in fs.find(path) if p.endswith(".parquet") and not posixpath.basename(p).startswith("."))


def _read_columns(path: str, fs, columns: list[str] | None) -> pa.Table:
    """Read ``columns``; a file written before a column existed gets it as nulls (after the concat)."""
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except (pa.ArrowInvalid, KeyError):
        if columns is None:
            raise
        present = set(pq.read_schema(path, filesystem=fs).names)
        return pq.read_table(path, filesystem=fs, columns=[c for c in columns if c in present])


def load_results(output_root: str, cfg: StorageConfig, columns: list[str] | None = None,
                 run_id: str | None = None) -> pa.Table:
    """All readable result rows. A file torn by a killed writer is renamed aside (hidden), logged and
    skipped: its images were never recorded as done, so the next run redoes them."""
    fs, _ = storage.get_arrow_fs(output_root, cfg)
    ffs, _ = storage.get_fs(output_root, cfg)
    tables = []
    for path in result_files(output_root, cfg, run_id):
        try:
            tables.append(_read_columns(path, fs, columns))
        except (pa.ArrowInvalid, OSError) as e:
            aside = posixpath.join(posixpath.dirname(path), ".torn-" + posixpath.basename(path))
            log.warning("result file %s is unreadable (%s); moved to %s, its images will be redone", path, e, aside)
            ffs.mv(path, aside)
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in (columns or LEDGER_COLUMNS)})
    return pa.concat_tables(tables, promote_options="permissive")


def latest_rows(results: pa.Table) -> pa.Table:
    """The current row per image: the one finished last."""
    if results.num_rows == 0:
        return results
    idx = pa.array(range(results.num_rows), pa.int64())
    t = results.append_column("_i", idx).sort_by([("image_id", "ascending"), ("finished_at", "descending")])
    first = pc.not_equal(t["image_id"], pa.concat_arrays([pa.array([None], pa.string()),
                                                          t["image_id"].combine_chunks()[:-1].cast(pa.string())]))
    first = pc.fill_null(first, True)
    return t.filter(first).drop_columns(["_i"])


@dataclass
class Plan:
    todo: pa.Table
    counts: dict[str, int]


def _is_in(values, statuses) -> pa.ChunkedArray:
    return pc.is_in(values, value_set=pa.array(sorted(s.value for s in statuses)))


def plan(manifest: pa.Table, results: pa.Table, fingerprint: str, mode: str) -> Plan:
    """Which manifest rows to process now.

    missing: images never completed (no row with a final status), incl. passing failures (read/write errors)
    outdated: missing + images whose latest completed result has another fingerprint
    failed: missing + images whose latest row is an error
    all: every image
    """
    ids = manifest.select(["image_id"])
    final = results.filter(_is_in(results["status"], FINAL_STATUSES)) if results.num_rows else results
    completed = pa.table({"image_id": pc.unique(final["image_id"])}) if final.num_rows else ids.slice(0, 0)
    latest_final = latest_rows(final) if final.num_rows else final
    current = latest_final.filter(pc.equal(latest_final["fingerprint"], fingerprint)) if final.num_rows else final
    latest = latest_rows(results) if results.num_rows else results
    failed = latest.filter(_is_in(latest["status"], ERROR_STATUSES)) if results.num_rows else results

    def known(t):
        return ids.join(t.select(["image_id"]), "image_id", join_type="left semi").num_rows if t.num_rows else 0

    counts = {
        "manifest": manifest.num_rows,
        "completed": known(completed),
        "current": known(current),
        "outdated": known(completed) - known(current),
        "failed": known(failed),
    }
    counts["missing"] = counts["manifest"] - counts["completed"]
    if mode == "all":
        done = ids.slice(0, 0)
    elif mode == "missing":
        done = completed
    elif mode == "outdated":
        done = current.select(["image_id"])
    elif mode == "failed":
        done = completed.join(failed.select(["image_id"]), "image_id", join_type="left anti")
    else:
        raise ValueError(f"unknown reprocess mode {mode!r}")
    todo = manifest.join(done, "image_id", join_type="left anti") if done.num_rows else manifest
    # Arrow's hash join does not keep order; manifest order keeps runs reproducible and logs readable.
    if todo is not manifest:
        order = manifest.select(["image_id"]).append_column("_o", pa.array(range(manifest.num_rows), pa.int64()))
        todo = todo.join(order, "image_id").sort_by("_o").drop_columns(["_o"])
    counts["todo"] = todo.num_rows
    counts["skipped"] = manifest.num_rows - todo.num_rows
    return Plan(todo, counts)


PRIOR_COLUMNS = ["image_id", "status", "finished_at", "src_sha256", "detect_fingerprint", "faces", "faces_skipped"]


def attach_prior_detections(todo: pa.Table, ledger: pa.Table, output_root: str, cfg: StorageConfig) -> pa.Table:
    """Add ``prior_sha256``, ``prior_detect_fp``, ``prior_faces_json`` to images that were detected before.

    DecodeDetect reuses them when the image's bytes and the detector are unchanged, skipping the most
    expensive CPU step when an archive is re-processed for new restoration weights or settings. Only
    the images about to be processed are looked up, so a plain resume costs nothing here.
    """
    if not todo.num_rows or not ledger.num_rows:
        return todo
    seen = pc.is_in(todo["image_id"], value_set=ledger["image_id"].combine_chunks().unique())
    if not pc.any(seen).as_py():
        return todo
    prior = load_results(output_root, cfg, columns=PRIOR_COLUMNS)
    if "detect_fingerprint" not in prior.column_names:
        return todo
    keep = pc.and_(pc.and_(_is_in(prior["status"], {Status.OK, Status.NO_FACE}),
                           pc.is_valid(prior["detect_fingerprint"])),
                   pc.is_in(prior["image_id"], value_set=todo["image_id"].filter(seen).combine_chunks()))
    prior = latest_rows(prior.filter(keep))
    if not prior.num_rows:
        return todo
    faces_json = [json.dumps({"faces": [{k: f[k] for k in ("bbox", "score", "landmarks")} for f in fs or []],
                              "skipped": skipped or 0})
                  for fs, skipped in zip(prior["faces"].to_pylist(),
                                         prior["faces_skipped"].to_pylist() if "faces_skipped" in prior.column_names
                                         else [0] * prior.num_rows)]
    lookup = pa.table({"image_id": prior["image_id"], "prior_sha256": prior["src_sha256"],
                       "prior_detect_fp": prior["detect_fingerprint"],
                       "prior_faces_json": pa.array(faces_json, pa.string())})
    order = todo.append_column("_o", pa.array(range(todo.num_rows), pa.int64()))
    return order.join(lookup, "image_id", join_type="left outer").sort_by("_o").drop_columns(["_o"])


def write_run_record(output_root: str, record: dict, cfg: StorageConfig) -> str:
    uri = storage.join(runs_dir(output_root), f"{record['run_id']}.json")
    storage.write_bytes(uri, json.dumps(record, indent=2, default=str).encode(), cfg)
    return uri


class Heartbeat:
    """Keeps ``record['heartbeat_at']`` fresh in ``_runs/<run_id>.json`` while a run is alive."""

    def __init__(self, output_root: str, record: dict, cfg: StorageConfig, every_s: float):
        self.output_root, self.record, self.cfg, self.every_s = output_root, record, cfg, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="run-heartbeat", daemon=True)

    def beat(self) -> None:
        self.record["heartbeat_at"] = datetime.now(timezone.utc).isoformat()
        write_run_record(self.output_root, self.record, self.cfg)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.beat()
            except OSError as e:  # a storage hiccup must not kill the run; the next beat retries
                log.warning("heartbeat write failed: %s", e)

    def __enter__(self) -> "Heartbeat":
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _age_s(record: dict) -> float:
    at = record.get("heartbeat_at") or record.get("started_at")
    return (datetime.now(timezone.utc) - datetime.fromisoformat(at)).total_seconds() if at else float("inf")


def wait_for_other_runs(output_root: str, cfg: StorageConfig, run_id: str, heartbeat_s: float) -> None:
    """Return once no other run on this output is alive; raise if one is.

    A run killed without notice leaves its record in state ``running``; tasks it had in flight may
    still write results for a moment. Waiting until its heartbeat is ``3 * heartbeat_s`` old means
    they are gone before we plan, so nothing is done twice. A heartbeat that moves while we wait is
    a live run: two runs on one output would duplicate work, so that is an error.
    """
    stale = 3 * heartbeat_s
    for r in read_run_records(output_root, cfg):
        if r.get("state") != "running" or r.get("run_id") == run_id or _age_s(r) >= stale:
            continue
        seen = r.get("heartbeat_at")
        wait = stale - _age_s(r) + 0.5
        log.warning("run %s on this output was alive %.0f s ago; waiting %.0f s for it to be stale",
                    r["run_id"], _age_s(r), wait)
        time.sleep(max(0.0, wait))
        now = next((x for x in read_run_records(output_root, cfg) if x.get("run_id") == r["run_id"]), r)
        if now.get("state") == "running" and now.get("heartbeat_at") != seen:
            from .errors import StorageError
            raise StorageError(f"run {r['run_id']} is still running on this output (heartbeat {_age_s(now):.0f} s "
                               "ago); wait for it to finish or stop it first")


def read_run_records(output_root: str, cfg: StorageConfig) -> list[dict]:
    fs, path = storage.get_fs(runs_dir(output_root), cfg)
    if not fs.exists(path):
        return []
    out = []
    for p in sorted(fs.glob(posixpath.join(path, "*.json"))):
        with fs.open(p, "rb") as f:
            out.append(json.loads(f.read()))
    return out
