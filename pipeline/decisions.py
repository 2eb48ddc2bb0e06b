"""A curator's decisions applied to an output: ``archive-restore review apply OUTPUT decisions.csv``.

The decisions file (CSV, or JSON: a list of objects or ``{"output": ..., "decisions": [...]}``; what the
review page exports) has one line per face: ``image_id, face, decision`` with ``decision`` in
``accept|reject``, and optionally ``derivative_sha256`` (a prefix of the derivative's sha256 when the page
was made), which refuses a decision about a derivative that has since been made again.

- A rejected face is reverted to the master's pixels: the derivative is made again from the master,
  with the derivative's own pixels kept only where a face that stays restored was pasted (outside them
  it is the master encoded once, as Compose made it), with the settings of the run that made it; its
  label and Content Credentials follow (no AI-edit label when no restored face remains), and its access
  copy and review crops are made again. Where a kept face's paste-back region overlaps a rejected one, the
  kept face wins; on lossy formats the kept faces go through one more encoding at the run's quality.
- An accepted face is recorded as accepted; no file changes.
- Each image that changes gets a new result row (``review_id``: the review; ``run_id``: whatever wrote
  the derivative's bytes, so Content Credentials still match their row); earlier rows stay as history.
  The fingerprint is kept, so a re-run with the same settings leaves the image alone, and a re-processing
  from the same master keeps rejected faces original (``review.carry_decisions``).

The whole file is checked before anything is written: unknown images, face numbers out of range,
contradictions, stale decisions, or an acceptance of a face an earlier decision reverted (its
restoration is no longer in the derivative) refuse it, naming each line. The review holds the output's
lease like a run, so it never races a job, and is recorded in ``_runs/<review id>.json``.

Crash safety: for each group of images the rows are written first, then the files (the derivative
last), and the review's record names the group (``in_flight``) before its rows land, so the ledger never
lags behind the files it describes and a file that could not be written is known. The next review,
whatever its file (even one with only its header line), checks those images and finishes any whose
derivative is not the one its row describes: a review only ever removes restorations, so the old
derivative still holds every face the row keeps. ``status`` and the report say when a review is
unfinished.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import time
from collections import defaultdict

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import imageio, ledger, metadata, provenance, runs, storage
from .config import RunConfig
from .errors import ConfigError, Fenced
from .faces import align_matrix, paste_mask
from .schema import FACE_TYPE, RESULT_SCHEMA, Status

log = logging.getLogger(__name__)

_VERBS = {"accept": "accepted", "accepted": "accepted", "reject": "rejected", "rejected": "rejected"}
_GROUP = 8  # images whose new files are held in memory while their rows are written first


def _text(data: bytes, name: str) -> str:
    """A decisions file's text: UTF-8 (with or without BOM) or UTF-16 with BOM (spreadsheet exports)."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name}: not UTF-8 text ({e}); save it as CSV UTF-8") from None


def parse(data: bytes, name: str) -> tuple[dict[tuple[str, int], str], dict[str, str], str | None]:
    """``({(image_id, face): "accepted"|"rejected"}, {image_id: derivative sha256 prefix}, output or None)``
    from a decisions file's bytes; ConfigError naming each bad line."""
    text, output = _text(data, name), None
    if name.lower().endswith(".json") or text.lstrip()[:1] in ("[", "{"):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{name}: not valid JSON ({e})") from None
        if isinstance(items, dict):
            output = items.get("output")
            items = items.get("decisions")
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
    shas: dict[str, str] = {}
    problems = []
    for line, x in lines:
        if not isinstance(x, dict):
            problems.append(f"line {line}: not an object")
            continue
        image_id, face, verb = str(x.get("image_id") or ""), x.get("face"), str(x.get("decision") or "")
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
        sha = str(x.get("derivative_sha256") or "").strip().lower()
        if sha:
            if shas.get(image_id, sha) != sha:
                problems.append(f"line {line}: {image_id} is given two derivative_sha256 values")
            shas[image_id] = sha
    if problems:
        raise ConfigError(_refusal(name, problems))
    return out, shas, output


def _refusal(name: str, problems: list[str]) -> str:
    more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
    return f"{name}: nothing was applied: " + "; ".join(problems[:10]) + more


def _stale(history: list[dict], sha: str) -> bool:
    """Whether a decision taken on the derivative with sha256 ``sha`` (a prefix) no longer applies: no row of
    the image has it, or a run has made the image again since (reviews since then are fine: they only
    revert faces, and applying the same file again must work)."""
    for i in range(len(history) - 1, -1, -1):
        if (history[i].get("out_sha256") or "").startswith(sha):
            return any(not r.get("review_id") for r in history[i + 1:])
    return True


