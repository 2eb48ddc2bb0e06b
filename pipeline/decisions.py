"""A curator's decisions applied to an output: ``archive-restore review apply OUTPUT decisions.csv``.

The decisions file (CSV, or JSON: a list of objects or ``{"decisions": [...]}``; what the report page
exports) has one line per face: ``image_id, face, decision`` with ``decision`` in ``accept|reject``.

- A rejected face is reverted to the master's pixels: the derivative is made again from the master,
  with the derivative's own pixels kept only where a face that stays restored was pasted (so outside
  the remaining faces it is the master once encoded, as Compose made it), its metadata label and Content
  Credentials follow (no AI-edit label when no restored face remains), and its review crops are redone.
  Where a kept face's paste-back region overlaps a rejected one, the kept face wins.
- An accepted face is recorded as accepted; its pixels do not change.
- Each image that changes gets a new result row (run id: the review's id); earlier rows stay as history.
  The image's fingerprint is kept, so a re-run of the job with the same settings leaves it alone, and a
  re-processing from the same master keeps rejected faces original (``review.carry_decisions``).

The whole file is checked before anything is written: unknown images, face numbers out of range,
decisions that contradict each other, or an acceptance of a face an earlier decision reverted (its
restoration is no longer in the derivative) refuse the file, naming each line. Applying the same file
twice changes nothing the second time. The review holds the output's lease like a run, so it never
races a job, and it is recorded in ``_runs/<review id>.json``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import posixpath
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import imageio, ledger, metadata, provenance, resume, runs, storage
from .config import RunConfig
from .errors import ConfigError, Fenced
from .faces import align_matrix, paste_mask
from .schema import FACE_TYPE, RESULT_SCHEMA, Status

log = logging.getLogger(__name__)

_VERBS = {"accept": "accepted", "accepted": "accepted", "reject": "rejected", "rejected": "rejected"}
_BATCH = 64  # images per result file written by a review


def parse(data: bytes, name: str) -> dict[tuple[str, int], str]:
    """``{(image_id, face): "accepted"|"rejected"}`` from a decisions file's bytes; ConfigError naming each
    bad line."""
    text = data.decode("utf-8-sig")
    if name.lower().endswith(".json") or text.lstrip()[:1] in ("[", "{"):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{name}: not valid JSON ({e})") from None
        items = items.get("decisions") if isinstance(items, dict) else items
        if not isinstance(items, list):
            raise ConfigError(f"{name}: expected a list of decisions, or {{\"decisions\": [...]}}")
        lines = [(i + 1, x) for i, x in enumerate(items)]
    else:
        reader = csv.DictReader(io.StringIO(text))
        missing = {"image_id", "face", "decision"} - set(reader.fieldnames or [])
        if missing:
            raise ConfigError(f"{name}: the header must name image_id, face and decision (missing: "
                              f"{', '.join(sorted(missing))})")
        lines = [(i + 2, x) for i, x in enumerate(reader)]
    out: dict[tuple[str, int], str] = {}
    problems = []
    for line, x in lines:
        if not isinstance(x, dict):
            problems.append(f"line {line}: not an object")
            continue
        image_id, face, verb = str(x.get("image_id") or "").strip(), x.get("face"), str(x.get("decision") or "")
        try:
            face = int(str(face).strip())
            if face < 0:
                raise ValueError
        except ValueError:
            problems.append(f"line {line}: face {x.get('face')!r} is not a face number (0, 1, ...)")
            continue
        decision = _VERBS.get(verb.strip().lower())
        if not image_id or decision is None:
            problems.append(f"line {line}: needs an image_id and a decision of accept or reject (got "
                            f"{x.get('image_id')!r}, {verb!r})")
            continue
        if out.get((image_id, face), decision) != decision:
            problems.append(f"line {line}: face {face} of {image_id} is both accepted and rejected")
        out[(image_id, face)] = decision
    if problems:
        raise ConfigError(_refusal(name, problems))
    return out


def _refusal(name: str, problems: list[str]) -> str:
    more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
    return f"{name}: nothing was applied: " + "; ".join(problems[:10]) + more


def _changes(latest: dict[str, dict], decided: dict[tuple[str, int], str], name: str) -> dict[str, list[dict]]:
    """The new faces list of every image whose faces change; ConfigError listing every decision that cannot
    be applied."""
    problems, by_image = [], {}
    for (image_id, i), decision in sorted(decided.items()):
        row = latest.get(image_id)
        if row is None:
            problems.append(f"{image_id}: no result for this image in the output")
            continue
        faces = row["faces"] or []
        if row["status"] != Status.OK.value or i >= len(faces):
            problems.append(f"{image_id}: has no face {i} (status {row['status']}, {len(faces)} faces)")
            continue
        f = faces[i]
        if decision == "accepted" and f.get("action") == "reverted":
            problems.append(f"{image_id} face {i}: an earlier decision reverted it, so its restoration is no longer "
                            "in the derivative; to restore it again, process the image again with "
                            "--set review.carry_decisions=false --reprocess all")
            continue
        new = by_image.setdefault(image_id, [dict(x) for x in faces])[i]
        new["review"] = decision
        if decision == "rejected" and f.get("action") == "restored":
            new["action"] = "reverted"
    if problems:
        raise ConfigError(_refusal(name, problems))
    return {k: v for k, v in by_image.items() if v != latest[k]["faces"]}


def _run_configs(out: str, cfg: RunConfig) -> dict[str, dict]:
    """For each fingerprint, the record of the latest job run that made results with it: its settings
    decide how a derivative is encoded again."""
    by_fp = {}
    for r in runs.read_records(out, cfg.storage):
        if r.get("kind", "job") == "job" and r.get("fingerprint") and r.get("config"):
            by_fp[r["fingerprint"]] = r
    return by_fp


def _software(record: dict, run_cfg: RunConfig) -> str:
    if record.get("software"):
        return record["software"]
    w = (record.get("weights") or {}).get(run_cfg.restore.model) or {}
    return metadata.software_label(run_cfg.restore.model, w.get("sha256"), bool(w.get("untrained")))


def _error(row: dict, status: Status, message: str) -> None:
    log.warning("%s: %s", row["image_id"], message)
    row.update(status=status.value, error=message)


def _recompose(row: dict, faces: list[dict], compose, cfg: RunConfig) -> None:
    """The derivative made again for ``faces`` (see the module docstring); ``row`` becomes the new result."""
    try:
        master = storage.read_bytes(row["uri"], cfg.storage)
        current = storage.read_bytes(row["output_uri"], cfg.storage)
    except Exception as e:
        _error(row, Status.READ_ERROR, f"cannot read the master or the derivative: {type(e).__name__}: {e}")
        return
    if hashlib.sha256(master).hexdigest() != row["src_sha256"]:
        _error(row, Status.READ_ERROR, "the master changed since it was restored: process it again first")
        return
    if row.get("out_sha256") and hashlib.sha256(current).hexdigest() != row["out_sha256"]:
        # A review killed between its writes leaves this; only faces that stay restored are taken from it.
        log.warning("%s: the derivative differs from its result row (an interrupted review?)", row["image_id"])
    img = imageio.decode(master, compose.cfg.input.max_pixels)
    derived = imageio.decode(current, compose.cfg.input.max_pixels).pixels
    pixels = img.pixels.copy()
    if derived.dtype != pixels.dtype:  # e.g. a 16-bit master written as an 8-bit JPEG derivative
        derived = imageio.to8(derived) if pixels.dtype == np.uint8 else derived.astype(np.uint16) * 257
    if derived.shape != pixels.shape:
        _error(row, Status.WRITE_ERROR, f"the derivative's layout {derived.shape} differs from the master's "
                                        f"{pixels.shape}: cannot recompose it")
        return
    for f in faces:
        if f.get("action") == "restored":
            affine = align_matrix(np.asarray(f["landmarks"], np.float32).reshape(5, 2))
            ys, xs, mask, _ = paste_mask(pixels.shape, affine)
            sel = mask > 0
            pixels[ys, xs][sel] = derived[ys, xs][sel]
    row.update(src_bytes=master, src_format=img.format, _faces=faces)
    name = row.get("output_name") or posixpath.relpath(row["output_uri"], compose.images_root)
    compose.write_derivative(row, img, pixels, faces, name=name)


def apply(output_root: str, decisions_uri: str, cfg: RunConfig) -> dict:
    """Apply a decisions file to the output; returns the review's record (see the module docstring)."""
    out = storage.normalize(output_root)
    data = storage.read_bytes(decisions_uri, cfg.storage)
    decided = parse(data, decisions_uri)
    review_id = "review-" + runs.new_run_id()
    lease = runs.Lease(out, cfg.storage, review_id, cfg.cluster.heartbeat_s)
    lease.acquire()
    record = {"run_id": review_id, "kind": "review", "state": "running", "started_at": runs.now_iso(),
              "output": out, "decisions": decisions_uri, "decisions_sha256": hashlib.sha256(data).hexdigest(),
              "decided": len(decided)}
    try:
        if lease.taken_over:
            runs.mark_killed(out, lease.taken_over, review_id, cfg.storage)
        runs.write_record(out, record, cfg.storage)
        lease.start()
        wanted = pa.array(sorted({k[0] for k in decided}), pa.string())
        rows = ledger.load_results(out, cfg.storage, transform=lambda t: t.filter(pc.is_in(t["image_id"],
                                                                                            value_set=wanted)))
        latest_table = resume.latest_rows(rows)
        latest = {r["image_id"]: r for r in latest_table.to_pylist()} if latest_table.num_rows else {}
        changes = _changes(latest, decided, decisions_uri)
        configs = _run_configs(out, cfg)
        missing = sorted({latest[i]["fingerprint"] for i in changes} - set(configs))
        if missing:
            raise ConfigError(f"no run record holds the settings of fingerprint(s) {', '.join(missing)} (in "
                              f"{runs.runs_dir(out)}): cannot encode those derivatives again")
        schema = pa.schema(list(RESULT_SCHEMA) + [f for f in latest_table.schema if f.name not in RESULT_SCHEMA.names])
        fence = lease.fence()
        # Every setting and key needed is loaded before the first write.
        composers = {fp: _composer(configs[fp], cfg, out, review_id, fence)
                     for fp in sorted({latest[i]["fingerprint"] for i in changes})}
        done, failed, pending = [], [], []
        try:
            for image_id, faces in changes.items():
                row = dict(latest[image_id])
                t0 = time.perf_counter()
                if any(a.get("action") != b["action"] for a, b in zip(row["faces"], faces)):
                    try:
                        _recompose(row, faces, composers[row["fingerprint"]], cfg)
                    except (Fenced, provenance.SigningExpired):
                        raise
                    except Exception as e:  # this image keeps its current row and derivative
                        log.exception("recomposing %s failed", image_id)
                        _error(row, Status.WRITE_ERROR, f"cannot recompose: {type(e).__name__}: {e}")
                if row["status"] != Status.OK.value:
                    failed.append({"image_id": image_id, "error": row["error"]})
                    continue
                row["faces"] = [{k: f.get(k) for k in FACE_TYPE.names} for f in faces]
                for k in ("_faces", "src_bytes", "src_format"):
                    row.pop(k, None)
                decided_here = sorted(i for (img, i) in decided if img == image_id)
                row["notes"] = "; ".join(x for x in (row.get("notes"), f"curator review {review_id}: face(s) "
                                         f"{', '.join(map(str, decided_here))} decided") if x)
                row.update(run_id=review_id, finished_at=datetime.now(timezone.utc),
                           compose_s=time.perf_counter() - t0)
                pending.append(row)
                done.append(image_id)
                if len(pending) >= _BATCH:
                    _flush(pending, schema, out, review_id, fence, cfg)
        finally:  # derivatives already rewritten get their rows, unless the output changed hands
            if not lease.lost.is_set():
                _flush(pending, schema, out, review_id, fence, cfg)
        faces_new = [f for i in done for f in changes[i]]
        record.update(state="finished", finished_at=runs.now_iso(), summary={
            "images_changed": len(done), "images_unchanged": len({k[0] for k in decided}) - len(changes),
            "faces_rejected": sum(f.get("review") == "rejected" for f in faces_new),
            "faces_accepted": sum(f.get("review") == "accepted" for f in faces_new),
            "faces_reverted": sum(1 for i in done for a, b in zip(latest[i]["faces"], changes[i])
                                  if a.get("action") != b["action"]),
            "failed": failed})
    except BaseException as e:  # a refused file (ConfigError) changed nothing; other failures may have
        record.update(state="refused" if isinstance(e, ConfigError) else "failed", error=f"{type(e).__name__}: {e}",
                      finished_at=runs.now_iso())
        raise
    finally:
        lease.stop()
        try:
            runs.write_record(out, record, cfg.storage)
        finally:
            lease.release()
    return record


def _composer(rec: dict, cfg: RunConfig, out: str, review_id: str, fence):
    """A Compose stage with the settings of the run that made the derivatives (storage from ``cfg``)."""
    from .stages import Compose

    run_cfg = RunConfig.model_validate({**rec["config"], "storage": cfg.storage.model_dump(),
                                        "output": {**rec["config"]["output"], "root": out}})
    signing = provenance.load(run_cfg.provenance, cfg.storage)
    return Compose(run_cfg, review_id, rec["fingerprint"], bool(rec.get("untrained")),
                   software=_software(rec, run_cfg), fence=fence, provenance=signing)


def _flush(pending: list[dict], schema: pa.Schema, out: str, review_id: str, fence, cfg: RunConfig) -> None:
    if not pending:
        return
    fence.check()
    table = pa.Table.from_pylist(pending, schema=schema)
    ledger.write_part(table, ledger.part_uri(out, review_id, [r["image_id"] for r in pending]), cfg.storage)
    pending.clear()
