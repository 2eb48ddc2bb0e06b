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
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .config import StorageConfig
from .errors import StorageError

log = logging.getLogger(__name__)

LEDGER_COLUMNS = ["image_id", "status", "fingerprint", "finished_at"]
_MAGIC = b"PAR1"


def results_dir(output_root: str) -> str:
    return storage.join(output_root, "_results")


def part_uri(output_root: str, run_id: str, image_ids: list[str]) -> str:
    """Where a batch's rows go: the same batch of the same run always gets the same name."""
    digest = hashlib.sha256("\n".join([run_id, *sorted(image_ids)]).encode()).hexdigest()[:24]
    return storage.join(results_dir(output_root), f"run={run_id}", f"part-{digest}.parquet")


def write_part(table: pa.Table, uri: str, cfg: StorageConfig) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), cfg)


def result_files(output_root: str, cfg: StorageConfig, run_id: str | None = None) -> list[str]:
    """Result files (URIs), freshly listed; names starting with "." (temporary, set aside) are not results."""
    where = results_dir(output_root)
    if run_id:
        where = storage.join(where, f"run={run_id}")
    return [u for u in storage.list_files(where, cfg)
            if u.endswith(".parquet") and not posixpath.basename(u).startswith(".")]


def _read_columns(path: str, fs, columns: list[str] | None) -> pa.Table:
    """Read ``columns``; a file written before a column existed gets it as nulls (after the concat)."""
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except (pa.ArrowInvalid, KeyError):
        if columns is None:
            raise
        present = set(pq.read_schema(path, filesystem=fs).names)
        if present >= set(columns):
            raise
        return pq.read_table(path, filesystem=fs, columns=[c for c in columns if c in present])


def is_torn(uri: str, cfg: StorageConfig) -> bool:
    """Provably incomplete: too short for a Parquet file, or without the footer's closing magic."""
    fs, path = storage.get_fs(uri, cfg)
    size = storage.retrying(lambda: fs.size(path), f"size of {uri}", cfg)
    if size < 12:
        return True
    tail = storage.retrying(lambda: fs.cat_file(path, start=size - 4, end=size), f"read of {uri}", cfg)
    return tail != _MAGIC


def _read_one(uri: str, cfg: StorageConfig, columns: list[str] | None) -> pa.Table | None:
    """One result file; None when it is torn (or vanished: set aside by a lease holder meanwhile)."""
    fs, path = storage.get_arrow_fs(uri, cfg)
    try:
        return storage.retrying(lambda: _read_columns(path, fs, columns), f"read of result file {uri}", cfg)
    except FileNotFoundError:
        log.debug("result file %s vanished while reading (set aside by the run holding the output)", uri)
        return None
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
                 run_id: str | None = None, torn: list[str] | None = None,
                 transform: Callable[[pa.Table], pa.Table] | None = None) -> pa.Table:
    """Every readable result row (``columns`` only). Read-only: see the module docstring. Torn files are
    skipped and, when ``torn`` is given, listed there. ``transform`` is applied to each file's rows as they
    are read (to keep only what is needed of a large ledger)."""
    files = result_files(output_root, cfg, run_id)
    workers = min(16, len(files)) if storage.is_remote(output_root) else min(4, len(files))

    def one(uri: str) -> tuple[str, pa.Table | None]:
        t = _read_one(uri, cfg, columns)
        return uri, (transform(t) if transform and t is not None else t)

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            read = list(pool.map(one, files))
    else:
        read = [one(u) for u in files]
    tables = []
    for uri, t in read:
        if t is None:
            if torn is not None:
                torn.append(uri)
        else:
            tables.append(t)
    log.debug("ledger %s: %d result files, %d torn", output_root, len(files), len(files) - len(tables))
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in (columns or LEDGER_COLUMNS)})
    return pa.concat_tables(tables, promote_options="permissive")


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
