"""The results ledger: ``<output>/_results/run=<run_id>/part-<hash>.parquet``, written per Compose batch.

Writing: each Compose batch's rows become one Parquet file, written atomically (a temporary file renamed
into place locally; an object store publishes an upload only when it is complete), under a name made
from the run and the batch's image ids, so a task that Ray retries rewrites the same file rather than
adding a second copy of its rows. Results therefore land seconds after their derivatives, and a killed
run loses at most the batches in flight.

Reading never changes the ledger. Transient errors are retried with backoff, then the command fails
with a message naming the file; so does a file that cannot be read for lack of permission, or one that
is damaged. Only a file that is provably incomplete (no Parquet footer: what a writer that wrote in
place, as Ray's ``write_parquet`` in earlier versions did, leaves when killed) is skipped, with a
warning; only a run that holds the output's lease moves such files aside (``set_aside``), and its run
record lists them.

Folding (``compaction.py``) keeps the number of files small: a fold writes new files under
``_results/fold=<id>/`` and commits them with one record, ``_results/_folds/<id>.json``, naming the
files it wrote (``files``), the files whose rows they now hold (``replaces``) and the history files older
rows went to (``history``, below ``_history/``). Readers take a fold's files only through its record and
skip every file a record replaces, so a fold is all-or-nothing for them: before the record lands they see
the old files, after it the new ones, and an interrupted fold leaves files nobody reads. A listing is not
a snapshot (S3 serves it in pages of 1,000 keys), so the records are listed on their own, after the
result files: a record seen means its files were written before the result files were listed, else the
listing is taken again; a listing that shows a fold's files without its record, and a new record on a
second look, is taken again too. The "_" keeps the records out of what Parquet dataset readers (pyarrow,
Spark, DuckDB) take from ``_results/``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .config import StorageConfig
from .errors import StorageError
from .schema import RESULT_SCHEMA

log = logging.getLogger(__name__)

LEDGER_COLUMNS = ["image_id", "status", "fingerprint", "finished_at"]
_MAGIC = b"PAR1"


def results_dir(output_root: str) -> str:
    return storage.join(output_root, "_results")


def part_uri(output_root: str, run_id: str, image_ids: list[str]) -> str:
    """Where a batch's rows go: the same batch of the same run always gets the same name."""
    digest = hashlib.sha256("\n".join([run_id, *sorted(image_ids)]).encode()).hexdigest()[:24]
    return storage.join(results_dir(output_root), f"run={run_id}", f"part-{digest}.parquet")


def finished_after(prior: datetime | None) -> datetime:
    """A rewritten row's finish time: now, but never before the row it replaces (``prior``), whatever this
    machine's clock says; the latest row by finish time is the image's current one."""
    now = datetime.now(timezone.utc)
    if prior is None:
        return now
    prior = prior if prior.tzinfo else prior.replace(tzinfo=timezone.utc)
    return max(now, prior + timedelta(milliseconds=1))


def write_part(table: pa.Table, uri: str, cfg: StorageConfig) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), cfg)


FOLDS = "_folds"  # under _results/; listed after the result files (see the module docstring)


def history_dir(output_root: str) -> str:
    return storage.join(output_root, "_history")


@dataclass
class Listing:
    """The ledger's files as readers see them (``list_ledger``)."""
    files: list[str] = field(default_factory=list)  # result files holding the current rows
    loose: list[str] = field(default_factory=list)  # those of them that no fold wrote (one per Compose batch)
    records: dict[str, dict] = field(default_factory=dict)  # fold record URI -> record, live ones
    superseded: list[str] = field(default_factory=list)  # fold records whose files a later fold replaced
    replaced: list[str] = field(default_factory=list)  # files still present whose rows a fold holds
    orphans: list[str] = field(default_factory=list)  # files of folds that never committed
    history: list[str] = field(default_factory=list)  # history files named by live records
    missing: list[str] = field(default_factory=list)  # files live records name that the listing lacks

    def rel(self, uri: str, output_root: str) -> str:
        return uri[len(results_dir(output_root)) + 1:]


def _in_fold(rel: str) -> bool:
    return rel.startswith("fold=")


