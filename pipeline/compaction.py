"""Folding the results ledger into few files; ``ledger.py`` says how readers see a fold (all or nothing).

- ``fold_loose`` (at the end of every run that processed images): the files Compose batches wrote, one
  per batch, become files of up to ``ROWS_PER_FILE`` rows. No row changes.
- ``compact`` (``archive-restore compact``): the whole ledger becomes files holding only the rows that
  planning, ``status``, detection reuse and reviews read (``kept_rows``), so a plan over the compacted
  ledger is the plan over the full one; every other row moves to ``_history/``, and is dropped only with
  ``delete_history``.

Both run only under the output's lease (no run writes meanwhile) and end with ``cleanup``, which deletes
what the committed fold made unreachable: the files it replaced, the fold records it superseded, and
the files of folds that never committed.
"""

from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import ledger, resume, runs, storage
from .config import RunConfig, StorageConfig
from .errors import StorageError
from .schema import FINAL_STATUSES, Status

log = logging.getLogger(__name__)

ROWS_PER_FILE = 100_000  # ~10 files per million images; one file is read whole, so this bounds memory
_GROUP = 16  # files read at once: S3 latency hidden, memory bounded
KEEP_COLUMNS = ledger.LEDGER_COLUMNS + ["detect_fingerprint", "review_id", "output_uri", "access_uri",
                                        "output_name", "access_name"]


def kept_rows(t: pa.Table) -> np.ndarray:
    """Which rows of the ledger ``t`` (``KEEP_COLUMNS``, names as ``resume.names_only`` gives them) a
    compacted ledger keeps, as a boolean mask. Per image:

    - the latest row (status, ``--reprocess failed``), and the latest with a final status (``missing``,
      ``outdated``);
    - the latest ``ok``/``no_face`` row with a detection fingerprint (detection reuse, rejected faces);
    - every row with a retryable error (``max_attempts`` counts them, under any fingerprint);
    - the latest row naming each file name it was ever given (``resume.claims``: names stay reserved);
    - the latest row not written by a review and every row after it (a decisions file is checked against
      the derivatives made since the last run, ``decisions._stale``).
    """
    n = t.num_rows
    keep = np.zeros(n, dtype=bool)
    if not n:
        return keep
    order = pc.sort_indices(t, sort_keys=[("image_id", "ascending"), ("finished_at", "descending")]).to_numpy()
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)  # 0 = the image's newest row comes first within its image
    r = t.append_column("_rank", pa.array(rank))

    def first(mask, keys=("image_id",)) -> pa.Table:
        sub = r if mask is None else r.filter(mask)
        return sub.group_by(list(keys)).aggregate([("_rank", "min")])

    def mark(groups: pa.Table) -> None:
        keep[order[groups["_rank_min"].to_numpy()]] = True

    status = r["status"]
    mark(first(None))
    mark(first(pc.is_in(status, value_set=pa.array(sorted(s.value for s in FINAL_STATUSES)))))
    mark(first(pc.and_(pc.is_in(status, value_set=pa.array([Status.OK.value, Status.NO_FACE.value])),
                       pc.is_valid(r["detect_fingerprint"]))))
    keep |= pc.fill_null(pc.is_in(status, value_set=pa.array(sorted(s.value for s in resume.RETRYABLE))),
                         False).to_numpy(zero_copy_only=False)
    for col in ("output_name", "access_name"):
        mark(first(pc.is_valid(r[col]), ("image_id", col)))
    runs_only = first(pc.is_null(r["review_id"]))  # the newest run row of each image...
    since = r.select(["image_id", "_rank"]).join(runs_only, "image_id")  # ...and every row newer than it
    newer = since.filter(pc.less_equal(since["_rank"], since["_rank_min"]))["_rank"].to_numpy()
    keep[order[newer]] = True
    return keep


class _Writer:
    """Rows into files of about ``ROWS_PER_FILE`` rows under ``base`` (``part-00000.parquet``, ...)."""

    def __init__(self, base: str, cfg: StorageConfig):
        self.base, self.cfg = base, cfg
        self.parts: list[pa.Table] = []
        self.schema: pa.Schema | None = None  # the parts' unified schema
        self.rows = 0
        self.written: list[str] = []
        self.total = 0

    def add(self, t: pa.Table) -> None:
        if t.num_rows:
            merged = None
            if self.parts and _same_types(self.schema, t.schema):
                try:
                    merged = pa.unify_schemas([self.schema, t.schema], promote_options="permissive")
                except (pa.ArrowTypeError, pa.ArrowInvalid):
                    pass
            if merged is None:
                self.flush()  # each file keeps its rows' own types; readers reconcile them (ledger.concat)
            self.schema = t.schema if merged is None else merged
            self.parts.append(t)
            self.rows += t.num_rows
            if self.rows >= ROWS_PER_FILE:
                self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        uri = storage.join(self.base, f"part-{len(self.written):05d}.parquet")
        ledger.write_part(pa.concat_tables(self.parts, promote_options="permissive"), uri, self.cfg)
        self.written.append(uri)
        self.total += self.rows
        self.parts, self.rows = [], 0