def _changes(latest: dict[str, dict], history: dict[str, list[dict]], by_image: dict[str, dict[int, str]],
             shas: dict[str, str], name: str) -> dict[str, list[dict]]:
    """Each decided image's faces as the decisions make them; ConfigError listing every decision that cannot
    be applied."""
    problems, faces_of = [], {}
    for image_id, decided in sorted(by_image.items()):
        row = latest.get(image_id)
        if row is None:
            problems.append(f"{image_id}: no result for this image in the output")
            continue
        sha = shas.get(image_id)
        if sha and _stale(history[image_id], sha):
            problems.append(f"{image_id}: its derivative was made again since these decisions were taken "
                            f"(sha256 {(row.get('out_sha256') or '')[:16]}, not {sha[:16]}): review it again")
            continue
        faces = [dict(f) for f in row["faces"] or []]
        for i, decision in sorted(decided.items()):
            if row["status"] != Status.OK.value or i >= len(faces):
                problems.append(f"{image_id}: has no face {i} (status {row['status']}, {len(faces)} faces)")
                continue
            f = faces[i]
            if decision == "accepted" and f.get("action") == "reverted":
                problems.append(f"{image_id} face {i}: an earlier decision reverted it, so its restoration is no "
                                "longer in the derivative; to restore it again, process the image again with "
                                "--set review.carry_decisions=false --reprocess all")
                continue
            f["review"] = decision
            if decision == "rejected" and f.get("action") == "restored":
                f["action"] = "reverted"
        faces_of[image_id] = faces
    if problems:
        raise ConfigError(_refusal(name, problems))
    return faces_of


def _job_records(records: list[dict]) -> dict[str, dict]:
    """For each fingerprint, the record of the latest job run that made results with it: its settings
    decide how a derivative is encoded again."""
    own, other_device = {}, {}
    for r in records:
        if r.get("kind", "job") == "job" and r.get("fingerprint") and r.get("config"):
            own[r["fingerprint"]] = r
            # and those its rows carry when restored on another device than planned (job._execute); a run
            # that planned that fingerprint itself is the better source of its settings
            for fp in (r.get("device_fingerprints") or {}).values():
                other_device[fp] = r
    return {**other_device, **own}


def _software(record: dict, run_cfg: RunConfig) -> str:
    if record.get("software"):
        return record["software"]
    w = (record.get("weights") or {}).get(run_cfg.restore.model) or {}
    return metadata.software_label(run_cfg.restore.model, w.get("sha256"), bool(w.get("untrained")),
                                   (record.get("versions") or {}).get("archive_restore"))


def _as_layout(px: np.ndarray, like: np.ndarray) -> np.ndarray:
    """The derivative's pixels in the master's depth and channels (a grey master written as WebP, an RGBA
    one written as JPEG, a 16-bit one as an 8-bit JPEG): what Compose's encoder did, undone where it can be."""
    if px.dtype != like.dtype:
        px = imageio.to8(px) if like.dtype == np.uint8 else px.astype(np.uint16) * 257
    channels = 1 if like.ndim == 2 else like.shape[2]
    have = 1 if px.ndim == 2 else px.shape[2]
    if have == channels:
        return px
    colour = px if have == 1 else px[:, :, :3]
    if channels == 1:
        return cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY) if have > 1 else colour
    if have == 1:
        colour = cv2.cvtColor(colour, cv2.COLOR_GRAY2BGR)
    if channels == 4:  # the alpha is never restored: the master's
        return np.dstack([colour, like[:, :, 3]])
    return colour


def _error(row: dict, status: Status, message: str) -> None:
    log.warning("%s: %s", row["image_id"], message)
    row.update(status=status.value, error=message)


def _name_below(uri: str, root: str) -> str:
    """The name of a file below ``root`` from a row of a version that recorded only its URI; a URI elsewhere
    (the output copied since) names no file of this output."""
    name = storage.name_below(uri, root)
    if name is None:
        raise ValueError(f"{uri} is not below {root}; its row predates output_name: process the image again")
    return name