def list_ledger(output_root: str, cfg: StorageConfig) -> Listing:
    """List the ledger and read its fold records; see the module docstring. A record naming a file that is
    still not there on a third look (and that no later fold replaced) is an error: rows would be lost. A
    record deleted between the listing and its read (a later fold superseded it meanwhile) makes this list
    again."""
    prev: Listing | None = None
    for attempt in range(3):
        try:
            out = _list_ledger(output_root, cfg)
        except FileNotFoundError as e:
            log.info("a fold record vanished while being read (superseded meanwhile); listing again")
            last = f"fold records keep vanishing while being read ({e})"
            continue
        settled = not out.orphans or (prev is not None and set(prev.records) == set(out.records))
        if not out.missing and settled:
            return out
        last = (f"fold record(s) name result files that are gone ({', '.join(out.missing[:3])}): their rows "
                "would be lost; restore them (e.g. from a bucket version) before going on") if out.missing else ""
        if not out.missing and attempt == 2:
            return out  # an interrupted fold's files: nobody reads them
        prev = out
        time.sleep(0.2 * (attempt + 1))
    raise StorageError(f"{output_root}: {last}")


def _list_ledger(output_root: str, cfg: StorageConfig) -> Listing:
    base = results_dir(output_root)
    listed = [u for u in storage.list_files(base, cfg) if not u[len(base) + 1:].startswith(FOLDS + "/")]
    record_uris = [u for u in storage.list_files(storage.join(base, FOLDS), cfg) if u.endswith(".json")]
    rel = {u: u[len(base) + 1:] for u in listed}
    workers = max(1, min(16 if storage.is_remote(output_root) else 4, len(record_uris)))
    with ThreadPoolExecutor(workers) as pool:
        bodies = list(pool.map(lambda u: _read_record(u, cfg), record_uris))
    records = dict(zip(record_uris, bodies))
    replaced = {r for body in bodies for r in body.get("replaces", [])}
    committed = {f for body in bodies for f in body.get("files", [])}
    out = Listing()
    for u in listed:
        name, r = posixpath.basename(u), rel[u]
        if not name.endswith(".parquet") or name.startswith("."):
            continue
        if r in replaced:
            out.replaced.append(u)
        elif _in_fold(r) and r not in committed:
            out.orphans.append(u)
        else:
            out.files.append(u)
            if not _in_fold(r):
                out.loose.append(u)
    present = {rel[u] for u in listed}
    for uri, body in records.items():
        if body["files"] and all(f in replaced for f in body["files"]):
            out.superseded.append(uri)  # a later fold holds its rows (and carries its history list)
            continue
        out.missing += [f for f in body["files"] if f not in present and f not in replaced]
        out.records[uri] = body
        out.history += [storage.join(output_root, h) for h in body.get("history", [])]
    return out


def _read_record(uri: str, cfg: StorageConfig) -> dict:
    data = storage.read_bytes(uri, cfg)  # retried there; FileNotFoundError goes to list_ledger
    try:
        body = json.loads(data)
        assert isinstance(body, dict) and isinstance(body.get("files"), list)
    except (ValueError, AssertionError):
        raise StorageError(f"fold record {uri} is damaged; nothing was changed") from None
    return body


def result_files(output_root: str, cfg: StorageConfig) -> list[str]:
    """Result files (URIs) holding the current rows, freshly listed (``list_ledger``)."""
    return list_ledger(output_root, cfg).files


def _read_columns(path: str | pa.Buffer, fs, columns: list[str] | None) -> pa.Table:
    """Read ``columns`` of a file (``path`` in ``fs``, or its bytes); a file written before a column existed
    gets it as nulls (after the concat). ``ParquetFile`` rather than ``read_table``: the dataset layer costs
    ~0.5 ms of CPU per call, which on a ledger of 20,000 small files is 10 s of the driver's time."""
    small = isinstance(path, pa.Buffer)
    f = pq.ParquetFile(pa.BufferReader(path) if small else path, filesystem=None if small else fs)
    if columns is not None:
        present = set(f.schema_arrow.names)
        columns = [c for c in columns if c in present]
    t = f.read(columns=columns, use_threads=not small)
    renamed = _ours_typed(t)
    if renamed is not t and columns is not None:  # what was renamed away is not what was asked for
        return renamed.select([c for c in renamed.column_names if c in columns])
    return renamed