def _same_types(a: pa.Schema, b: pa.Schema) -> bool:
    """Whether rows of schemas ``a`` and ``b`` go in one file as they are: every column they share holds
    values of one kind (``ledger.kind``: no integer turned float, nothing turned text), or nulls only."""
    return all(pa.types.is_null(a.field(n).type) or pa.types.is_null(b.field(n).type)
               or ledger.kind(a.field(n).type) == ledger.kind(b.field(n).type) for n in set(a.names) & set(b.names))


def _read_all(uris: list[str], cfg: StorageConfig, columns: list[str] | None):
    """Each file's rows (``columns``), in order, ``_GROUP`` at a time. A file that cannot be read fails the
    fold before anything is committed; a torn one gives None (it stays loose, for a run to set aside)."""
    def one(uri: str) -> pa.Table | None:
        try:
            return ledger._read_one(uri, cfg, columns)
        except ledger._Vanished:
            raise StorageError(f"result file {uri} vanished during a fold: something else deletes result files "
                               "while this holds the output's lease; nothing was committed") from None

    with ThreadPoolExecutor(_GROUP) as pool:
        for start in range(0, len(uris), _GROUP):
            group = uris[start:start + _GROUP]
            yield from zip(group, pool.map(one, group))


def _commit(output_root: str, fold_id: str, body: dict, cfg: StorageConfig,
            still_ours: Callable[[], bool] | None) -> str:
    if still_ours is not None and not still_ours():
        raise StorageError("the output's lease was lost during the fold (another run took the output over); "
                           "nothing was committed")
    uri = storage.join(ledger.results_dir(output_root), ledger.FOLDS, f"{fold_id}.json")
    storage.write_bytes(uri, json.dumps(body, indent=1).encode(), cfg)
    return uri


def fold_loose(output_root: str, cfg: StorageConfig, by: str, min_files: int = 2,
               still_ours: Callable[[], bool] | None = None) -> dict | None:
    """Fold the ledger's loose files (one per Compose batch, of any run) into few; None when there are
    fewer than ``min_files``. The caller holds the output's lease."""
    listing = ledger.list_ledger(output_root, cfg)
    if len(listing.loose) < min_files:
        if listing.orphans or listing.replaced or listing.superseded:
            # What an interrupted fold or cleanup left: readers list twice while a fold's files lie about.
            cleanup(output_root, cfg, still_ours=still_ours)
        return None
    fold_id = runs.new_run_id()
    base = storage.join(ledger.results_dir(output_root), f"fold={fold_id}")
    out, inputs = _Writer(base, cfg), []
    for uri, t in _read_all(listing.loose, cfg, None):
        if t is not None:  # torn: stays loose, so that a run sets it aside and redoes its images
            out.add(t)
            inputs.append(uri)
    out.flush()
    body = {"fold_id": fold_id, "kind": "loose", "by": by, "created_at": runs.now_iso(), "rows": out.total,
            "files": [listing.rel(u, output_root) for u in out.written],
            "replaces": sorted(listing.rel(u, output_root) for u in inputs + listing.replaced), "history": []}
    _commit(output_root, fold_id, body, cfg, still_ours)
    cleanup(output_root, cfg, still_ours=still_ours)
    log.info("ledger: %d result files folded into %d (%d rows)", len(inputs), len(out.written), out.total)
    return {"fold_id": fold_id, "files_before": len(inputs), "files_after": len(out.written), "rows": out.total}