def _recompose(row: dict, faces: list[dict], compose, cfg: RunConfig, derivative: bytes) -> None:
    """The derivative made again for ``faces`` into ``compose.deferred`` (see the module docstring); ``row``
    becomes the new result. ``derivative``: the current derivative's bytes."""
    compose.read_master(row, changed="the master changed since it was restored: process it again first")
    if row["status"] != Status.OK.value:
        return
    master = row["src_bytes"]
    img = imageio.decode(master, compose.cfg.input.max_pixels)
    pixels = img.pixels.copy()
    derived = _as_layout(imageio.decode(derivative, compose.cfg.input.max_pixels).pixels, pixels)
    if derived.shape != pixels.shape:
        _error(row, Status.WRITE_ERROR, f"the derivative's size {derived.shape[:2]} differs from the master's "
                                        f"{pixels.shape[:2]}: cannot recompose it")
        return
    changed = []
    for f in faces:
        if f.get("action") == "restored":
            affine = align_matrix(np.asarray(f["landmarks"], np.float32).reshape(5, 2))
            ys, xs, mask, _ = paste_mask(pixels.shape, affine)
            sel = mask > 0
            pixels[ys, xs][sel] = derived[ys, xs][sel]
            changed.append((ys, xs, sel))
    row.update(src_format=img.format, _faces=faces, notes=None)
    name = row.get("output_name") or _name_below(row["output_uri"], compose.images_root)
    # The access copy as the row has it (its name and settings), whatever the run's settings said: runs with
    # and without access copies share a fingerprint, and a rejected face must leave both files.
    access = False
    if row.get("access_uri"):
        access_name = row.get("access_name") or _name_below(row["access_uri"], compose.access_root)
        access = (access_name, row.get("access_spec"))  # no spec (older rows): the run's settings, as Compose
    compose.write_derivative(row, img, pixels, faces, name=name, changed=changed, access=access)


class _Composers:
    """One Compose stage per fingerprint, with the settings of the run that made those derivatives; signing
    material for the derivatives a review signs again, from the review's own settings when they name a
    certificate (rotated or renewed keys), else the run's: loaded (``prepare``) before anything is written."""

    def __init__(self, records: dict[str, dict], cfg: RunConfig, out: str, review_id: str, fence):
        self.records, self.cfg, self.out, self.review_id, self.fence = records, cfg, out, review_id, fence
        self.stages: dict = {}
        self.signing: dict | None = None

    def get(self, fingerprint: str):
        from .stages import Compose

        if fingerprint not in self.stages:
            rec = self.records[fingerprint]
            run_cfg = RunConfig.model_validate({**rec["config"], "storage": self.cfg.storage.model_dump(),
                                                "output": {**rec["config"]["output"], "root": self.out}})
            self.stages[fingerprint] = Compose(run_cfg, self.review_id, fingerprint, bool(rec.get("untrained")),
                                               software=_software(rec, run_cfg), fence=self.fence,
                                               keep_row_fingerprint=True)
        return self.stages[fingerprint]

    def prepare(self, fingerprints: set[str]) -> None:
        """Signing material for the derivatives of ``fingerprints`` that will be signed again; one certificate
        per review (its record names it, for ``verify``)."""
        for fp in sorted(fingerprints):
            stage = self.get(fp)
            if stage.cfg.provenance.c2pa != "sign":
                continue
            p = self.cfg.provenance if self.cfg.provenance.cert_chain else stage.cfg.provenance
            stage.provenance = provenance.load(p.model_copy(update={"c2pa": "sign"}), self.cfg.storage)
            described = stage.provenance.describe()
            if self.signing and self.signing.get("serial") != described.get("serial"):
                raise ConfigError("the derivatives to sign again were signed with different certificates; name "
                                  "the one to use: --set provenance.cert_chain=... --set provenance.private_key=...")
            self.signing = described


def _read(uri: str, cfg: RunConfig) -> bytes:
    try:
        return storage.read_bytes(uri, cfg.storage)
    except FileNotFoundError:
        raise ConfigError(f"{uri} not found") from None


def _unfinished_reviews(records: list[dict], review_id: str) -> tuple[list[dict], set[str]]:
    """Earlier reviews that did not finish writing files (their record's ``in_flight``): the records and
    the images to check."""
    recs = [r for r in records if r.get("kind") == "review" and r.get("in_flight") and r.get("run_id") != review_id]
    return recs, {i for r in recs for i in r["in_flight"]}


