"""Resume and re-processing: what a run still has to do, and under which output keys.

The ledger (``ledger.py``) holds every run's rows; the latest row per image is current. Planning is
column projection plus Arrow joins, with no Python loop over rows, so a 10-million-image archive plans
in seconds. An image whose latest results are ``max_attempts`` retryable errors under the current
fingerprint is not tried again unless asked (``--reprocess failed``): a deterministic failure must not
be retried forever.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from . import keys, review, storage
from .config import OutputConfig, StorageConfig
from .ledger import LEDGER_COLUMNS, load_results
from .schema import ERROR_STATUSES, FINAL_STATUSES, Status

log = logging.getLogger(__name__)

# Errors that another attempt may mend (storage, GPU, a detector hiccup); the others are final.
RETRYABLE = frozenset(ERROR_STATUSES - FINAL_STATUSES)
PLAN_COLUMNS = LEDGER_COLUMNS + ["output_uri", "access_uri", "output_name", "access_name"]


def load_for_planning(output_root: str, cfg: StorageConfig, torn: list[str] | None = None) -> pa.Table:
    """The ledger as planning needs it: the ledger columns plus the names of the files each row wrote
    (``output_name``, ``access_name``; for rows of earlier versions taken from their URIs). The URIs
    themselves are dropped file by file as they are read, so a large ledger costs its names only."""
    return load_results(output_root, cfg, columns=PLAN_COLUMNS, torn=torn,
                        transform=lambda t: names_only(t, output_root))


def names_only(t: pa.Table, output_root: str) -> pa.Table:
    """``t`` with ``output_name`` and ``access_name`` (from the URIs for rows of earlier versions) instead of
    ``output_uri`` and ``access_uri``."""
    for name_col, uri_col, ns in (("output_name", "output_uri", "images"), ("access_name", "access_uri", "access")):
        names = pc.cast(t[name_col], pa.string()) if name_col in t.column_names else \
            pa.nulls(t.num_rows, pa.string())
        if uri_col in t.column_names:
            prefix = storage.join(output_root, ns) + "/"
            uris = pc.cast(t[uri_col], pa.string())
            names = pc.coalesce(names, pc.if_else(pc.fill_null(pc.starts_with(uris, prefix), False),
                                                  pc.utf8_slice_codeunits(uris, len(prefix)),
                                                  pa.scalar(None, pa.string())))
            t = t.drop_columns([uri_col])
        t = t.drop_columns([c for c in (name_col,) if c in t.column_names]).append_column(name_col, names)
    return t


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


def join_keeping_order(left: pa.Table, right: pa.Table, join_type: str = "left outer") -> pa.Table:
    """``left`` joined with ``right`` on ``image_id``, in ``left``'s row order: Arrow's hash join does not keep
    order, and manifest order keeps runs reproducible and logs readable."""
    order = left.append_column("_o", pa.array(range(left.num_rows), pa.int64()))
    return order.join(right, "image_id", join_type=join_type).sort_by("_o").drop_columns(["_o"])


def _is_in(values, statuses) -> pa.ChunkedArray:
    return pc.is_in(values, value_set=pa.array(sorted(s.value for s in statuses)))


def plan(manifest: pa.Table, results: pa.Table, fingerprint: str, mode: str, max_attempts: int | None = None) -> Plan:
    """Which manifest rows to process now.

    missing: images never completed (no row with a final status), incl. passing failures (read/write errors)
    outdated: missing + images whose latest completed result has another fingerprint
    failed: missing + images whose latest row is an error
    all: every image
    In ``missing`` and ``outdated``, images that have failed ``max_attempts`` times with retryable errors under
    this fingerprint, and never completed since, are left out (``gave_up``).
    """
    ids = manifest.select(["image_id"])
    results = results.select([c for c in LEDGER_COLUMNS if c in results.column_names])  # sorts move less
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
    gave_up = _gave_up(results, fingerprint, max_attempts, current)
    counts["gave_up"] = known(gave_up)
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
    if mode in ("missing", "outdated") and gave_up.num_rows:
        done = pa.concat_tables([done.select(["image_id"]).cast(pa.schema([("image_id", pa.string())])),
                                 gave_up.select(["image_id"]).cast(pa.schema([("image_id", pa.string())]))])
    todo = join_keeping_order(manifest, done, "left anti") if done.num_rows else manifest
    counts["todo"] = todo.num_rows
    counts["skipped"] = manifest.num_rows - todo.num_rows
    return Plan(todo, counts)


def _gave_up(results: pa.Table, fingerprint: str, max_attempts: int | None, current: pa.Table) -> pa.Table:
    """Images with at least ``max_attempts`` retryable errors under ``fingerprint`` and no current result."""
    empty = pa.table({"image_id": pa.array([], pa.string())})
    if not max_attempts or not results.num_rows:
        return empty
    errs = results.filter(pc.and_(pc.equal(results["fingerprint"], fingerprint), _is_in(results["status"], RETRYABLE)))
    if not errs.num_rows:
        return empty
    n = errs.group_by("image_id").aggregate([("image_id", "count")])
    out = n.filter(pc.greater_equal(n["image_id_count"], max_attempts)).select(["image_id"])
    if current.num_rows and out.num_rows:
        out = out.join(current.select(["image_id"]), "image_id", join_type="left anti")
    return out


PRIOR_COLUMNS = ["image_id", "status", "finished_at", "src_sha256", "detect_fingerprint", "faces", "faces_skipped"]


def attach_prior(todo: pa.Table, ledger: pa.Table, output_root: str, cfg: StorageConfig) -> pa.Table:
    """Add what an image's latest completed result knows to the images about to be processed again:
    ``prior_sha256``, ``prior_detect_fp``, ``prior_faces_json`` (its faces) and ``prior_rejected_json``
    (the boxes of faces a curator rejected, see review.py).

    DecodeDetect reuses the faces when the image's bytes and the detector are unchanged, skipping the most
    expensive CPU step when an archive is re-processed for new restoration weights or settings, and keeps
    rejected faces original. Only the images about to be processed are looked up, so a plain resume costs
    nothing here.
    """
    if not todo.num_rows or not ledger.num_rows:
        return todo
    seen = pc.is_in(todo["image_id"], value_set=ledger["image_id"].combine_chunks().unique())
    if not pc.any(seen).as_py():
        return todo
    wanted = todo["image_id"].filter(seen).combine_chunks()
    prior = load_results(output_root, cfg, columns=PRIOR_COLUMNS,
                         transform=lambda t: t.filter(pc.is_in(t["image_id"], value_set=wanted)))
    if "detect_fingerprint" not in prior.column_names:
        return todo
    keep = pc.and_(pc.and_(_is_in(prior["status"], {Status.OK, Status.NO_FACE}),
                           pc.is_valid(prior["detect_fingerprint"])),
                   pc.is_in(prior["image_id"], value_set=todo["image_id"].filter(seen).combine_chunks()))
    prior = latest_rows(prior.filter(keep))
    if not prior.num_rows:
        return todo
    faces = prior["faces"].to_pylist()
    skipped = prior["faces_skipped"].to_pylist() if "faces_skipped" in prior.column_names else [0] * prior.num_rows
    faces_json = [json.dumps({"faces": [{k: f[k] for k in ("bbox", "score", "landmarks")} for f in fs or []],
                              "skipped": sk or 0}) for fs, sk in zip(faces, skipped)]
    lookup = pa.table({"image_id": prior["image_id"], "prior_sha256": prior["src_sha256"],
                       "prior_detect_fp": prior["detect_fingerprint"],
                       "prior_faces_json": pa.array(faces_json, pa.string()),
                       "prior_rejected_json": pa.array([review.rejected_boxes(fs) for fs in faces], pa.string())})
    return join_keeping_order(todo, lookup)


def claims(results: pa.Table) -> pa.Table:
    """(image_id, ns, name) of every file that any result row says it wrote below images/ or access/ (from
    ``load_for_planning``): an image keeps every name it was ever given, not only its latest one, so that
    history rows stay true."""
    parts = []
    for name_col, ns in (("output_name", "images"), ("access_name", "access")):
        if name_col not in results.column_names:
            continue
        names = pc.cast(results[name_col], pa.string())
        t = pa.table({"image_id": pc.cast(results["image_id"], pa.string()), "name": names}).filter(pc.is_valid(names))
        parts.append(_with_ns(t.group_by(["image_id", "name"]).aggregate([]), ns))
    if not parts:
        return pa.table({"image_id": pa.array([], pa.string()), "ns": pa.array([], pa.string()),
                         "name": pa.array([], pa.string())})
    return pa.concat_tables(parts)


def _with_ns(t: pa.Table, ns: str) -> pa.Table:
    return pa.table({"image_id": t["image_id"], "ns": pa.array([ns] * t.num_rows, pa.string()), "name": t["name"]})


def assign_keys(manifest: pa.Table, root: str, output: OutputConfig, held: pa.Table | None) -> pa.Table:
    """``manifest`` with ``output_key`` (unique across the manifest and earlier results) and ``key_error``
    (why an image cannot be given a unique name; practically always null). See ``keys.assign``."""
    k, err = keys.assign(manifest["image_id"], manifest["uri"], root, output.format, output.access_copy, held)
    out = manifest.drop_columns([c for c in ("output_key", "key_error") if c in manifest.column_names])
    return out.append_column("output_key", k).append_column("key_error", err)
