"""The three stage callables. Plain classes, no Ray: ``__init__`` loads models once,
``__call__(batch) -> pyarrow.Table`` handles one batch of images. Batches are Arrow tables in the job
(nested and nullable columns survive exactly; numpy batches turn a null int into NaN) or dicts of numpy
arrays when a test builds one by hand.

Anything that goes wrong with one image becomes that row's ``status`` and ``error``; only
configuration and programmer errors raise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import threading
import time
from datetime import datetime, timezone
from typing import Union

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import __version__, imageio, jpegblocks, keys, ledger, metadata, provenance, review, storage, weights
from .config import OutputConfig, RunConfig, detect_fingerprint, parse_access_spec
from .layout import WriteGuard
from .faces import FACE_SIZE, Face, FaceDetector, align_matrix, paste_face, warp_face
from .facequeue import FaceQueue
from .errors import Fenced
from .schema import FACE_TYPE, RESULT_SCHEMA, WORK_SCHEMA, Status, rows_to_table, with_passthrough

log = logging.getLogger(__name__)


def _value(x):
    """numpy scalar -> Python value; NaN (how numpy batches spell a null) -> None."""
    x = x.item() if isinstance(x, np.generic) else x
    return None if isinstance(x, float) and x != x else x


Batch = Union[pa.Table, dict[str, np.ndarray]]


def _rows(batch) -> list[dict]:
    """Rows of a batch. The job passes Arrow batches (exact types and nulls); tests may pass numpy dicts."""
    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    n = len(next(iter(batch.values()))) if batch else 0
    return [{k: _value(v[i]) for k, v in batch.items()} for i in range(n)]


def _error(row: dict, status: Status, message: str) -> dict:
    log.info("%s %s: %s", row.get("image_id"), status.value, message)
    row.update(status=status.value, error=message)
    return row


def _each(rows: list[dict], process, status: Status) -> list[dict]:
    """``process`` on every row; whatever it raises becomes that row's ``status`` and ``error`` (logged with
    its traceback), so one image can never fail the batch, and with it the Ray job. Each row's ``cpu_s``
    grows by the process's CPU time on it: OpenCV's own worker threads included (the actor or task runs one
    call at a time; Ray's threads meanwhile are counted too, a small share)."""
    out = []
    for row in rows:
        c0 = time.process_time()
        try:
            done = process(row)
        except (Fenced, provenance.SigningExpired):
            raise
        except Exception as e:
            log.exception("unexpected failure on %s", row.get("image_id"))
            done = _error(row, status, f"unexpected {type(e).__name__}: {e}")
        done["cpu_s"] = (done.get("cpu_s") or 0.0) + time.process_time() - c0
        out.append(done)
    return out


def _face_record(face: Face, affine: np.ndarray) -> dict:
    """A found face as it travels in ``faces_json``: where it is, how it was aligned, and the matrix that
    takes its crop to ArcFace's 112x112 template (identity QA)."""
    from .identity import arcface_matrix  # torch: see Restore

    lm_crop = np.c_[face.landmarks, np.ones(5)] @ affine.T
    return {"bbox": face.bbox.tolist(), "score": face.score, "landmarks": face.landmarks.ravel().tolist(),
            "affine": affine.ravel().tolist(), "arcface": arcface_matrix(lm_crop).ravel().tolist()}


class DecodeDetect:
    """Fetch, hash, decode, detect faces, align crops. CPU actor."""

    def __init__(self, cfg: RunConfig, root: str, passthrough: pa.Schema | None = None,
                 expected_weights: dict[str, str] | None = None):
        self.cfg, self.root = cfg, root
        self.schema = with_passthrough(WORK_SCHEMA, passthrough)
        resolved = weights.resolve(cfg.detect.model, cfg, (expected_weights or {}).get(cfg.detect.model))
        self.detector = FaceDetector(cfg.detect, resolved)
        # Faces found here (on CPU), and those the Restore actor finds on its device (detect.device=gpu)
        self.detect_fp = detect_fingerprint(cfg.detect.model_copy(update={"device": "cpu"}), resolved.sha256)
        self.device_fp = detect_fingerprint(cfg.detect.model_copy(update={"device": "gpu"}), resolved.sha256)

    def __call__(self, batch: Batch) -> pa.Table:
        rows = _rows(batch)
        if rows and rows[0].get("output_key") is None:  # a hand-built batch: the job's plan assigns keys
            assigned = keys.output_keys([r["uri"] for r in rows], self.root, [r["image_id"] for r in rows])
            for r, k in zip(rows, assigned.to_pylist()):
                r["output_key"] = k
        return rows_to_table(_each(rows, self.process, Status.DETECT_ERROR), self.schema)

    def _reused_fp(self, row: dict) -> str | None:
        """The detect fingerprint of stored detections that stand for this row, else None: they stand when
        the bytes and the detector (settings + weights) are unchanged, found on either device (they agree
        within rounding), and keep the fingerprint of where they were found."""
        fp = row.get("prior_detect_fp")
        stands = (not self.cfg.redetect and row.get("prior_faces") is not None
                  and row.get("prior_sha256") == row["src_sha256"] and fp in (self.detect_fp, self.device_fp))
        return fp if stands else None

    def _defer(self, row: dict, data: bytes, t0: float) -> dict | None:
        """With detect.device=gpu: a JPEG master the Restore actor can decode and search for faces on its
        device goes on as its bytes, after the header checks ``imageio.decode`` makes first; None for one
        that is detected here (another format, CMYK, a header that fails: ``decode`` then says why, or
        faces found on the device before that are reused: the crops are made here)."""
        try:
            head = imageio.probe(data, self.cfg.input.max_pixels)
        except Exception:
            return None
        if head.format != "JPEG" or head.mode not in ("RGB", "L") or self._reused_fp(row):
            return None
        width, height = head.size
        rejected = None
        if self.cfg.review.carry_decisions and row.get("prior_sha256") == row["src_sha256"]:
            rejected = review.rejected_boxes(row.get("prior_faces"))  # applied once the faces are found
        row.update(src_format=head.format, width=width, height=height, notes=None, src_bytes=data,
                   decode_s=time.perf_counter() - t0, detect_fingerprint=self.device_fp, detect_reused=False,
                   defer_detect=head.orientation, faces_json=json.dumps({"faces": [], "rejected": rejected}))
        return row

    def process(self, row: dict) -> dict:
        row.update(status=Status.OK.value, error=None, n_faces=0)
        if row.get("key_error"):
            return _error(row, Status.WRITE_ERROR, row["key_error"])
        t0 = time.perf_counter()
        try:
            data = storage.read_bytes(row["uri"], self.cfg.storage)
        except FileNotFoundError:
            return _error(row, Status.READ_ERROR, "file not found: check the manifest's uri")
        except Exception as e:  # permission, a directory, network after retries, a malformed URI, no credentials
            return _error(row, Status.READ_ERROR, f"cannot read: {type(e).__name__}: {e}")
        row["src_sha256"] = hashlib.sha256(data).hexdigest()
        if self.cfg.detect.device == "gpu" and (deferred := self._defer(row, data, t0)) is not None:
            return deferred
        try:
            img = imageio.decode(data, self.cfg.input.max_pixels)
        except imageio.TooLargeError as e:
            return _error(row, Status.TOO_LARGE, str(e))
        except imageio.DecodeError as e:
            return _error(row, Status.DECODE_ERROR, str(e))
        except Exception as e:  # a decoder's own failure on odd bytes (cv2.error, MemoryError, ...)
            return _error(row, Status.DECODE_ERROR, f"cannot decode: {type(e).__name__}: {e}")
        row.update(src_format=img.format, width=img.width, height=img.height, notes=img.notes)
        t1 = time.perf_counter()
        row["decode_s"] = t1 - t0
        reused = self._reused_fp(row)
        row["detect_fingerprint"] = reused or self.detect_fp
        row["detect_reused"] = reused is not None
        try:
            bgr = imageio.to_bgr8(img.pixels)
            if row["detect_reused"]:
                faces = [Face(np.asarray(f["bbox"], np.float32), f["score"],
                              np.asarray(f["landmarks"], np.float32).reshape(5, 2)) for f in row["prior_faces"]]
                skipped = row.get("prior_faces_skipped") or 0
            else:
                faces, skipped = self.detector.detect(bgr)
            crops, records = [], []
            for f in faces:
                affine = align_matrix(f.landmarks)
                crops.append(warp_face(bgr, affine))
                records.append(_face_record(f, affine))
        except Exception as e:  # a detector failure on odd pixels must not stop the batch
            log.exception("detection failed for %s", row["image_id"])
            return _error(row, Status.DETECT_ERROR, f"face detection failed: {type(e).__name__}: {e}")
        row["detect_s"] = time.perf_counter() - t1
        if self.cfg.review.carry_decisions and row.get("prior_sha256") == row["src_sha256"]:
            review.mark_rejected(records, review.rejected_boxes(row.get("prior_faces")))  # a rejection stands
        row["n_faces"] = len(records)
        row["faces_skipped"] = skipped
        row["faces_json"] = json.dumps({"faces": records})
        if records:
            row["crops"] = np.stack(crops).tobytes()
        else:
            row["status"] = Status.NO_FACE.value
        if self.cfg.cluster.carry_masters and (records or self.cfg.output.copy_no_face):
            row["src_bytes"] = data  # carried compressed; Compose decodes again
        return row


FACE_BYTES = FACE_SIZE * FACE_SIZE * 3


def _binary_rows(col: pa.ChunkedArray, rows: list[int]) -> list[tuple[pa.Buffer, int, int]]:
    """(data buffer, start, end) of each of ``rows`` in a binary column: where its bytes lie, no copy."""
    out, chunk_starts, base = [], [], 0
    for c in col.chunks:
        chunk_starts.append(base)
        base += len(c)
    for i in rows:
        k = int(np.searchsorted(chunk_starts, i, side="right")) - 1
        c = col.chunks[k]
        offsets = np.frombuffer(c.buffers()[1], np.int64 if pa.types.is_large_binary(c.type) else np.int32)
        j = c.offset + i - chunk_starts[k]
        out.append((c.buffers()[2], int(offsets[j]), int(offsets[j + 1])))
    return out


def _gather_faces(spans: list[tuple[pa.Buffer, int, int]]) -> np.ndarray:
    """(n, 512, 512, 3) uint8 over the spans: a view of Arrow's buffer when they lie end to end in one
    buffer (rows of one block, the usual case), else one copy. Read-only either way."""
    buf, first, end = spans[0]
    if all(b.address == buf.address and s == e for (b, s, _), (_, _, e) in zip(spans[1:], spans)):
        end = spans[-1][2]
        flat = np.frombuffer(buf, np.uint8, count=end - first, offset=first)
    else:
        flat = np.concatenate([np.frombuffer(b, np.uint8, count=e - s, offset=s) for b, s, e in spans])
    return flat.reshape(-1, FACE_SIZE, FACE_SIZE, 3)


def _merge_binary(num_rows: int, parts: dict[int, pa.Array]) -> pa.Array:
    """One large_binary column from per-row columns (row i taken from ``parts[i]``; others null)."""
    values = [None] * num_rows
    for i, col in parts.items():
        values[i] = col[i].as_py()
    return pa.array(values, pa.large_binary())


def _binary_column(flat: np.ndarray, rows: list[int], sizes: list[int], num_rows: int) -> pa.Array:
    """A large_binary column whose ``rows`` hold consecutive ``sizes`` bytes of ``flat`` (others null),
    built on ``flat``'s memory without a copy."""
    lengths = np.zeros(num_rows, np.int64)
    lengths[rows] = sizes
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    valid = np.zeros(num_rows, bool)
    valid[rows] = True
    bitmap = pa.array(valid).buffers()[1]
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), num_rows,
                                            [bitmap, pa.py_buffer(offsets), pa.py_buffer(flat)],
                                            null_count=num_rows - len(rows))