def is_torn(uri: str, cfg: StorageConfig) -> bool:
    """Provably incomplete: too short for a Parquet file, or without the footer's closing magic."""
    fs, path = storage.get_fs(uri, cfg)
    size = storage.retrying(lambda: fs.size(path), f"size of {uri}", cfg)
    if size < 12:
        return True
    tail = storage.retrying(lambda: fs.cat_file(path, start=size - 4, end=size), f"read of {uri}", cfg)
    return tail != _MAGIC


class _Vanished(Exception):
    """A listed file was gone when read: moved aside or folded meanwhile; the reader lists again."""


def _read_one(uri: str, cfg: StorageConfig, columns: list[str] | None) -> pa.Table | None:
    """One result file; None when it is torn. On an object store a per-batch file (small) is fetched whole
    (``storage.read_small``) and parsed in memory: Arrow's ranged reads cost a HEAD, the footer and a GET
    per column chunk, which made each file ~3x as slow to read. Folded files (large, few) keep the ranged
    reads, so that column projection saves transfer."""
    if storage.is_remote(uri) and "/fold=" not in uri:
        def read() -> pa.Table:
            try:
                return _read_columns(pa.py_buffer(storage.read_small(uri, cfg)), None, columns)
            except pa.ArrowInvalid:
                # Arrow's client asks the size, then reads that many bytes: a file rewritten in between
                # (a retried batch, while a reader without the lease looks) comes back cut. Read once
                # more in one GET; a file that is really torn or damaged fails again, as below.
                return _read_columns(pa.py_buffer(storage.read_bytes(uri, cfg)), None, columns)
    else:
        fs, path = storage.get_arrow_fs(uri, cfg)

        def read() -> pa.Table:
            return _read_columns(path, fs, columns)
    try:
        return storage.retrying(read, f"read of result file {uri}", cfg)
    except FileNotFoundError:
        raise _Vanished(uri) from None
    except PermissionError as e:
        raise StorageError(f"result file {uri} cannot be read ({e}): fix its permissions; nothing was changed")
    except (pa.ArrowInvalid, OSError) as e:
        try:
            torn = isinstance(e, pa.ArrowInvalid) and is_torn(uri, cfg)
        except OSError:
            torn = False
        if torn:
            log.warning("result file %s is incomplete (a writer was killed mid-file); its rows are not counted", uri)
            return None
        what = "is damaged" if isinstance(e, pa.ArrowInvalid) else f"cannot be read after {cfg.retries} retries"
        raise StorageError(f"result file {uri} {what}: {type(e).__name__}: {e}; nothing was changed") from None


def load_results(output_root: str, cfg: StorageConfig, columns: list[str] | None = None,
                 torn: list[str] | None = None, transform: Callable[[pa.Table], pa.Table] | None = None,
                 files: list[str] | None = None, history: bool = False, source: bool = False) -> pa.Table:
    """Every readable result row (``columns`` only). Read-only: see the module docstring. Torn files are
    skipped and, when ``torn`` is given, listed there. ``transform`` is applied to each file's rows as they
    are read (to keep only what is needed of a large ledger). ``files``: these files rather than the ledger's
    current ones. ``history``: the rows ``compact`` moved to ``_history/`` as well. ``source``: add
    ``_source``, the file each row came from (dictionary-encoded: 4 bytes a row). A file that vanishes while being read (a fold committed or a torn file
    was moved aside meanwhile) makes the reader list the ledger again."""
    for attempt in range(3):
        found: list[str] = []
        try:
            return _load(output_root, cfg, columns, found, transform, files, history, source)
        except _Vanished as e:
            if files is not None or attempt == 2:
                raise StorageError(f"result file {e} vanished while being read, three times: is something "
                                   "deleting result files?") from None
            log.info("result file %s vanished while being read (folded or moved aside meanwhile); reading again", e)
        finally:
            if torn is not None:
                torn[:] = found
    raise AssertionError("unreachable")


