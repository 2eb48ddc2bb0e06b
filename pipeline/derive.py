"""Access copies added to images already processed, without GFP-GAN: ``resume.plan``'s ``derive``.

Turning ``output.access_copy`` on (or changing its size or quality) after an archive was processed must not
restore every face again (those settings are outside the fingerprint, see ``RunConfig.fingerprint``). Each
such image's access copy is made from its derivative, as Compose makes it from the same pixels: resized,
encoded, the master's metadata carried and, when the derivative is signed, signed with the derivative as
its parent. The image's latest row is then written again with the access copy (its fingerprint, run and
faces unchanged: the derivative is the same; ``derived_by`` names the run that added the copy, so that
no chart counts the image as work of the run that made the derivative), so the ledger says which files
exist.

The derivative is checked against its row's sha256 and the master against the row's (the master's
metadata goes into the copy). An image that cannot be derived keeps its row as it was: nothing about its
derivative changed, so no error row may make it look unprocessed; the run record counts it with the
reason, and the next run tries again. For a lossy derivative the copy is made from its decoded pixels,
which differ from Compose's in-memory pixels by the derivative's own encoding (one JPEG generation, at
``jpeg_quality``, before the copy's resize); lossless derivatives give the same copy.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import time

import pyarrow as pa

from . import imageio, keys, ledger, provenance, storage
from .errors import Fenced
from .schema import rows_to_table
from .stages import Batch, Compose, _rows

log = logging.getLogger(__name__)


class CannotDerive(Exception):
    pass


class AddAccessCopy:
    """Make the access copy of each row's image (a full result row of an ``ok`` image, as the ledger holds
    it) and return the rows that got one, plus ``(image_id, reason)`` for those that did not."""

    def __init__(self, compose: Compose):
        self.compose = compose
        self.cfg = compose.cfg

    def __call__(self, batch: Batch) -> tuple[pa.Table, list[tuple[str, str]]]:
        done, failed = [], []
        for row in _rows(batch):
            try:
                rows_to_table([row], self.compose.schema)  # a row the ledger cannot take fails before any write
                done.append(self.process(row))
            except (Fenced, provenance.SigningExpired):
                raise
            except Exception as e:  # noqa: BLE001 - one image never fails the batch; its row stays
                reason = str(e) if isinstance(e, CannotDerive) else f"{type(e).__name__}: {e}"
                log.warning("%s: no access copy: %s", row.get("image_id"), reason)
                failed.append((row["image_id"], reason))
        return rows_to_table(done, self.compose.schema), failed

    def _read(self, uri: str, sha256: str | None, what: str) -> bytes:
        try:
            data = storage.read_bytes(uri, self.cfg.storage)
        except FileNotFoundError:
            raise CannotDerive(f"its {what} {uri} is missing") from None
        if sha256 and hashlib.sha256(data).hexdigest() != sha256:
            raise CannotDerive(f"its {what} {uri} is not the one its result row describes (changed since); "
                               "process the image again (--reprocess all, or a new manifest of it)")
        return data

    def process(self, row: dict) -> dict:
        t0, c0 = time.perf_counter(), time.process_time()
        if row.get("key_error"):
            raise CannotDerive(row["key_error"])
        if row.get("c2pa_signed") and self.compose.provenance is None:
            raise CannotDerive("its derivative is signed, so its access copy must be: run with "
                               "provenance.c2pa=sign and the signing key")
        # Rows of versions before output_name: the name from the URI (as decisions.py does).
        name = row.get("output_name") or storage.name_below(row["output_uri"], self.compose.images_root)
        if name is None:
            raise CannotDerive(f"its row predates output_name and its derivative {row['output_uri']} is not "
                               f"below {self.compose.images_root}: process the image again")
        uri = storage.join(self.compose.images_root, name)  # where the output is today (it may have moved)
        derivative = self._read(uri, row.get("out_sha256"), "derivative")
        master = self._read(row["uri"], row.get("src_sha256"), "master")
        img = imageio.decode(derivative, self.cfg.input.max_pixels)
        faces = row.get("faces") or []
        row.update(src_bytes=master, _faces=faces)
        restored = any(f.get("action") == "restored" for f in faces)
        # The access name from the key planned for today's settings (``access_key``): with access copies on,
        # names that would be shared get the image's suffix (keys.assign), so no copy overwrites another's.
        access_name = keys.derivative_key(row.get("access_key") or row["output_key"], "JPEG")
        try:
            self.compose._write_access_copy(row, img.pixels, restored,
                                            (derivative, posixpath.basename(name), img.format, row.get("out_sha256")),
                                            name=access_name)
        finally:
            row.pop("src_bytes", None)
            row.pop("_faces", None)
        note = f"access copy made from the derivative by run {self.compose.run_id}"
        row["notes"] = "; ".join(x for x in (row.get("notes"), note) if x)
        # (cpu_s: this step's own, so that summing the ledger counts the image's first processing once)
        row.update(output_name=name, derived_by=self.compose.run_id, compose_s=time.perf_counter() - t0,
                   cpu_s=time.process_time() - c0,
                   finished_at=ledger.finished_after(row.get("finished_at")))
        return row


SUMMARY_SCHEMA = pa.schema([("image_id", pa.string()), ("error", pa.string()), ("part", pa.string())])


def derive_and_record(batch: Batch, **kwargs) -> pa.Table:
    """One Ray task per batch, like ``stages.compose_and_record``: the access copies, then the rows of the
    images that got one into the ledger as one file. Returns per image the failure reason (null: derived)."""
    stage = AddAccessCopy(Compose(**kwargs, keep_row_fingerprint=True))  # the derivative is the row's own
    rows, failed = stage(batch)
    uri = None
    if rows.num_rows:
        uri = ledger.part_uri(stage.cfg.output.root, stage.compose.run_id, rows["image_id"].to_pylist())
        if stage.compose.fence is not None:
            stage.compose.fence.check()
        ledger.write_part(rows, uri, stage.cfg.storage)
    return pa.table({"image_id": rows["image_id"].to_pylist() + [i for i, _ in failed],
                     "error": [None] * rows.num_rows + [r for _, r in failed],
                     "part": [uri] * rows.num_rows + [None] * len(failed)}, schema=SUMMARY_SCHEMA)