# Pixels of masters a Restore actor keeps on its device, at most, for their derivatives (output.device=gpu),
# over its calls in flight: 3 bytes a pixel, so ~1.2 GB beside the models and the restoring batches.
KEEP_PIXELS = 400_000_000

# Faces the device thread restores in one run of micro-batches, at most (unless one call brings more):
# a few micro-batches, so that faces of the calls queued behind fill them, and results go back soon.
CHUNK_MICRO_BATCHES = 4


class Restore:
    """GFP-GAN on every face of the batch's images at once, plus identity QA. One actor per GPU; with
    ``calls_in_flight`` calls at once (``job.restore_calls``), whose faces one device thread restores
    together (``facequeue.FaceQueue``: micro-batches stay full across Ray batches).

    Column-wise on the Arrow batch: crops are read where Arrow holds them and the restored crops
    become a column over the restorer's output buffer; the compressed masters and every other column
    pass through untouched. Going through Python rows copied each of them twice and capped the host
    side of a GPU actor at 453 faces/s with 6 MB masters (BENCHMARKS.md, ``bench/restore_host.py``).
    """

    def __init__(self, cfg: RunConfig, passthrough: pa.Schema | None = None, device: str | None = None,
                 expected_weights: dict[str, str] | None = None, planned: str | None = None,
                 calls_in_flight: int = 3):
        """``device``: torch's device (None: CUDA when torch has it, else CPU). ``planned``: where the job
        meant this actor to restore ("cuda": it was given a GPU); a CUDA plan that meets a torch without
        CUDA (a logical GPU in tests, a node whose drivers are broken) restores on CPU and says so loudly,
        and every row names the device (``restore_device``)."""
        self.cfg = cfg
        self.schema = with_passthrough(WORK_SCHEMA, passthrough)
        from .restorer import FaceRestorer  # torch: imported by the stages that use it (Compose does not)

        self.restorer = FaceRestorer(cfg, device, expected_weights)
        self.device_name = self.restorer.device_name
        # Calls in flight on this actor hand their faces to one device thread (facequeue.py)
        # (through a lambda: what replaces restorer.restore later, a bench's stub, is what runs)
        # (one call at a time: nothing to combine, so each call's faces go to the device whole, as before)
        self.queue = FaceQueue(lambda crops, mats: self.restorer.restore(crops, mats), cfg.restore.micro_batch,
                               cfg.restore.micro_batch * CHUNK_MICRO_BATCHES, combine=calls_in_flight > 1,
                               cpu_clock=time.thread_time if self.restorer.cuda else time.process_time)
        self.device_faces = None
        if cfg.detect.device == "gpu":  # JPEG masters are decoded and searched for faces here (devicefaces.py)
            from .devicefaces import DeviceFaces

            resolved = weights.resolve(cfg.detect.model, cfg, (expected_weights or {}).get(cfg.detect.model))
            detector = FaceDetector(cfg.detect, resolved, device=str(self.restorer.device))
            self.device_faces = DeviceFaces(detector, cfg.detect.gpu_batch)
        # output.device=gpu: derivatives of the masters decoded here are made here too (devicepaste.py); the
        # masters kept for it from detection until their faces are restored are bounded (KEEP_PIXELS)
        self.make_here = self.device_faces is not None and cfg.output.device == "gpu"
        self._kept_pixels = 0
        self._kept_lock = threading.Lock()
        if planned == "cuda" and not self.restorer.cuda:
            log.warning("this Restore actor was given a GPU, but torch sees no CUDA device: restoring on CPU "
                        "(a logical GPU, or a node without working GPU drivers); rows say restore_device=cpu%s",
                        "; the JPEG masters' faces are found here on CPU too (detect.device=gpu)"
                        if self.device_faces is not None else "")

    def __call__(self, batch: Batch) -> pa.Table:
        c0 = time.thread_time()
        table = batch if isinstance(batch, pa.Table) else rows_to_table(_rows(batch), self.schema)
        table = table.select(self.schema.names).cast(self.schema)  # zero-copy when it already conforms
        found, masters, held = {}, {}, {}
        try:
            if self.device_faces is not None:  # before announcing: the queue need not wait while this detects
                table, found, masters = self._detect_deferred(table, held)
            # Announced while this call reads its batch: the device thread may wait a moment for its faces
            # rather than run another call's part-filled micro-batch.
            with self.queue.coming() as token:
                return self._call(table, token, found, c0, masters, held)
        finally:
            masters.clear()
            self._release(held, list(held))

    def _call(self, table: pa.Table, token: dict, found: dict, c0: float, masters: dict, held: dict) -> pa.Table:
        """``found``: the crops of faces found on the device (``_detect_deferred``), by row; ``masters``: the
        pixels there of those whose derivatives are made there (``output.device=gpu``), ``held`` their share
        of ``KEEP_PIXELS``."""
        cols = {name: table.column(name).to_pylist() for name in ("image_id", "status", "error", "n_faces",
                                                                  "faces_json", "restore_s", "restore_device",
                                                                  "cpu_s")}
        todo = [i for i, (s, n) in enumerate(zip(cols["status"], cols["n_faces"])) if s == Status.OK.value and n]
        restored = pa.nulls(table.num_rows, pa.large_binary())
        carried = [i for i in todo if i not in found]
        spans = {**dict(zip(carried, _binary_rows(table.column("crops"), carried))), **found}
        for i, (_, a, b) in spans.items():
            if b - a != cols["n_faces"][i] * FACE_BYTES:
                self._fail(cols, i, f"crops hold {b - a} bytes for {cols['n_faces'][i]} faces")
                todo.remove(i)
        if todo:
            restored = self._restore(table.num_rows, todo, [spans[i] for i in todo], cols, token=token)
            self.queue.arrived(token)  # its retries below come alone: nobody need wait for them
            if restored is None:  # the batch failed: image by image, so only the culprit fails
                log.warning("restoring a batch of %d images failed; retrying them one by one", len(todo))
                parts = {i: self._restore(table.num_rows, [i], [spans[i]], cols, last_try=True) for i in todo}
                restored = _merge_binary(table.num_rows, {i: p for i, p in parts.items() if p is not None})
        # (each master goes, and gives its share of KEEP_PIXELS back, as its derivative is made; the call's
        # __call__ lets go of the rest)
        made = self._make_here(table.num_rows, cols, restored, masters, held) if masters else {}
        # this thread's CPU on the batch (parsing, device detection), shared by its rows; the device
        # thread's was added per face in _restore
        share = (time.thread_time() - c0) / max(1, table.num_rows)
        cols["cpu_s"] = [(c or 0.0) + share for c in cols["cpu_s"]]
        updates = {"crops": pa.nulls(table.num_rows, pa.large_binary()),  # not needed downstream
                   "restored": restored, **{k: pa.array(cols[k], self.schema.field(k).type)
                                            for k in ("status", "error", "faces_json", "restore_s",
                                                      "restore_device", "cpu_s")}, **made}
        for name, values in updates.items():
            table = table.set_column(self.schema.get_field_index(name), self.schema.field(name), values)
        return table

    def _detect_deferred(self, table: pa.Table, held: dict[int, int]) -> tuple[pa.Table, dict, dict]:
        """Decode the batch's deferred JPEG masters (``defer_detect``) on the device, find and align their
        faces there, and fill the columns DecodeDetect fills for the others (faces, status, timings; a
        failure as it would say it). Returns the table, the crops by row (buffer, start, end: where
        ``_restore`` reads them) and, with ``output.device=gpu``, the decoded masters by row whose
        derivatives are made here (``_make_here``), whose pixels ``held`` holds by row (given back to
        ``KEEP_PIXELS`` as each is done with). The masters' bytes are read where Arrow holds them, and go on
        to Compose only with ``cluster.carry_masters`` (as from DecodeDetect); otherwise Compose reads them
        again."""
        deferred = table.column("defer_detect").to_pylist()
        status = table.column("status").to_pylist()
        rows = [i for i, (o, s) in enumerate(zip(deferred, status)) if o is not None and s == Status.OK.value]
        if not rows:
            return table, {}, {}
        names = ("status", "error", "n_faces", "faces_skipped", "faces_json", "width", "height", "src_format",
                 "detect_fingerprint", "decode_s", "detect_s", "defer_detect")
        cols = {n: table.column(n).to_pylist() for n in ("image_id", *names)}
        masters = [memoryview(buf)[a:b] for buf, a, b in _binary_rows(table.column("src_bytes"), rows)]
        wanted = [self.make_here and self._made_here(m) for m in masters]
        keep = [w and self._hold(cols["width"][i], cols["height"][i], held, i) for i, w in zip(rows, wanted)]
        if sum(wanted) > sum(keep):
            log.info("%d masters over KEEP_PIXELS kept on the device: Compose makes their derivatives",
                     sum(wanted) - sum(keep))
        try:
            found = self.device_faces(masters, [deferred[i] for i in rows],
                                      [(cols["width"][i] or 0) * (cols["height"][i] or 0) for i in rows], keep)
        except Exception as e:  # the device itself failed (not one master): these rows, not the batch
            log.exception("detection on the device failed for %d masters", len(rows))
            found = [e] * len(rows)
        del masters
        crops, dropped, kept = {}, [], {}
        for i, f in zip(rows, found):
            cols["defer_detect"][i] = None
            try:
                if isinstance(f, Exception):
                    raise f
                records = [_face_record(face, affine) for face, affine in zip(f.faces, f.affines)]
                review.mark_rejected(records, json.loads(cols["faces_json"][i] or "{}").get("rejected"))
            except Exception as e:
                decode = isinstance(e, imageio.DecodeError)
                if not decode:
                    log.error("detection on the device failed for %s: %s: %s", cols["image_id"][i], type(e).__name__, e)
                row = _error({"image_id": cols["image_id"][i]}, Status.DECODE_ERROR if decode else Status.DETECT_ERROR,
                             str(e) if decode else f"face detection failed: {type(e).__name__}: {e}")
                cols["status"][i], cols["error"][i], cols["faces_json"][i] = row["status"], row["error"], None
                if decode:  # as DecodeDetect leaves a master it cannot decode
                    for k in ("width", "height", "src_format", "detect_fingerprint", "decode_s"):
                        cols[k][i] = None
                dropped.append(i)
                continue
            cols["faces_json"][i] = json.dumps({"faces": records})
            cols["n_faces"][i], cols["faces_skipped"][i] = len(records), f.skipped
            cols["width"][i], cols["height"][i] = f.width, f.height
            cols["decode_s"][i] = (cols["decode_s"][i] or 0.0) + f.decode_s
            cols["detect_s"][i] = f.detect_s
            if records:
                crops[i] = (pa.py_buffer(f.crops), 0, f.crops.nbytes)
                if f.master is not None:
                    kept[i] = f.master
            else:
                cols["status"][i] = Status.NO_FACE.value
                if not self.cfg.output.copy_no_face:
                    dropped.append(i)  # nothing of this master is written
        for name in names:
            field = self.schema.field(name)
            table = table.set_column(self.schema.get_field_index(name), field, pa.array(cols[name], field.type))
        src = table.column("src_bytes")
        if not self.cfg.cluster.carry_masters:
            src = pa.nulls(table.num_rows, pa.large_binary())  # only deferred rows had bytes: Compose reads again
        elif dropped:
            drop = np.zeros(table.num_rows, bool)
            drop[dropped] = True
            src = pc.if_else(pa.array(drop), pa.scalar(None, pa.large_binary()), src)
        table = table.set_column(self.schema.get_field_index("src_bytes"), self.schema.field("src_bytes"), src)
        self._release(held, [i for i in list(held) if i not in kept])  # no faces, failed: nothing kept
        return table, crops, kept

    def _hold(self, width: int | None, height: int | None, held: dict[int, int], row: int) -> bool:
        """Room for one more kept master of ``width`` x ``height`` within ``KEEP_PIXELS`` (``held[row]``); a
        master beyond it has its derivative made by Compose."""
        n = (width or 0) * (height or 0)
        with self._kept_lock:
            if not n or self._kept_pixels + n > KEEP_PIXELS:
                return False
            self._kept_pixels += n
        held[row] = n
        return True

    def _release(self, held: dict[int, int], rows: list[int]) -> None:
        """Give ``rows``' kept pixels back to ``KEEP_PIXELS``."""
        n = sum(held.pop(i, 0) for i in rows)
        if n:
            with self._kept_lock:
                self._kept_pixels -= n

    def _made_here(self, data) -> bool:
        """Whether a deferred master's derivative can be made on the device: a colour JPEG re-encoded to JPEG.
        (Grey masters, luminance-only pastes, blocks mode and other formats are Compose's, on the CPU.)"""
        o = self.cfg.output
        if (o.jpeg_mode != "reencode" or o.colour_policy == "force_grey"
                or imageio.output_format("JPEG", o.format) != "JPEG"):
            return False
        try:
            return imageio.probe(data, self.cfg.input.max_pixels).mode == "RGB"
        except Exception:
            return False

    def _make_here(self, num_rows: int, cols: dict, restored: pa.Array, masters: dict,
                   held: dict[int, int]) -> dict[str, pa.Array]:
        """The derivatives, access copies and review crops of the restored rows among ``masters``, made on the
        device (devicepaste.py), as columns; a row whose master turns out monochrome (``colour_policy=auto``)
        or whose making fails is left to Compose, on the CPU."""
        try:
            from . import devicepaste
        except Exception as e:  # e.g. a torchvision without its image operations: Compose makes them all
            log.warning("derivatives cannot be made on the device (%s: %s): Compose makes them", type(e).__name__, e)
            return {}
        o, r = self.cfg.output, self.cfg.review
        access = parse_access_spec(o.access_spec) if o.access_copy else None
        crops = (r.crop_size, r.crop_quality) if r.crops else None
        rows = [i for i in masters if cols["status"][i] == Status.OK.value and restored[i].is_valid]
        spans = dict(zip(rows, _binary_rows(pa.chunked_array([restored]), rows)))
        made, made_access, made_review = [None] * num_rows, [None] * num_rows, [None] * num_rows
        for i in rows:
            master = masters.pop(i)
            try:
                with self.device_faces.using():
                    if o.colour_policy == "auto" and devicepaste.is_grey(master):
                        continue  # its faces' luminance only: Compose's paste
                    buf, a, b = spans[i]
                    faces = np.frombuffer(buf, np.uint8, count=b - a, offset=a).reshape(-1, FACE_SIZE, FACE_SIZE, 3)
                    m = devicepaste.make_derivative(master, json.loads(cols["faces_json"][i])["faces"], faces,
                                                    o.jpeg_quality, access, crops)
            except devicepaste.Unsupported as e:
                log.info("%s: its derivative is made by Compose: %s", cols["image_id"][i], e)
                continue
            except Exception as e:
                log.warning("making the derivative of %s on the device failed (%s: %s): Compose makes it",
                            cols["image_id"][i], type(e).__name__, e)
                continue
            finally:
                del master
                self._release(held, [i])
            made[i], made_access[i] = m.derivative, m.access
            made_review[i] = [x for pair in m.review for x in pair] if crops else None
        return {"_made": pa.array(made, pa.large_binary()), "_made_access": pa.array(made_access, pa.large_binary()),
                "_made_review": pa.array(made_review, pa.list_(pa.large_binary()))}

    @staticmethod
    def _fail(cols: dict, i: int, message: str) -> None:
        row = {"image_id": cols["image_id"][i]}
        _error(row, Status.RESTORE_ERROR, message)
        cols["status"][i], cols["error"][i] = row["status"], row["error"]

    def _restore(self, num_rows: int, todo: list[int], spans, cols: dict, last_try: bool = False,
                 token: dict | None = None) -> pa.Array | None:
        """Restore the faces of rows ``todo``; None if that failed (and, on the ``last_try``, the rows say why).
        The device's time on them counts in their ``restore_s`` and ``cpu_s`` whether it succeeded or not."""
        counts = [cols["n_faces"][i] for i in todo]
        try:
            crops = _gather_faces(spans)
            faces = [json.loads(cols["faces_json"][i]) for i in todo]
            mats = np.array([f["arcface"] for fs in faces for f in fs["faces"]], np.float32).reshape(-1, 2, 3)
            if not np.isfinite(mats).all():
                raise ValueError("an alignment matrix is not finite")
            out, seconds, cpu = self.queue.restore(crops, mats, alone=last_try, token=token)
        except Exception as e:
            self._spent(cols, todo, counts, getattr(e, "device_s", 0.0), getattr(e, "cpu_s", 0.0))
            if last_try:
                log.exception("restoration failed for %s", cols["image_id"][todo[0]])
                for i in todo:
                    self._fail(cols, i, f"restoration failed: {type(e).__name__}: {e}")
            return None
        self._spent(cols, todo, counts, seconds, cpu)
        qa = self.cfg.qa
        start = 0
        for i, fs, n in zip(todo, faces, counts):
            sl = slice(start, start + n)
            start += n
            for f, sim, fb in zip(fs["faces"], out.similarity[sl], out.fp32_fallback[sl]):
                scored = bool(np.isfinite(sim)) and not self.restorer.untrained
                f["identity_similarity"] = float(sim) if np.isfinite(sim) else None
                f["qa"] = ("flag" if sim < qa.min_identity_similarity else "pass") if scored else None
                f["action"] = "kept_original" if f["qa"] == "flag" and qa.on_low_identity == "keep_original" \
                    else "restored"
                if f.get("review") == "rejected":  # carried from an earlier decision (review.mark_rejected)
                    f["action"] = "reverted"
                f["fp32_fallback"] = bool(fb)
            cols["faces_json"][i] = json.dumps(fs)
            cols["restore_device"][i] = self.device_name
        return _binary_column(out.faces.reshape(-1), todo, [n * FACE_BYTES for n in counts], num_rows)

    @staticmethod
    def _spent(cols: dict, todo: list[int], counts: list[int], seconds: float, cpu: float) -> None:
        """Add the device's seconds and the CPU seconds of an attempt on rows ``todo`` to them, by faces: the
        device's time on their faces, not waits behind other calls; a failed attempt's as well, so that a
        batch restored again image by image counts both tries."""
        faces = max(1, sum(counts))
        for i, n in zip(todo, counts):
            cols["restore_s"][i] = (cols["restore_s"][i] or 0.0) + seconds / faces * n
            cols["cpu_s"][i] = (cols["cpu_s"][i] or 0.0) + cpu / faces * n