def apply(output_root: str, decisions_uri: str, cfg: RunConfig) -> dict:
    """Apply a decisions file to the output; returns the review's record (see the module docstring)."""
    out = storage.normalize(output_root)
    data = _read(decisions_uri, cfg)
    decided, shas, for_output = parse(data, decisions_uri)
    if for_output and storage.normalize(for_output) != out:
        raise ConfigError(f"{decisions_uri} holds decisions for {for_output}, not {out}")
    if not ledger.result_files(out, cfg.storage):
        raise ConfigError(f"{out} holds no results: is it the output of a run?")
    by_image: dict[str, dict[int, str]] = defaultdict(dict)
    for (image_id, i), decision in decided.items():
        by_image[image_id][i] = decision
    review_id = runs.new_run_id() + "-review"  # sorts with the runs by start time
    lease = runs.Lease(out, cfg.storage, review_id, cfg.cluster.heartbeat_s).acquire()
    record = {"run_id": review_id, "kind": "review", "state": "running", "started_at": runs.now_iso(),
              "output": out, "decisions": decisions_uri, "decisions_sha256": hashlib.sha256(data).hexdigest(),
              "decided": len(decided), "lease_generation": lease.generation, "in_flight": []}
    composers, wrote = None, False
    try:
        lease.begin(record, cfg.cluster.takeover_grace_s)
        all_records = runs.read_records(out, cfg.storage)
        earlier, check = _unfinished_reviews(all_records, review_id)
        wanted = pa.array(sorted(set(by_image) | check), pa.string())
        rows = ledger.load_results(out, cfg.storage,
                                   transform=lambda t: t.filter(pc.is_in(t["image_id"], value_set=wanted)))
        history: dict[str, list[dict]] = defaultdict(list)
        for r in sorted(rows.to_pylist(), key=lambda r: r["finished_at"]):
            history[r["image_id"]].append(r)
        latest = {i: h[-1] for i, h in history.items()}
        faces_of = _changes(latest, history, by_image, shas, decisions_uri)
        unfinished = _check_unfinished(check & set(latest), latest, cfg)
        for image_id in unfinished:
            faces_of.setdefault(image_id, [dict(f) for f in latest[image_id]["faces"]])
        records = _job_records(all_records)
        missing = sorted({latest[i]["fingerprint"] for i in faces_of} - set(records))
        if missing:
            raise ConfigError(f"no run record holds the settings of fingerprint(s) {', '.join(missing)} (in "
                              f"{runs.runs_dir(out)}): cannot encode those derivatives again")
        fence = lease.fence()
        composers = _Composers(records, cfg, out, review_id, fence)
        recompose = {i for i, faces in faces_of.items() if i in unfinished or _reverts(latest[i], faces)}
        composers.prepare({latest[i]["fingerprint"] for i in recompose
                           if any(f.get("action") == "restored" for f in faces_of[i])})
        record["signing"] = composers.signing  # what `verify` checks re-signed derivatives against
        schema = pa.schema(list(RESULT_SCHEMA) + [f for f in rows.schema if f.name not in RESULT_SCHEMA.names])
        summary = {"images_changed": 0, "images_unchanged": 0, "images_finished": 0, "faces_reverted": 0,
                   "faces_rejected": 0, "faces_accepted": 0, "failed": [], "warnings": []}
        ids, left = list(faces_of), []
        for start in range(0, len(ids), _GROUP):
            group = ids[start:start + _GROUP]
            record["in_flight"] = left + group  # rows may land before files: the next review checks these
            runs.write_record(out, record, cfg.storage)
            wrote = True
            left += _apply_group(group, latest, faces_of, by_image, recompose, unfinished, composers, schema,
                                 review_id, out, cfg, fence, summary)
        record["in_flight"] = left  # rows written whose files are not: for the next review to finish
        runs.write_record(out, record, cfg.storage)
        for r in earlier:  # their images are settled now
            runs.write_record(out, {**r, "in_flight": [], "finished_by": review_id}, cfg.storage)
        record.update(state="finished", finished_at=runs.now_iso(), summary=summary)
    except BaseException as e:  # a refused file changed nothing (the refusal comes before any write)
        record.update(state="refused" if isinstance(e, ConfigError) and not wrote else "failed",
                      error=f"{type(e).__name__}: {e}", finished_at=runs.now_iso())
        raise
    finally:
        lease.end(record)
    return record


def _reverts(old: dict, faces: list[dict]) -> int:
    return sum(a.get("action") != b.get("action") for a, b in zip(old["faces"] or [], faces))


def _check_unfinished(ids: set[str], latest: dict[str, dict], cfg: RunConfig) -> dict[str, bytes]:
    """Of the images an earlier review left in flight, those whose derivative is not the one their row
    describes (its rows landed, its files did not), with the derivative's current bytes."""
    out = {}
    for image_id in sorted(ids):
        row = latest[image_id]
        if not row.get("review_id") or not row.get("output_uri"):
            continue  # that review's row never landed: nothing of it was written
        try:
            current = storage.read_bytes(row["output_uri"], cfg.storage)
        except FileNotFoundError:
            current = b""
        if hashlib.sha256(current).hexdigest() != row.get("out_sha256"):
            out[image_id] = current
    return out