def _load(output_root: str, cfg: StorageConfig, columns: list[str] | None, torn: list[str],
          transform: Callable[[pa.Table], pa.Table] | None, files: list[str] | None, history: bool,
          source: bool) -> pa.Table:
    if files is None:
        listing = list_ledger(output_root, cfg)
        files = listing.files + (listing.history if history else [])
    workers = min(16, len(files)) if storage.is_remote(output_root) else min(4, len(files))

    def one(uri: str) -> tuple[str, pa.Table | None]:
        t = _read_one(uri, cfg, columns)
        if t is not None and transform:
            t = transform(t)
        if t is not None and source:
            t = t.append_column("_source", pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(t.num_rows, np.int32)), pa.array([uri], pa.string())))
        return uri, t

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            read = list(pool.map(one, files))
    else:
        read = [one(u) for u in files]
    tables = []
    for uri, t in read:
        if t is None:
            torn.append(uri)
        else:
            tables.append(t)
    log.debug("ledger %s: %d result files, %d torn", output_root, len(files), len(files) - len(tables))
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in (columns or LEDGER_COLUMNS)})
    return concat(tables)


def concat(tables: list[pa.Table]) -> pa.Table:
    """Result rows of several files (each through ``_ours_typed``) as one table; a column a file lacks reads
    as nulls. Runs infer a manifest column's type from their own manifest (a CSV shelf mark 12 in one, "A12"
    or 12.5 in the next), and one such column must not make the whole ledger unreadable (``status``,
    reports and folds read whole rows), nor be rounded: a column whose files hold values of different kinds
    (``kind``) reads as text from every file. Nothing is written back: a fold keeps each file's types
    (``compaction._Writer``)."""
    try:  # the usual case, in C++: every file spells every column alike (or it is null in some)
        pa.unify_schemas([t.schema for t in tables])
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        pass
    kinds: dict[str, set] = {}
    types: dict[str, set] = {}
    for t in tables:
        for f in t.schema:
            if not pa.types.is_null(f.type):
                kinds.setdefault(f.name, set()).add(kind(f.type))
                types.setdefault(f.name, set()).add(f.type)
    # not of one kind, or of one kind Arrow will not merge (a dictionary beside plain text, time zones
    # spelled differently): a manifest's column reads as text, one of ours as our type
    clash = {n for n, ts in types.items() if len(ts) > 1 and (len(kinds[n]) > 1 or not _unifies(tuple(ts)))}
    text = {n for n in clash if len(kinds[n]) > 1} - _OURS
    if text:
        log.warning("result files disagree on the type of column(s) %s (manifests of different runs); read as "
                    "text", ", ".join(sorted(text)))
    tables = [_as_text(_plainly(_as_ours(t, clash & _OURS), clash - _OURS - text), text) for t in tables]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        pass
    rest = {n for n, ts in types.items() if len(ts) > 1} - _OURS - text  # a last resort: all of those as text
    try:
        return pa.concat_tables([_as_text(t, rest) for t in tables], promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid) as e:
        raise StorageError(f"result files disagree on column types that cannot be reconciled: {e}") from None


@functools.lru_cache(maxsize=4096)
def _unifies(types: tuple[pa.DataType, ...]) -> bool:
    """Whether Arrow's permissive promotion merges columns of these types."""
    try:
        pa.unify_schemas([pa.schema([("c", t)]) for t in types], promote_options="permissive")
        return True
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        return False


_OURS = frozenset(RESULT_SCHEMA.names)


@functools.lru_cache(maxsize=4096)
def kind(t: pa.DataType):
    """What a column's values are, such that columns of one kind concatenate without loss (Arrow's
    permissive promotion): dictionary-encoded and plain, string and large_string, signed integers of any
    width, floats of any width, timestamps of any unit in one zone, and the ``faces`` lists of every
    version (their structs gained fields) are one kind each; an integer beside a float is not."""
    t = t.value_type if pa.types.is_dictionary(t) else t
    if pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_signed_integer(t):
        return ("int",)
    if pa.types.is_unsigned_integer(t):
        return ("uint",)
    if pa.types.is_floating(t):
        return ("float",)
    if pa.types.is_timestamp(t):
        return "timestamp", _utc(t.tz)
    if pa.types.is_list(t) and pa.types.is_struct(t.value_type):
        return ("list<struct>",)
    return t