class SigningFailed(Exception):
    pass


class Compose:
    """Paste restored faces back, encode, write the derivative, and emit the result row. CPU task.

    Every write is checked first: by ``fence`` (the run still holds the output; see runs.py) and by the
    layout's ``WriteGuard`` (the target is in its area and is not the image's own input).
    """

    def __init__(self, cfg: RunConfig, run_id: str, fingerprint: str, untrained: bool,
                 passthrough: pa.Schema | None = None, software: str | None = None, fence=None,
                 input_folders: np.ndarray | None = None, provenance=None,
                 device_fingerprints: dict[str, str] | None = None, keep_row_fingerprint: bool = False):
        """``fingerprint``: the rows'; ``device_fingerprints``: by device kind ("cuda", "cpu"), the one of a
        row whose faces were restored there (``restore_device``): a Restore actor given a GPU that finds
        no CUDA restores in fp32 on CPU, and its rows must not claim the fp16 of the plan.
        ``keep_row_fingerprint``: rows written again (an access copy added, a review applied) keep their
        own; a run's rows never do (a manifest column named ``fingerprint`` passes through to them)."""
        self.cfg, self.run_id, self.fingerprint, self.untrained = cfg, run_id, fingerprint, untrained
        self.device_fingerprints = device_fingerprints or {}
        self.keep_row_fingerprint = keep_row_fingerprint
        # Written into every derivative that had a face restored, next to the AI-edit label.
        self.software = software or f"archive-restore {__version__}; {cfg.restore.model}"
        self.schema = with_passthrough(RESULT_SCHEMA, passthrough)
        self.images_root = storage.join(cfg.output.root, "images")
        self.access_root = storage.join(cfg.output.root, "access")
        self.review_root = storage.join(cfg.output.root, "review")
        self.guard = WriteGuard(cfg.output.root, input_folders)
        self.fence = fence
        self.provenance = provenance  # a provenance.Material: sign restored derivatives (None: do not)
        self._signer = None
        self.deferred: list[tuple[str, str, bytes]] | None = None  # when a list: writes are collected there

    def __call__(self, batch: Batch) -> pa.Table:
        rows = _rows(batch)
        for row in _each(rows, self.process, Status.WRITE_ERROR):
            self._finish(row)
        return rows_to_table(rows, self.schema)

    def _write(self, uri: str, area: str, data: bytes, row: dict) -> None:
        if self.fence is not None:
            self.fence.check()
        self.guard.check(uri, area, row["uri"])
        if self.deferred is not None:  # a review writes its rows before its files (decisions.py)
            self.deferred.append((uri, area, data))
            return
        storage.write_bytes(uri, data, self.cfg.storage)

    def _out_name(self, row: dict, fmt: str) -> str:
        """The derivative keeps its planned key; the extension changes only when the format does (and then
        the image's suffix keeps the name apart from every other image's, see keys.written_name)."""
        return keys.written_name(row["output_key"], row["image_id"], fmt, self.cfg.output.format)

    def _write_access_copy(self, row: dict, master, restored: bool, parent: tuple[bytes, str, str, str],
                           name: str | None = None, spec: str | None = None, jpeg: bytes | None = None) -> None:
        """A small 8-bit JPEG for browsing and the web; the derivative stays the archival master copy.
        ``name`` (below access/) defaults to the planned key's; ``spec`` (``OutputConfig.access_spec``) to
        the settings'. ``jpeg``: the copy already made (on the device, with the settings' spec)."""
        spec = spec or self.cfg.output.access_spec or OutputConfig(access_copy=True).access_spec
        if jpeg is not None:
            data = jpeg
        else:
            long_side, quality = parse_access_spec(spec)
            px = imageio.to8(master)
            h, w = px.shape[:2]
            if max(h, w) > long_side:
                f = long_side / max(h, w)
                px = cv2.resize(px, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
            data = imageio.encode(px, ".jpg", quality)
        data, _ = metadata.carry(row["src_bytes"], data, "JPEG", restored=restored, software=self.software)
        name = name or keys.derivative_key(row["output_key"], "JPEG")
        if row.get("c2pa_signed"):  # signed exactly when its derivative is; its parent: the derivative
            data = self._sign(row, data, "JPEG", name, parent)
        uri = storage.join(self.access_root, name)
        self._write(uri, "access", data, row)
        row.update(access_uri=uri, access_name=name, access_sha256=hashlib.sha256(data).hexdigest(),
                   access_spec=spec)

    def fingerprint_of(self, row: dict) -> str:
        """The fingerprint ``row`` carries: its own when it is written again (``keep_row_fingerprint``), else
        that of the device its faces were restored on, else the run's."""
        if self.keep_row_fingerprint and row.get("fingerprint"):
            return row["fingerprint"]
        device = (row.get("restore_device") or "").split(" ")[0]
        return self.device_fingerprints.get(device, self.fingerprint)

    def _sign(self, row: dict, data: bytes, fmt: str, name: str, parent: tuple[bytes, str, str, str]) -> bytes:
        """``data`` with its Content Credentials (see provenance.py); the last edit before the write."""
        faces = [{"box": dict(zip(("x1", "y1", "x2", "y2"), f["bbox"])),  # master pixels
                  **{k: f.get(k) for k in ("identity_similarity", "qa", "action")}} for f in row["_faces"]]
        facts = {"image_id": row["image_id"], "run_id": self.run_id, "fingerprint": self.fingerprint_of(row),
                 "master_sha256": row["src_sha256"], "software": self.software, "faces": faces}
        parent_bytes, parent_name, parent_fmt, parent_sha256 = parent
        try:
            if self._signer is None:
                self._signer = provenance.Signer(self.provenance, self.software)
            return self._signer.sign(data, fmt, posixpath.basename(name), parent_bytes, parent_name, parent_fmt,
                                     facts, parent_sha256)
        except provenance.SigningExpired:
            raise  # every image left would fail alike: the run stops, saying why
        except Exception as e:  # never an unsigned file that the run says is signed: the image fails instead
            raise SigningFailed(self.provenance.redact(f"C2PA signing failed: {type(e).__name__}: {e}")) from None

    def read_master(self, row: dict,
                    changed: str = "the master changed while this run was processing it; run again") -> None:
        """The master's bytes into ``row``: carried from DecodeDetect, or read again and checked against the
        sha256 taken there (a master replaced mid-run must not get faces detected on its old version); when
        that fails, the row says why (``changed``: what to say of a master whose bytes differ)."""
        if row.get("src_bytes") is not None:
            return
        try:
            data = storage.read_bytes(row["uri"], self.cfg.storage)
        except Exception as e:
            _error(row, Status.READ_ERROR, f"cannot read the master again: {type(e).__name__}: {e}")
            return
        if hashlib.sha256(data).hexdigest() != row["src_sha256"]:
            _error(row, Status.READ_ERROR, changed)
            return
        row["src_bytes"] = data

    def process(self, row: dict) -> dict:
        row["_t0"] = time.perf_counter()
        row["_faces"] = json.loads(row["faces_json"])["faces"] if row.get("faces_json") else []
        copy = row["status"] == Status.NO_FACE.value and self.cfg.output.copy_no_face
        if row["status"] == Status.OK.value or copy:
            self.read_master(row)
        try:
            if row["status"] == Status.OK.value:
                self._write_restored(row, row["_faces"])
            elif row["status"] == Status.NO_FACE.value and self.cfg.output.copy_no_face:
                name = self._out_name(row, row["src_format"])
                uri = storage.join(self.images_root, name)
                self._write(uri, "images", row["src_bytes"], row)
                row.update(output_uri=uri, output_name=name, out_sha256=row["src_sha256"])
        except imageio.DecodeError as e:
            _error(row, Status.DECODE_ERROR, str(e))
        except SigningFailed as e:
            _error(row, Status.WRITE_ERROR, str(e))
        except (Fenced, provenance.SigningExpired):
            raise  # fenced: this run lost its output; nothing of it may be written or recorded
        except Exception as e:  # OSError, ValueError, an encoder's cv2.error, exiv2's RuntimeError, ...
            _error(row, Status.WRITE_ERROR, f"cannot write derivative: {type(e).__name__}: {e}")
        return row

    def _finish(self, row: dict) -> None:
        """The result row's own fields, whatever happened before: faces say what reached the derivative."""
        faces = row.pop("_faces", None) or []
        written = row["status"] == Status.OK.value
        row["faces"] = [{**{k: f.get(k) for k in FACE_TYPE.names},
                         **({} if written else {"action": None, "review_before": None, "review_after": None})}
                        for f in faces]
        if not written and row["status"] != Status.NO_FACE.value:
            # An error row describes no derivative; the names of files it did write stay (claimed, see keys.py).
            row.update(output_uri=None, out_sha256=None, access_uri=None, access_sha256=None, access_spec=None,
                       c2pa_signed=None)
        t0 = row.pop("_t0", None)
        row.update(fingerprint=self.fingerprint_of(row), run_id=self.run_id, untrained=self.untrained,
                   compose_s=time.perf_counter() - t0 if t0 else None, finished_at=datetime.now(timezone.utc))

    def _write_restored(self, row: dict, faces: list[dict]) -> None:
        if self._made_on_device(row, faces):
            self.write_derivative(row, None, None, faces, made=(row["_made"], row.get("_made_access"),
                                                                row.get("_made_review")))
            return
        img = imageio.decode(row["src_bytes"], self.cfg.input.max_pixels)
        pixels = img.pixels.copy()
        policy = self.cfg.output.colour_policy
        luminance_only = policy == "force_grey" or (policy == "auto" and img.grey)
        restored = np.frombuffer(row["restored"], np.uint8).reshape(-1, FACE_SIZE, FACE_SIZE, 3)
        changed = []
        for f, face in zip(faces, restored):
            if f.get("action") == "restored":
                changed.append(paste_face(pixels, face, np.array(f["affine"], np.float64).reshape(2, 3),
                                          luminance_only=luminance_only))
        self.write_derivative(row, img, pixels, faces, changed=changed)

    def _made_on_device(self, row: dict, faces: list[dict]) -> bool:
        """Whether the Restore actor made this row's derivative on its device (``output.device=gpu``), with
        everything else the settings ask of it."""
        if row.get("_made") is None or imageio.output_format(row["src_format"], self.cfg.output.format) != "JPEG":
            return False
        if self.cfg.output.access_copy and row.get("_made_access") is None:
            return False
        return not self.cfg.review.crops or len(row.get("_made_review") or []) == 2 * len(faces)

    def write_derivative(self, row: dict, img: imageio.Decoded | None, pixels: np.ndarray | None, faces: list[dict],
                         name: str | None = None, changed: list | None = None,
                         access: tuple[str, str | None] | bool | None = None,
                         made: tuple[bytes, bytes | None, list[bytes] | None] | None = None) -> None:
        """Encode ``pixels`` (the master ``img`` with ``faces`` pasted as their ``action`` says), carry the
        master's metadata, sign, write the derivative, its access copy and review crops. ``name``: the
        derivative's name below images/ (default: from the planned key). ``changed``: the regions where
        ``pixels`` differ from the master's, as ``paste_face`` returns them (None: anywhere). ``access``:
        the access copy's (name, spec), or False for none (a review keeps what the row had); None: as the
        settings say. ``made``: instead of ``img`` and ``pixels``, the JPEGs made on the device
        (devicepaste.Made: the derivative, the access copy, the review crops), before metadata."""
        fmt = imageio.output_format(row["src_format"], self.cfg.output.format)
        if made is not None:
            data, encode_note = made[0], None
        else:
            data, encode_note = self._encode(row, img, pixels, fmt, changed)
        restored_any = any(f.get("action") == "restored" for f in faces)
        data, note = metadata.carry(row["src_bytes"], data, fmt, restored=restored_any, software=self.software,
                                    copy_icc=made is not None or not img.cmyk)
        note = "; ".join(x for x in (encode_note, note) if x) or None
        name = name or self._out_name(row, fmt)
        row["c2pa_signed"] = None
        if restored_any and self.provenance is not None:
            if fmt in provenance.MIME:  # the formats that can carry Content Credentials
                data = self._sign(row, data, fmt, name, (row["src_bytes"], posixpath.basename(row["uri"]),
                                                         row["src_format"], row["src_sha256"]))
                row["c2pa_signed"] = True
            else:
                note = "; ".join(x for x in (note, f"no Content Credentials: {fmt} cannot carry them") if x)
        if note:
            row["notes"] = "; ".join(x for x in (row.get("notes"), note) if x)
        uri = storage.join(self.images_root, name)
        self._write(uri, "images", data, row)
        row.update(output_uri=uri, output_name=name, out_sha256=hashlib.sha256(data).hexdigest())
        access = self.cfg.output.access_copy if access is None else access
        if access:
            self._write_access_copy(row, pixels, restored_any, (data, posixpath.basename(name), fmt, row["out_sha256"]),
                                    *(access if isinstance(access, tuple) else ()), jpeg=made and made[1])
        if self.cfg.review.crops:
            self._write_review_crops(row, img and img.pixels, pixels, faces, jpegs=made and made[2])

    def _encode(self, row: dict, img: imageio.Decoded, pixels: np.ndarray, fmt: str,
                changed: list | None) -> tuple[bytes, str | None]:
        """The derivative's bytes, and a note when ``output.jpeg_mode = blocks`` could not be honoured."""
        o = self.cfg.output
        note = None
        if o.jpeg_mode == "blocks" and fmt == "JPEG" and row["src_format"] == "JPEG":  # others have no blocks
            if img.orientation in range(2, 9):
                reason = f"EXIF orientation {img.orientation} was applied to the pixels"
            elif changed is None:
                reason = "the changed regions are not known"
            else:
                try:
                    data, share = jpegblocks.splice(row["src_bytes"], pixels, changed)
                    log.debug("%s: %.1f%% of the MCUs encoded again", row["image_id"], 100 * share)
                    return data, None
                except jpegblocks.Unsupported as e:
                    reason = str(e)
            note = f"jpeg_mode=blocks not possible ({reason}): re-encoded at quality {o.jpeg_quality}"
        tiff = o.tiff_compression
        if tiff == "master":  # a master in another format (output.format: tiff) gets lzw
            tiff = img.tiff_compression or "lzw"
        return imageio.encode(pixels, imageio.FORMATS[fmt], o.jpeg_quality, o.webp_quality, o.png_level,
                              tiff), note

    def _write_review_crops(self, row: dict, before: np.ndarray | None, after: np.ndarray | None,
                            faces: list[dict], jpegs: list[bytes] | None = None) -> None:
        """Each face's before/after pair for the review page (review.py). They only help a curator: one that
        cannot be written becomes a note, and the image stays done. ``jpegs``: the pairs already made (on the
        device), face by face."""
        r = self.cfg.review
        try:
            for i, f in enumerate(faces):
                uris = []
                for j, (name, px) in enumerate(zip(review.crop_names(row["output_key"], i), (before, after))):
                    if jpegs is not None:
                        data = jpegs[2 * i + j]
                    else:
                        data = review.crop_jpeg(px, review.crop_box(f["bbox"], px.shape[1], px.shape[0]),
                                                r.crop_size, r.crop_quality)
                    uri = storage.join(self.review_root, name)
                    self._write(uri, "review", data, row)
                    uris.append(uri)
                f["review_before"], f["review_after"] = uris
        except Fenced:
            raise
        except Exception as e:
            for f in faces:
                f["review_before"] = f["review_after"] = None
            note = f"review crops not written: {type(e).__name__}: {e}"
            log.warning("%s: %s", row["image_id"], note)
            row["notes"] = "; ".join(x for x in (row.get("notes"), note) if x)


SUMMARY_SCHEMA = pa.schema([("image_id", pa.string()), ("status", pa.string()), ("n_faces", pa.int32()),
                            ("detect_reused", pa.bool_()), ("restore_device", pa.string()), ("part", pa.string())])


def compose_and_record(batch: Batch, **kwargs) -> pa.Table:
    """The job's last step, as one Ray task per batch: Compose, then the batch's rows into the ledger as one
    file (see ledger.py), written only while the run still holds the output. Returns a small summary per
    image for the driver's progress and run record; the rows themselves never travel to the driver."""
    stage = Compose(**kwargs)
    rows = stage(batch)
    uri = ledger.part_uri(stage.cfg.output.root, stage.run_id, rows["image_id"].to_pylist())
    if stage.fence is not None:
        stage.fence.check()
    ledger.write_part(rows, uri, stage.cfg.storage)
    return pa.table({"image_id": rows["image_id"], "status": rows["status"], "n_faces": rows["n_faces"],
                     "detect_reused": rows["detect_reused"], "restore_device": rows["restore_device"],
                     "part": pa.array([uri] * rows.num_rows, pa.string())},
                    schema=SUMMARY_SCHEMA)
