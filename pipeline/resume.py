"""Resume and re-processing: what a run still has to do, and under which output keys.

The ledger (``ledger.py``) holds every run's rows; the latest row per image is current. Planning is
column projection plus Arrow joins, with no Python loop over rows, so a 10-million-image archive plans
in seconds. An image whose latest results are ``max_attempts`` retryable errors under the current
fingerprint is not tried again unless asked (``--reprocess failed``): a deterministic failure must not
be retried forever.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import keys, review, storage
from .config import OutputConfig, StorageConfig
from .ledger import LEDGER_COLUMNS, load_results
from .schema import ERROR_STATUSES, FINAL_STATUSES, Status

log = logging.getLogger(__name__)

# Errors that another attempt may mend (storage, GPU, a detector hiccup); the others are final.
RETRYABLE = frozenset(ERROR_STATUSES - FINAL_STATUSES)
PLAN_COLUMNS = LEDGER_COLUMNS + ["output_uri", "access_uri", "output_name", "access_name", "access_spec"]


def load_for_planning(output_root: str, cfg: StorageConfig, torn: list[str] | None = None) -> pa.Table:
    """The ledger as planning needs it: the ledger columns plus the names of the files each row wrote
    (``output_name``, ``access_name``; for rows of earlier versions taken from their URIs). The URIs
    themselves are dropped file by file as they are read, so a large ledger costs its names only."""
    return load_results(output_root, cfg, columns=PLAN_COLUMNS, torn=torn,
                        transform=lambda t: _few_values(names_only(t, output_root)), source=True)


def _few_values(t: pa.Table) -> pa.Table:
    """``status`` and ``fingerprint`` dictionary-encoded: a handful of values over millions of rows (~150 MB
    less for a 10 M-row ledger; Arrow's kernels take either)."""
    for name in ("status", "fingerprint"):
        if name in t.column_names and not pa.types.is_dictionary(t.schema.field(name).type):
            t = t.set_column(t.column_names.index(name), name, pc.dictionary_encode(t[name]))
    return t


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
    rows: np.ndarray | None = None  # the todo rows' positions in the manifest; None: every row
    # Images not to process whose latest completed row lacks an access copy the settings now ask for (or has
    # one made with other access settings): image_id, the ledger file holding that row (``_source``) and the
    # image's position in the manifest (``_row``).
    derive: pa.Table | None = None

    def of_todo(self, column):
        """A column over the whole manifest, cut to the todo rows (in their order)."""
        return column if self.rows is None else pc.take(column, pa.array(self.rows))


def _is_in(values, statuses) -> pa.ChunkedArray:
    return pc.is_in(values, value_set=pa.array(sorted(s.value for s in statuses)))


MODES = ("missing", "outdated", "failed", "all")


@dataclass(frozen=True)
class Wants:
    """The files that settings outside the fingerprint ask for (``config._ADDS_FILES``)."""
    copy_no_face: bool = False
    access_spec: str | None = None  # OutputConfig.access_spec: None when no access copies are wanted
    # Rows made before access_spec was recorded carry a fingerprint that hashed the access settings: by
    # fingerprint, the spec their access copies were made with (see job._accepted). Unknown: made again.
    legacy_specs: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def of(cls, output: OutputConfig, legacy_specs: dict[str, str | None] | None = None) -> "Wants":
        return cls(output.copy_no_face, output.access_spec, dict(legacy_specs or {}))


def plan(manifest: pa.Table, results: pa.Table, fingerprint: str | list[str], mode: str,
         max_attempts: int | None = None, wants: Wants | None = None) -> Plan:
    """Which manifest rows to process now.

    missing: images never completed (no row with a final status), incl. passing failures (read/write errors)
    outdated: missing + images whose latest completed result has another fingerprint
    failed: missing + images whose latest row is an error
    all: every image
    In ``missing`` and ``outdated``, images that have failed ``max_attempts`` times with retryable errors under
    this fingerprint, and never completed since, are left out (``gave_up``). ``fingerprint``: the current
    one, or a list of those that count as current (``RunConfig.accepted_fingerprints``).

    ``wants``: files the settings ask for that do not need GFP-GAN. A no-face image whose latest completed
    row wrote no copy is processed again when ``copy_no_face`` is set (its faces, none, are reused: no
    detection, no restoration); an image left alone whose latest completed row is ``ok`` without an access
    copy of ``access_spec`` goes to ``Plan.derive`` (its access copy is made from its derivative).

    Each ledger row is mapped to its image's position in the manifest once (one hash of the manifest's ids),
    and the rest is numpy over integers: a 10-million-image plan holds a few arrays of 10 M numbers rather
    than sorted copies of the ledger. Rows of images not in the manifest do not count. Among rows of one
    image with the same ``finished_at``, the first read is the latest (as in ``latest_rows``).
    """
    if mode not in MODES:
        raise ValueError(f"unknown reprocess mode {mode!r}")
    n = manifest.num_rows
    completed = np.zeros(n, dtype=bool)
    current = np.zeros(n, dtype=bool)
    failed = np.zeros(n, dtype=bool)
    gave_up = np.zeros(n, dtype=bool)
    copy = np.zeros(n, dtype=bool)    # no-face images to copy (wants.copy_no_face)
    access = np.zeros(n, dtype=bool)  # images whose access copy is to be made from the derivative
    access_row = np.zeros(n, dtype=np.int64)  # their latest completed row in ``results``
    if results.num_rows and n:
        code = pc.index_in(results["image_id"], value_set=manifest["image_id"])
        mine = pc.is_valid(code)
        code = pc.filter(code, mine).to_numpy(zero_copy_only=False).astype(np.int64)
        status = pc.filter(results["status"], mine)
        finished = pc.cast(pc.filter(results["finished_at"], mine), pa.timestamp("ms", tz="UTC")).cast(pa.int64())
        finished = pc.fill_null(finished, np.iinfo(np.int64).min + 1).to_numpy()  # null: the oldest (negated below)
        accepted = pa.array([fingerprint] if isinstance(fingerprint, str) else list(fingerprint), pa.string())
        same_fp = pc.fill_null(pc.is_in(pc.filter(results["fingerprint"], mine), value_set=accepted), False)
        same_fp = same_fp.to_numpy(zero_copy_only=False)

        def flag(statuses) -> np.ndarray:
            return pc.fill_null(_is_in(status, statuses), False).to_numpy(zero_copy_only=False)

        is_final, is_error = flag(FINAL_STATUSES), flag(ERROR_STATUSES)
        order = np.lexsort((-finished, code))  # by image, newest first; stable, so ties keep reading order

        def newest(rows: np.ndarray) -> np.ndarray:
            """Of ``rows`` (positions in ``order``'s order), the first of each image."""
            c = code[rows]
            return rows[np.r_[True, c[1:] != c[:-1]]] if len(rows) else rows

        latest = newest(order)
        failed[code[latest]] = is_error[latest]
        latest_final = newest(order[is_final[order]])
        completed[code[latest_final]] = True
        current[code[latest_final]] = same_fp[latest_final]
        if max_attempts:
            tries = np.bincount(code[same_fp & flag(RETRYABLE)], minlength=n)
            gave_up = (tries >= max_attempts) & ~current
        if wants is not None and (wants.copy_no_face or wants.access_spec):
            lf = latest_final

            def column(name: str) -> pa.ChunkedArray | None:
                return pc.filter(results[name], mine) if name in results.column_names else None

            def valid(name: str) -> np.ndarray:
                col = column(name)
                return np.zeros(len(lf), bool) if col is None else \
                    pc.is_valid(col).to_numpy(zero_copy_only=False)[lf]

            wrote = valid("output_name")
            if wants.copy_no_face:  # current ones only: an outdated one waits for --reprocess outdated
                copy[code[lf[flag({Status.NO_FACE})[lf] & ~wrote & same_fp[lf]]]] = True
                if max_attempts:  # a copy that keeps failing (its master gone) is not tried forever
                    since = np.full(n, np.iinfo(np.int64).min)
                    since[code[lf]] = finished[lf]  # errors before the no-face result do not count
                    failing = same_fp & flag(RETRYABLE) & (finished > since[code])
                    copy &= np.bincount(code[failing], minlength=n) < max_attempts
            if wants.access_spec:
                spec = column("access_spec")
                spec = pa.nulls(int(pc.sum(mine).as_py()), pa.string()) if spec is None else pc.cast(spec, pa.string())
                if wants.legacy_specs:  # rows from before specs were recorded: their fingerprint's spec
                    known = pa.array(list(wants.legacy_specs), pa.string())
                    by_fp = pc.take(pa.array(list(wants.legacy_specs.values()), pa.string()),
                                    pc.index_in(pc.cast(column("fingerprint"), pa.string()), value_set=known))
                    spec = pc.coalesce(spec, by_fp)
                other = pc.fill_null(pc.not_equal(spec, wants.access_spec), True).to_numpy(zero_copy_only=False)[lf]
                need = flag({Status.OK})[lf] & wrote & (~valid("access_name") | other)
                access[code[lf[need]]] = True
                access_row[code[lf[need]]] = np.flatnonzero(mine.to_numpy(zero_copy_only=False))[lf[need]]
    counts = {"manifest": n, "completed": int(completed.sum()), "current": int(current.sum())}
    counts["outdated"] = counts["completed"] - counts["current"]
    counts["failed"] = int(failed.sum())
    counts["missing"] = n - counts["completed"]
    counts["gave_up"] = int(gave_up.sum())
    done = {"all": np.zeros(n, dtype=bool), "missing": completed, "outdated": current,
            "failed": completed & ~failed}[mode]
    if mode in ("missing", "outdated"):
        done = done | gave_up
    done = done & ~copy
    rows = np.flatnonzero(~done) if done.any() else None
    todo = manifest.take(pa.array(rows)) if rows is not None else manifest
    counts["todo"] = todo.num_rows
    counts["skipped"] = n - todo.num_rows
    derive = None
    access &= done & ~failed  # a later error stays the image's latest row (--reprocess failed sees it)
    if access.any():
        at, positions = pa.array(access_row[access]), np.flatnonzero(access)
        derive = pa.table({"image_id": manifest["image_id"].take(pa.array(positions)),
                           "_source": results["_source"].take(at) if "_source" in results.column_names
                           else pa.nulls(len(at), pa.string()), "_row": pa.array(positions, pa.int64())})
    if wants is not None and (wants.copy_no_face or wants.access_spec):
        counts["copy_no_face"] = int(copy.sum())
        counts["derive"] = 0 if derive is None else derive.num_rows
    return Plan(todo, counts, rows, derive)


PRIOR_COLUMNS = ["image_id", "status", "finished_at", "src_sha256", "detect_fingerprint", "faces", "faces_skipped"]


def attach_prior(todo: pa.Table, ledger: pa.Table, output_root: str, cfg: StorageConfig) -> pa.Table:
    """Add what an image's latest completed result knows to the images about to be processed again:
    ``prior_sha256``, ``prior_detect_fp``, ``prior_faces_json`` (its faces) and ``prior_rejected_json``
    (the boxes of faces a curator rejected, see review.py).

    DecodeDetect reuses the faces when the image's bytes and the detector are unchanged, skipping the most
    expensive CPU step when an archive is re-processed for new restoration weights or settings, and keeps
    rejected faces original. ``ledger`` is what planning read (``load_for_planning``): only images about to
    be processed that have an ``ok``/``no_face`` row can reuse anything, and only the files holding those
    rows are read (their faces were not read for planning). A resume after failures, whose images never
    completed, reads nothing more.
    """
    if not todo.num_rows or not ledger.num_rows:
        return todo
    done = ledger.filter(_is_in(ledger["status"], {Status.OK, Status.NO_FACE}))
    seen = pc.is_in(todo["image_id"], value_set=done["image_id"].combine_chunks().unique())
    if not pc.any(seen).as_py():
        return todo
    wanted = todo["image_id"].filter(seen).combine_chunks()
    files = None  # a ledger table without sources (built by hand): every file
    if "_source" in done.column_names:
        mine = done.filter(pc.is_in(done["image_id"], value_set=wanted))["_source"]
        files = sorted(set(pc.unique(pc.cast(mine, pa.string())).to_pylist()))
    prior = load_results(output_root, cfg, columns=PRIOR_COLUMNS, files=files,
                         transform=lambda t: t.filter(pc.is_in(t["image_id"], value_set=wanted)))
    if "detect_fingerprint" not in prior.column_names:
        return todo
    keep = pc.and_(pc.and_(_is_in(prior["status"], {Status.OK, Status.NO_FACE}),
                           pc.is_valid(prior["detect_fingerprint"])),
                   pc.is_in(prior["image_id"], value_set=todo["image_id"].filter(seen).combine_chunks()))
    prior = latest_rows(prior.filter(keep))
    if not prior.num_rows:
        return todo
    skipped = prior["faces_skipped"] if "faces_skipped" in prior.column_names else \
        pa.repeat(pa.scalar(0, pa.int32()), prior.num_rows)
    try:
        faces = stored_faces(prior["faces"])
    except TypeError as e:  # not what our writers write (a hand-made ledger): detect again rather than fail
        log.warning("stored faces cannot be reused (%s); detecting again", e)
        return todo
    lookup = {"prior_sha256": prior["src_sha256"], "prior_detect_fp": prior["detect_fingerprint"],
              "prior_faces": faces, "prior_faces_skipped": pc.fill_null(skipped, 0)}
    # By position rather than a hash join: Arrow's join does not carry list columns, and this keeps order.
    at = pc.index_in(todo["image_id"], value_set=prior["image_id"].combine_chunks())
    for name, col in lookup.items():
        todo = todo.append_column(name, pc.take(col, at))
    return todo


_STORED = ("bbox", "score", "landmarks", "review")


def stored_faces(faces: pa.ChunkedArray) -> pa.Array:
    """The stored faces with only what DecodeDetect reuses (``_STORED``), as nested Arrow arrays: no Python
    object per face, so re-processing 10 M images prepares its detections in seconds (the JSON it replaced
    took one ``json.dumps`` per image in the driver)."""
    arr = faces.combine_chunks()
    if not pa.types.is_list(arr.type) or not pa.types.is_struct(arr.type.value_type):
        raise TypeError(f"stored faces have type {arr.type}, expected a list of structs")
    values = arr.values
    have = {values.type.field(i).name: i for i in range(values.type.num_fields)}
    children = values.flatten()  # with the struct's own offset and nulls applied
    kept = [children[have[k]] if k in have else pa.nulls(len(values), pa.string()) for k in _STORED]
    struct = pa.StructArray.from_arrays(kept, names=list(_STORED))
    return pa.ListArray.from_arrays(arr.offsets, struct, mask=arr.is_null())


def claims(results: pa.Table) -> pa.Table:
    """(image_id, ns, name) of every file that any result row says it wrote below images/ or access/ (from
    ``load_for_planning``): an image keeps every name it was ever given, not only its latest one, so that
    history rows stay true. A claim may repeat (one per row that wrote the file): ``keys.assign`` does not
    mind, and a grouped distinct over a 10 M-row ledger held ~2 GB."""
    parts = []
    for name_col, ns in (("output_name", "images"), ("access_name", "access")):
        if name_col not in results.column_names:
            continue
        names = pc.cast(results[name_col], pa.string())
        t = pa.table({"image_id": pc.cast(results["image_id"], pa.string()), "name": names})
        if names.null_count:  # else the ledger's own columns, not a copy of them
            t = t.filter(pc.is_valid(names))
        ns_col = pa.DictionaryArray.from_arrays(np.zeros(t.num_rows, np.int8), [ns])  # 1 byte a row
        parts.append(pa.table({"image_id": t["image_id"], "ns": ns_col, "name": t["name"]}))
    if not parts:
        return pa.table({"image_id": pa.array([], pa.string()), "ns": pa.array([], pa.string()),
                         "name": pa.array([], pa.string())})
    return pa.concat_tables(parts, promote_options="permissive")


def keyed_todo(plan: Plan, keyed: pa.Table) -> pa.Table:
    """The plan's todo rows with their ``output_key`` and ``key_error`` from ``keyed`` (``assign_keys`` over
    the whole manifest: names must be unique across it), taken by position, not by a join on 10 M ids."""
    return plan.todo.append_column("output_key", plan.of_todo(keyed["output_key"])).append_column(
        "key_error", plan.of_todo(keyed["key_error"]))


def assign_keys(manifest: pa.Table, root: str, output: OutputConfig, held: pa.Table | None) -> pa.Table:
    """``manifest`` with ``output_key`` (unique across the manifest and earlier results) and ``key_error``
    (why an image cannot be given a unique name; practically always null). See ``keys.assign``."""
    k, err = keys.assign(manifest["image_id"], manifest["uri"], root, output.format, output.access_copy, held)
    out = manifest.drop_columns([c for c in ("output_key", "key_error") if c in manifest.column_names])
    return out.append_column("output_key", k).append_column("key_error", err)