def compact(output_root: str, cfg: StorageConfig, by: str, delete_history: bool = False,
            still_ours: Callable[[], bool] | None = None) -> dict:
    """Fold the whole ledger: the rows ``kept_rows`` keeps into few files, the others into ``_history/``
    (or nowhere, with ``delete_history``, which also deletes the history files of earlier compactions).
    The caller holds the output's lease."""
    listing = ledger.list_ledger(output_root, cfg)
    files = listing.files
    # Pass 1: the columns the rule needs, with each row's file and position.
    index, torn = [], []
    for i, (uri, t) in enumerate(_read_all(files, cfg, KEEP_COLUMNS)):
        if t is None:
            torn.append(uri)
        elif t.num_rows:
            t = resume.names_only(t, output_root)
            index.append(t.append_column("_f", pa.array(np.full(t.num_rows, i, np.int32)))
                          .append_column("_r", pa.array(np.arange(t.num_rows, dtype=np.int64))))
    rows = ledger.concat(index) if index else None
    kept_at: dict[int, np.ndarray] = {}
    if rows is not None:
        for col in ("detect_fingerprint", "review_id"):  # ledgers of earlier versions lack them
            if col not in rows.column_names:
                rows = rows.append_column(col, pa.nulls(rows.num_rows, pa.string()))
        keep = kept_rows(rows)
        f, r = rows["_f"].to_numpy(), rows["_r"].to_numpy()
        for i in np.unique(f):
            mine = f == i
            kept_at[int(i)] = r[mine][keep[mine]]
    del rows, index
    # Pass 2: whole rows, split.
    fold_id = runs.new_run_id()
    live = _Writer(storage.join(ledger.results_dir(output_root), f"fold={fold_id}"), cfg)
    hist = _Writer(storage.join(ledger.history_dir(output_root), f"fold={fold_id}"), cfg)
    inputs, older = [], 0
    for i, (uri, t) in enumerate(_read_all(files, cfg, None)):
        if t is None:
            continue  # torn: left loose
        mask = np.zeros(t.num_rows, dtype=bool)
        mask[kept_at.get(i, np.zeros(0, np.int64))] = True
        live.add(t.filter(pa.array(mask)))
        older += int((~mask).sum())
        if not delete_history:
            hist.add(t.filter(pa.array(~mask)))
        inputs.append(uri)
    live.flush()
    hist.flush()
    carried = [] if delete_history else [_rel_root(h, output_root) for h in listing.history]
    body = {"fold_id": fold_id, "kind": "compact", "by": by, "created_at": runs.now_iso(), "rows": live.total,
            "history_rows": hist.total, "files": [listing.rel(u, output_root) for u in live.written],
            "replaces": sorted(listing.rel(u, output_root) for u in inputs + listing.replaced),
            "history": carried + [_rel_root(h, output_root) for h in hist.written]}
    _commit(output_root, fold_id, body, cfg, still_ours)
    gone = cleanup(output_root, cfg, history=True, still_ours=still_ours)
    log.info("ledger compacted: %d files -> %d, %d rows kept, %d older rows %s", len(inputs), len(live.written),
             live.total, older, "deleted" if delete_history else "moved to history")
    return {"fold_id": fold_id, "files_before": len(inputs), "files_after": len(live.written),
            "rows_kept": live.total, "rows_to_history": hist.total, "rows_deleted": older if delete_history else 0,
            "history_files": len(body["history"]), "history_files_deleted": gone["history"], "torn_left": torn}


def _rel_root(uri: str, output_root: str) -> str:
    return uri[len(output_root.rstrip("/")) + 1:]


_HISTORY_PART = re.compile(r"/_history/fold=[^/]+/part-\d{5}\.parquet$")


def cleanup(output_root: str, cfg: StorageConfig, history: bool = False,
            still_ours: Callable[[], bool] | None = None) -> dict:
    """Delete what no reader reaches: fold records a later fold superseded (first, so that files they
    name never come back), then replaced files and files of folds that never committed; with ``history``,
    history files (``_history/fold=<id>/part-NNNNN.parquet``, nothing else) that no live record names.
    Only under the output's lease, checked before each kind of delete: files of a fold that another run,
    having taken the output over, is writing must not be taken for an interrupted fold's."""
    listing = ledger.list_ledger(output_root, cfg)
    gone = {"records": 0, "files": 0, "history": 0}

    def drop(what: str, uris: list[str]) -> None:
        if uris and still_ours is not None and not still_ours():
            raise StorageError("the output's lease was lost during the cleanup after a fold (the fold itself is "
                               "committed); the next fold deletes what is left")
        storage.delete_many(uris, cfg)
        gone[what] += len(uris)

    drop("records", listing.superseded)
    drop("files", listing.replaced + listing.orphans)
    if history:
        named = set(listing.history)
        drop("history", [u for u in storage.list_files(ledger.history_dir(output_root), cfg)
                         if u not in named and _HISTORY_PART.search(u)])
    if not storage.is_remote(output_root):  # object stores have no folders to leave behind
        _drop_empty_dirs(ledger.results_dir(output_root))
        _drop_empty_dirs(ledger.history_dir(output_root))
    return gone


def _drop_empty_dirs(root: str) -> None:
    for path, dirs, files in os.walk(root, topdown=False):
        if path != root and not dirs and not files:
            try:
                os.rmdir(path)
            except OSError:
                pass


def run_compact(output_root: str, cfg: RunConfig, delete_history: bool = False) -> dict:
    """``archive-restore compact``: take the output's lease (refused while a run works on it), compact,
    and leave a record in ``_runs/``."""
    out = storage.normalize(output_root)
    if not ledger.list_ledger(out, cfg.storage).files:
        raise StorageError(f"{out} holds no results: is it the output of a run?")
    compact_id = runs.new_run_id() + "-compact"
    lease = runs.Lease(out, cfg.storage, compact_id, cfg.cluster.heartbeat_s).acquire()
    record = {"run_id": compact_id, "kind": "compact", "state": "running", "started_at": runs.now_iso(),
              "output": out, "lease_generation": lease.generation, "delete_history": delete_history}
    try:
        lease.begin(record, cfg.cluster.takeover_grace_s)
        record.update(state="finished", finished_at=runs.now_iso(),
                      summary=compact(out, cfg.storage, compact_id, delete_history,
                                      still_ours=lambda: not lease.lost.is_set()))
    except BaseException as e:
        record.update(state="failed", error=f"{type(e).__name__}: {e}", finished_at=runs.now_iso())
        raise
    finally:
        lease.end(record)
    return record