def _apply_group(ids, latest, faces_of, by_image, recompose, unfinished, composers, schema, review_id, out, cfg,
                 fence, summary) -> list[str]:
    """One group: new rows and files in memory, then the rows, then the files (see the module docstring).
    Returns the images left unfinished: rows written whose files could not be, and images an earlier
    review left unfinished that this one could not finish either."""
    pending, files, counts, left = [], {}, {}, []
    for image_id in ids:
        old, faces = latest[image_id], faces_of[image_id]
        if image_id not in recompose and faces == old["faces"]:
            summary["images_unchanged"] += 1
            continue
        row = dict(old)
        t0, c0 = time.perf_counter(), time.process_time()
        if image_id in recompose:
            compose = None
            try:
                compose = composers.get(old["fingerprint"])
                compose.deferred = []
                current = unfinished[image_id] if image_id in unfinished else \
                    storage.read_bytes(old["output_uri"], cfg.storage)
                if image_id not in unfinished and hashlib.sha256(current).hexdigest() != old.get("out_sha256"):
                    # Not this tool's doing (an edit by hand, or a run stopped between a file and its row):
                    # its pixels cannot be trusted to hold the faces the row describes.
                    _error(row, Status.WRITE_ERROR, "the derivative differs from its result row (changed outside "
                           "archive-restore, or a run stopped between the file and its row): not overwritten; "
                           "process the image again")
                else:
                    _recompose(row, faces, compose, cfg, current)
                    files[image_id] = compose.deferred
            except (Fenced, provenance.SigningExpired):
                raise
            except Exception as e:  # this image keeps its current row and derivative
                log.exception("recomposing %s failed", image_id)
                _error(row, Status.WRITE_ERROR, f"cannot recompose: {type(e).__name__}: {e}")
            finally:
                if compose is not None:
                    compose.deferred = None
            if row["status"] != Status.OK.value:
                summary["failed"].append({"image_id": image_id, "error": row["error"]})
                files.pop(image_id, None)
                if image_id in unfinished:
                    left.append(image_id)  # still as an earlier review left it: stays in flight
                continue
            row["run_id"] = review_id  # its bytes (and their credentials) are the review's now
            row["derived_by"] = None  # and so is its access copy, whoever added the earlier one
        row["faces"] = [{k: f.get(k) for k in FACE_TYPE.names} for f in faces]
        for k in ("_faces", "src_bytes", "src_format"):
            row.pop(k, None)
        decided = ", ".join(f"{i} {d}" for i, d in sorted(by_image.get(image_id, {}).items()))
        note = f"curator review {review_id}: " + (f"face {decided}" if decided else "finished an interrupted review")
        row["notes"] = "; ".join(x for x in (old.get("notes"), note) if x)
        row.update(review_id=review_id, compose_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0,
                   finished_at=ledger.finished_after(old["finished_at"]))
        pending.append(row)
        counts[image_id] = (faces != old["faces"], _reverts(old, faces),
                            *(sum(a.get("review") != verb and b.get("review") == verb
                                  for a, b in zip(old["faces"], faces)) for verb in ("rejected", "accepted")))
    if not pending:
        return left
    fence.check()
    ledger.write_part(pa.Table.from_pylist(pending, schema=schema),
                      ledger.part_uri(out, review_id, [r["image_id"] for r in pending]), cfg.storage)
    for row in pending:
        image_id = row["image_id"]
        try:  # the derivative last: when its bytes match its row, so do its access copy
            for uri, area, payload in sorted(files.get(image_id, []), key=lambda w: w[1] == "images"):
                fence.check()
                try:
                    storage.write_bytes(uri, payload, cfg.storage)
                except Exception as e:
                    if area != "review":
                        raise
                    # The page would show the old crop, with the face the row says is reverted: remove it.
                    with contextlib.suppress(Exception):
                        storage.delete(uri, cfg.storage)
                    summary["warnings"].append(f"{image_id}: review crop {uri} not written ({type(e).__name__}: "
                                               f"{e}); the page shows none for it")
        except Fenced:
            raise
        except Exception as e:
            summary["failed"].append({"image_id": image_id, "error": f"{type(e).__name__}: {e}; its row is written: "
                                      "apply any decisions file to finish it"})
            left.append(image_id)
            continue
        changed, reverted, rejected, accepted = counts[image_id]
        summary["images_changed" if changed else "images_finished"] += 1
        summary["faces_reverted"] += reverted
        summary["faces_rejected"] += rejected
        summary["faces_accepted"] += accepted
    return left