def _family(t: pa.DataType):
    """``kind``, coarser: what tells a column of ours from a manifest's of the same name (any integer for
    an integer of ours, any timestamp for a time)."""
    k = kind(t)
    return ("int",) if k == ("uint",) else ("timestamp",) if isinstance(k, tuple) and k[0] == "timestamp" else k


def _utc(tz: str | None) -> str | None:
    return "UTC" if tz in ("UTC", "utc", "Etc/UTC", "Z", "+00:00", "00:00") else tz


def _ours_typed(t: pa.Table) -> pa.Table:
    """``t`` with each column named like one of ours (``schema.RESULT_SCHEMA``) whose values are not of our
    kind renamed ``manifest_<name>``: a manifest's column carried under our name before a later version made
    the name ours (``cpu_s``, ``access_spec``), which the manifest's column is carried as today
    (``manifest._renamed_reserved``). Our writers always write our types, and none of them changed."""
    foreign = _foreign(t.schema)
    if not foreign:
        return t
    names = list(t.column_names)
    for name in foreign:
        new, n = f"manifest_{name}", 1
        while new in names:  # that name taken in this file as well
            new, n = f"manifest_{name}_{n}", n + 1
        names[names.index(name)] = new
    return t.rename_columns(names)


def _foreign(schema: pa.Schema) -> tuple[str, ...]:
    """Columns named like ours whose values are not of our family (the types compared first: ours are
    always written with our own types)."""
    return tuple(f.name for f in schema if f.name in _OURS and f.type != RESULT_SCHEMA.field(f.name).type
                 and not pa.types.is_null(f.type) and _family(f.type) != _family(RESULT_SCHEMA.field(f.name).type))


def _as_ours(t: pa.Table, names: set[str]) -> pa.Table:
    for name in names & set(t.column_names):
        field = RESULT_SCHEMA.field(name)
        if t.schema.field(name).type != field.type:
            try:
                t = t.set_column(t.schema.get_field_index(name), field, t[name].cast(field.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # would lose values: Arrow's promotion then
                pass
    return t


def _plainly(t: pa.Table, names: set[str]) -> pa.Table:
    """Columns of one kind in spellings Arrow will not merge, spelled alike: dictionaries decoded, a UTC
    time zone named "UTC"."""
    for name in names & set(t.column_names):
        typ = t.schema.field(name).type
        if pa.types.is_dictionary(typ):
            typ = typ.value_type
        if pa.types.is_timestamp(typ) and _utc(typ.tz) == "UTC":
            typ = pa.timestamp(typ.unit, tz="UTC")
        if typ != t.schema.field(name).type:
            t = t.set_column(t.schema.get_field_index(name), name, t[name].cast(typ))
    return t


def _as_text(t: pa.Table, names: set[str]) -> pa.Table:
    for name in names & set(t.column_names):
        col = t[name]
        try:
            col = col.cast(pa.string())
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):  # nested or binary values: as JSON
            col = pa.array([None if v is None else json.dumps(v, default=_json_default) for v in col.to_pylist()],
                           pa.string())
        t = t.set_column(t.schema.get_field_index(name), pa.field(name, pa.string()), col)
    return t


def _json_default(v):
    return v.hex() if isinstance(v, bytes) else str(v)


def set_aside(uris: list[str], cfg: StorageConfig) -> list[str]:
    """Move torn result files aside (``.torn-<name>``). Only for a run holding the output's lease, which
    guarantees no live run is writing them; returns the new names, for the run record."""
    moved = []
    for uri in uris:
        if not is_torn(uri, cfg):  # looked torn once; a whole file now is not ours to move
            continue
        fs, path = storage.get_fs(uri, cfg)
        aside = posixpath.join(posixpath.dirname(path), ".torn-" + posixpath.basename(path))
        storage.retrying(lambda: fs.mv(path, aside), f"move of {uri}", cfg)
        moved.append(uri)
        log.warning("result file %s was incomplete; moved aside to .torn-%s, its images will be redone",
                    uri, posixpath.basename(path))
    return moved
