"""`review apply` on outputs built by calling the stages (no Ray): signed outputs, master layouts, clocks,
interrupted reviews, stale or misdirected files; and the review page's links."""

import hashlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline import decisions, imageio, ledger, provenance, report, resume, runs, storage
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.stages import Compose, DecodeDetect, Restore

from conftest import IMAGES, need, test_overrides
from test_provenance import make_pki

RUN = "20240101T000000Z-aaaaaa"


def _invert(x):
    return -x  # a visible "restoration" (colours inverted), so a revert is visible too


def build(weights_dir, out: Path, files: dict, pki=None, **extra) -> tuple:
    """An output as a job makes it: DecodeDetect, Restore (GFP-GAN replaced by ``_invert``), Compose, the
    batch's result file and the run record."""
    o = {"qa.identity_backend": "onnx", "output.format": "png", **extra}
    if pki:
        o.update({"provenance.c2pa": "sign", "provenance.cert_chain": str(pki["chain"]),
                  "provenance.private_key": str(pki["key"])})
    cfg = load_config(None, test_overrides(weights_dir, out, **o), environ={})
    src = next(iter(files.values())).parent
    batch = {"image_id": np.array(list(files), object), "uri": np.array([str(f) for f in files.values()], object)}
    restore = Restore(cfg)
    restore.restorer.forward = _invert
    material = provenance.load(cfg.provenance, cfg.storage)
    rows = Compose(cfg, RUN, "fp-test", False, software="archive-restore test", provenance=material)(
        restore(DecodeDetect(cfg, root=str(src) + "/")(batch)))
    assert set(rows["status"].to_pylist()) == {"ok"}
    ledger.write_part(rows, ledger.part_uri(str(out), RUN, rows["image_id"].to_pylist()), cfg.storage)
    runs.write_record(str(out), {"run_id": RUN, "kind": "job", "state": "finished", "fingerprint": "fp-test",
                                 "config": cfg.model_dump(mode="json"), "software": "archive-restore test",
                                 "signing": material.describe() if material else None,
                                 "started_at": "2024-01-01T00:00:00+00:00", "lease_generation": 0}, cfg.storage)
    return cfg, {r["image_id"]: r for r in rows.to_pylist()}


def _apply(out, lines, cfg, tmp_path, name="d.csv", header="image_id,face,decision"):
    p = tmp_path / name
    p.write_text(header + "\n" + "".join(x + "\n" for x in lines))
    return decisions.apply(str(out), str(p), cfg)


def _latest(out, cfg):
    t = resume.latest_rows(ledger.load_results(str(out), cfg.storage))
    return {r["image_id"]: r for r in t.to_pylist()}


def _px(path):
    return imageio.decode(Path(path).read_bytes(), 10**9).pixels


@pytest.fixture
def people(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("brad_1.jpg", "nicole_1.jpg"):  # one face each
        (src / name).write_bytes(need(IMAGES / "identity" / name).read_bytes())
    (src / "blake.jpg").write_bytes(need(IMAGES / "whole/gfpgan_Blake_Lively.jpg").read_bytes())  # two faces
    return {"brad": src / "brad_1.jpg", "nicole": src / "nicole_1.jpg", "blake": src / "blake.jpg"}


def test_signed_output_stays_verifiable_through_accepts_and_reverts(weights_dir, people, tmp_path):
    pki = make_pki(tmp_path / "pki")
    out = tmp_path / "out"
    cfg, rows = build(weights_dir, out, people, pki=pki, **{"output.access_copy": True})
    assert provenance.verify_output(str(out), cfg.storage, pki["ca"].read_bytes())["valid"] == 6
    # Accepting changes no file: the row keeps the run that wrote (and signed) the bytes.
    rec = _apply(out, ["brad,0,accept"], cfg, tmp_path)
    new = _latest(out, cfg)["brad"]
    assert (new["run_id"], new["review_id"], new["faces"][0]["review"]) == (RUN, rec["run_id"], "accepted")
    # Rejecting one of two faces: the derivative is made and signed again by the review.
    rec = _apply(out, ["blake,0,reject", "nicole,0,reject"], cfg, tmp_path)
    assert rec["summary"]["faces_reverted"] == 2
    latest = _latest(out, cfg)
    assert latest["blake"]["run_id"] == rec["run_id"] and latest["blake"]["c2pa_signed"] is True
    assert latest["nicole"]["c2pa_signed"] is None  # no restored face left: no credentials, no label
    assert rec["signing"]["serial"]  # the certificate the review signed with, for `verify`
    v = provenance.verify_output(str(out), cfg.storage, pki["ca"].read_bytes())
    assert v["invalid"] == 0 and v["valid"] == 4, v  # brad and blake, each with its access copy


def test_an_accept_only_review_needs_no_signing_key(weights_dir, people, tmp_path):
    pki = make_pki(tmp_path / "pki")
    out = tmp_path / "out"
    cfg, _ = build(weights_dir, out, {"brad": people["brad"]}, pki=pki)
    pki["key"].unlink()  # rotated away since the run
    assert _apply(out, ["brad,0,accept"], cfg, tmp_path)["summary"]["faces_accepted"] == 1
    # A revert that leaves a face restored must sign again: without the key it is refused before any change.
    out2 = tmp_path / "out2"
    cfg2, rows = build(weights_dir, out2, {"blake": people["blake"]}, pki=make_pki(tmp_path / "p2"))
    (tmp_path / "p2" / "key.pem").unlink()
    derivative = Path(rows["blake"]["output_uri"]).read_bytes()
    with pytest.raises(ConfigError, match="key"):
        _apply(out2, ["blake,0,reject"], cfg2, tmp_path)
    assert [r["state"] for r in runs.read_records(str(out2), cfg2.storage) if r.get("kind") == "review"] == ["refused"]
    assert _latest(out2, cfg2)["blake"]["faces"][0]["action"] == "restored"
    assert Path(rows["blake"]["output_uri"]).read_bytes() == derivative
    # ... unless the review's own settings name the new key and certificate
    new = make_pki(tmp_path / "p3")
    renewed = cfg2.model_copy(update={"provenance": cfg2.provenance.model_copy(
        update={"cert_chain": str(new["chain"]), "private_key": str(new["key"])})})
    rec = _apply(out2, ["blake,0,reject"], renewed, tmp_path)
    assert rec["summary"]["faces_reverted"] == 1 and rec["signing"]["serial"]
    assert provenance.verify_output(str(out2), cfg2.storage, new["ca"].read_bytes())["invalid"] == 0


def _master(tmp_path, name, pixels):
    src = tmp_path / "masters"
    src.mkdir(exist_ok=True)
    path = src / name
    cv2.imwrite(str(path), pixels)
    return path


@pytest.mark.parametrize("kind,fmt", [("rgba", "jpeg"), ("grey", "webp"), ("rgb16", "jpeg"), ("grey16", "png"),
                                      ("rgba", "same")])
def test_reverting_works_whatever_the_masters_layout(weights_dir, tmp_path, kind, fmt):
    bgr = cv2.imread(str(need(IMAGES / "whole/gfpgan_Blake_Lively.jpg")))  # two faces: one rejected, one kept
    alpha = np.linspace(255, 64, bgr.shape[1]).astype(np.uint8)[None].repeat(bgr.shape[0], 0)
    px = {"rgba": lambda: np.dstack([bgr, alpha]), "grey": lambda: cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY),
          "rgb16": lambda: bgr.astype(np.uint16) * 257,
          "grey16": lambda: cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257}[kind]()
    master = _master(tmp_path, "m.png", px)
    out = tmp_path / "out"
    cfg, rows = build(weights_dir, out, {"m": master}, **{"output.format": fmt})
    before = _px(rows["m"]["output_uri"]).astype(np.float64)
    rec = _apply(out, ["m,0,reject"], cfg, tmp_path)
    assert rec["summary"]["failed"] == [] and rec["summary"]["faces_reverted"] == 1
    after = _px(rows["m"]["output_uri"]).astype(np.float64)
    ref = imageio.decode(master.read_bytes(), 10**9).pixels.astype(np.float64)
    if after.dtype != ref.dtype or after.max() <= 255 < ref.max():
        ref = ref / 257
    if ref.ndim == 3 and after.ndim == 3 and after.shape[2] != ref.shape[2]:
        ref = ref[:, :, :after.shape[2]]
    if ref.ndim == 2 and after.ndim == 3:  # a grey master written in a colour format
        after, before = after[:, :, 1], before[:, :, 1]
    lossy = fmt in ("jpeg", "webp")

    def region(face):
        x1, y1, x2, y2 = (int(v) for v in face["bbox"])
        return slice(y1, y2), slice(x1, x2)
    gone, kept = region(rows["m"]["faces"][0]), region(rows["m"]["faces"][1])
    assert np.abs(before[gone] - ref[gone]).mean() > 30 * (257 if ref.max() > 255 else 1)  # it was restored
    assert np.abs(after[gone] - ref[gone]).mean() < (3 if lossy else 1e-9) * (257 if ref.max() > 255 else 1)
    assert np.abs(after[kept] - before[kept]).mean() < (3 if lossy else 1e-9) * (257 if ref.max() > 255 else 1)
    if after.ndim == 3 and after.shape[2] == 4:
        assert np.array_equal(after[:, :, 3], ref[:, :, 3])  # the master's alpha, untouched


def test_a_review_is_latest_even_on_a_machine_whose_clock_is_behind(weights_dir, people, tmp_path):
    out = tmp_path / "out"
    cfg, _ = build(weights_dir, out, {"brad": people["brad"]})
    part = ledger.result_files(str(out), cfg.storage)[0]
    t = ledger.load_results(str(out), cfg.storage)
    ahead = pa.array([datetime.now(timezone.utc) + timedelta(hours=2)], pa.timestamp("ms", tz="UTC"))
    ledger.write_part(t.set_column(t.schema.get_field_index("finished_at"), "finished_at", ahead), part, cfg.storage)
    rec = _apply(out, ["brad,0,reject"], cfg, tmp_path)
    latest = _latest(out, cfg)["brad"]
    assert latest["review_id"] == rec["run_id"] and latest["faces"][0]["action"] == "reverted"


def test_an_interrupted_review_is_finished_by_the_next_apply(weights_dir, people, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg, rows = build(weights_dir, out, {"blake": people["blake"]})
    restored = Path(rows["blake"]["output_uri"]).read_bytes()
    sha = rows["blake"]["out_sha256"][:16]
    real = storage.write_bytes

    def no_derivatives(uri, data, c):
        if "/images/" in uri:
            raise OSError("disk full")
        return real(uri, data, c)

    monkeypatch.setattr(storage, "write_bytes", no_derivatives)
    page = ["image_id,face,decision,derivative_sha256", f"blake,1,reject,{sha}"]  # as the page exports it
    rec = _apply(out, page[1:], cfg, tmp_path, header=page[0])
    assert "apply any decisions file to finish it" in rec["summary"]["failed"][0]["error"]
    assert rec["in_flight"] == ["blake"]  # the record says which images may be unfinished
    assert report.status(str(out), cfg.storage)["unfinished_reviews"] == [rec["run_id"]]
    assert Path(rows["blake"]["output_uri"]).read_bytes() == restored  # the row went first; the file did not
    assert _latest(out, cfg)["blake"]["faces"][1]["action"] == "reverted"
    monkeypatch.setattr(storage, "write_bytes", real)
    # Any later review finishes it; here the same page export, which must still apply.
    rec2 = _apply(out, page[1:], cfg, tmp_path, header=page[0])
    assert rec2["summary"]["images_finished"] == 1 and rec2["summary"]["failed"] == []
    assert report.status(str(out), cfg.storage)["unfinished_reviews"] == []
    now, master = _px(rows["blake"]["output_uri"]), _px(people["blake"])
    old = imageio.decode(restored, 10**9).pixels
    changed_before, changed_now = (old != master).any(-1), (now != master).any(-1)
    assert changed_now.sum() < changed_before.sum() * 0.8 and not (changed_now & ~changed_before).any()
    latest = _latest(out, cfg)["blake"]
    assert latest["out_sha256"] == hashlib.sha256(Path(rows["blake"]["output_uri"]).read_bytes()).hexdigest()
    # and once finished, the same file changes nothing
    assert _apply(out, page[1:], cfg, tmp_path, header=page[0])["summary"]["images_unchanged"] == 1


def test_an_interrupted_review_is_finished_by_a_file_about_other_images(weights_dir, people, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg, rows = build(weights_dir, out, {"blake": people["blake"], "brad": people["brad"]})
    real = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes",
                        lambda uri, data, c: (_ for _ in ()).throw(OSError("gone")) if "/images/" in uri
                        else real(uri, data, c))
    _apply(out, ["blake,0,reject"], cfg, tmp_path)
    monkeypatch.setattr(storage, "write_bytes", real)
    rec = _apply(out, [], cfg, tmp_path)  # a file with its header only
    assert rec["summary"]["images_finished"] == 1
    assert _latest(out, cfg)["blake"]["out_sha256"] == \
        hashlib.sha256(Path(rows["blake"]["output_uri"]).read_bytes()).hexdigest()


def test_a_review_crop_that_cannot_be_written_does_not_block_the_revert(weights_dir, people, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg, rows = build(weights_dir, out, {"brad": people["brad"]})
    after = Path(rows["brad"]["faces"][0]["review_after"])
    assert after.exists()
    real = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes",
                        lambda uri, data, c: (_ for _ in ()).throw(OSError("no space")) if "/review/" in uri
                        else real(uri, data, c))
    rec = _apply(out, ["brad,0,reject"], cfg, tmp_path)
    assert rec["summary"]["failed"] == [] and "review crop" in rec["summary"]["warnings"][0]
    assert np.array_equal(_px(rows["brad"]["output_uri"]), _px(people["brad"]))
    assert not after.exists()  # the old crop showed the reverted face: gone rather than wrong


def test_an_image_an_earlier_review_left_unfinished_stays_in_flight_until_finished(weights_dir, people, tmp_path,
                                                                                  monkeypatch):
    out = tmp_path / "out"
    cfg, rows = build(weights_dir, out, {"blake": people["blake"]})
    real = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes",
                        lambda uri, data, c: (_ for _ in ()).throw(OSError("gone")) if "/images/" in uri
                        else real(uri, data, c))
    first = _apply(out, ["blake,0,reject"], cfg, tmp_path)
    monkeypatch.setattr(storage, "write_bytes", real)
    master = people["blake"].read_bytes()
    people["blake"].write_bytes(master + b"\0")  # the master changed meanwhile: this review cannot finish it
    second = _apply(out, [], cfg, tmp_path)
    assert second["in_flight"] == ["blake"] and "master changed" in second["summary"]["failed"][0]["error"]
    assert report.status(str(out), cfg.storage)["unfinished_reviews"] == [second["run_id"]]
    people["blake"].write_bytes(master)
    third = _apply(out, [], cfg, tmp_path)
    assert third["summary"]["images_finished"] == 1 and third["in_flight"] == []
    assert report.status(str(out), cfg.storage)["unfinished_reviews"] == []
    assert first["run_id"] != second["run_id"] != third["run_id"]


def test_a_derivative_changed_outside_the_tool_is_not_overwritten(weights_dir, people, tmp_path):
    out = tmp_path / "out"
    cfg, rows = build(weights_dir, out, {"brad": people["brad"]})
    edited = Path(rows["brad"]["output_uri"])
    edited.write_bytes(cv2.imencode(".png", 255 - _px(edited))[1].tobytes())
    rec = _apply(out, ["brad,0,reject"], cfg, tmp_path)
    assert "differs from its result row" in rec["summary"]["failed"][0]["error"]
    assert _latest(out, cfg)["brad"]["faces"][0]["action"] == "restored" and rec["in_flight"] == []


def test_a_review_at_work_is_not_called_unfinished(weights_dir, people, tmp_path):
    out = tmp_path / "out"
    cfg, _ = build(weights_dir, out, {"brad": people["brad"]})
    lease = runs.Lease(str(out), cfg.storage, "20990101T000000Z-aaaaaa-review", 10.0).acquire()
    runs.write_record(str(out), {"run_id": lease.run_id, "kind": "review", "state": "running",
                                 "in_flight": ["brad"], "lease_generation": lease.generation}, cfg.storage)
    assert report.status(str(out), cfg.storage)["unfinished_reviews"] == []
    lease.release()  # ... but once it holds the output no more, its record's images are in doubt
    assert report.status(str(out), cfg.storage)["unfinished_reviews"] == [lease.run_id]


def test_stale_misdirected_and_missing_files_are_refused(weights_dir, people, tmp_path):
    out = tmp_path / "out"
    cfg, rows = build(weights_dir, out, {"brad": people["brad"]})
    sha = rows["brad"]["out_sha256"]
    with pytest.raises(ConfigError, match="made again since these decisions were taken"):
        _apply(out, ["brad,0,reject,0000aaaa"], cfg, tmp_path, header="image_id,face,decision,derivative_sha256")
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"output": str(tmp_path / "elsewhere"), "decisions": [
        {"image_id": "brad", "face": 0, "decision": "reject", "derivative_sha256": sha[:16]}]}))
    with pytest.raises(ConfigError, match="holds decisions for"):
        decisions.apply(str(out), str(p), cfg)
    with pytest.raises(ConfigError, match="not found"):
        decisions.apply(str(out), str(tmp_path / "nope.csv"), cfg)
    with pytest.raises(ConfigError, match="holds no results"):
        _apply(tmp_path / "typo", ["brad,0,reject"], cfg, tmp_path)
    assert not (tmp_path / "typo").exists()  # no lease, no record left in a mistyped folder
    assert _latest(out, cfg)["brad"]["faces"][0]["review"] is None
    # the right sha prefix, from the page: applied
    rec = _apply(out, [f"brad,0,reject,{sha[:16]}"], cfg, tmp_path, header="image_id,face,decision,derivative_sha256")
    assert rec["summary"]["faces_reverted"] == 1 and rec["run_id"].endswith("-review") and "lease_generation" in rec


def test_a_spreadsheets_utf16_export_is_read():
    data = "image_id,face,decision\r\nabc,0,reject\r\n".encode("utf-16")
    assert decisions.parse(data, "d.csv")[0] == {("abc", 0): "rejected"}
    with pytest.raises(ConfigError, match="not UTF-8"):
        decisions.parse("image_id,face,decision\nä,0,reject\n".encode("latin-1"), "d.csv")


def test_status_after_a_review_still_counts_current_images(weights_dir, people, tmp_path):
    out = tmp_path / "out"
    cfg, _ = build(weights_dir, out, {"brad": people["brad"]})
    _apply(out, ["brad,0,reject"], cfg, tmp_path)
    manifest = pa.table({"image_id": ["brad"], "uri": [str(people["brad"])]})
    st = report.status(str(out), cfg.storage, manifest, fingerprint=None)
    assert st["against_manifest"]["current"] == 1 and st["against_manifest"]["outdated"] == 0
    assert [r["kind"] for r in st["runs"]] == ["job", "review"]


def test_the_page_links_only_what_a_browser_may_open():
    out = "/data/out"
    assert report._link("/data/out/review/a b#1.jpg/face-0-before.jpg", out) == "../review/a%20b%231.jpg/face-0-before.jpg"
    assert report._link("/scans/x y.jpg", out) == "file:///scans/x%20y.jpg"
    assert report._link("https://museum.example/a.jpg", out) == "https://museum.example/a.jpg"
    for uri in ("javascript://%0aalert(1)", "JavaScript:alert(1)", "data:text/html,x", "s3://bucket/a.jpg", "a.jpg"):
        assert report._link(uri, out) is None, uri
    t = pa.Table.from_pylist([{"image_id": "x", "uri": "javascript://%0aalert(document.cookie)", "status": "read_error",
                               "error": "</script><script>alert(1)</script>", "finished_at": datetime.now(timezone.utc),
                               "fingerprint": "f"}])
    data = report.page_data(out, t)
    assert data["failed"] == [["x", "read_error", "</script><script>alert(1)</script>", None,
                               "javascript://%0aalert(document.cookie)"]]


def test_reverting_a_blocks_mode_jpeg_gives_back_the_masters_blocks(weights_dir, people, tmp_path):
    """output.jpeg_mode=blocks: a rejected face's blocks become the master's again (not a re-encoding of its
    pixels); with every face rejected the derivative holds the master's coefficients throughout."""
    import jpeglib

    out = tmp_path / "out"
    cfg, rows = build(weights_dir, out, {"blake": people["blake"]},
                      **{"output.format": "same", "output.jpeg_mode": "blocks"})

    def coefficients(path):
        m = jpeglib.read_dct(str(path))
        return [m.Y, m.Cb, m.Cr]

    master = coefficients(people["blake"])
    uri = rows["blake"]["output_uri"]
    assert not all(np.array_equal(a, b) for a, b in zip(master, coefficients(uri)))
    rec = _apply(out, ["blake,0,reject", "blake,1,reject"], cfg, tmp_path)
    assert rec["summary"]["failed"] == [] and rec["summary"]["faces_reverted"] == 2
    assert "re-encoded" not in (_latest(out, cfg)["blake"]["notes"] or "")
    assert all(np.array_equal(a, b) for a, b in zip(master, coefficients(uri)))


def test_a_rejected_face_leaves_the_access_copy_too_whatever_a_later_run_said(weights_dir, people, tmp_path):
    """Runs with and without access copies share a fingerprint: the review recomposes with the latest such
    run's settings, which here had access copies off. The row's access copy is made again all the same
    (its name and settings from the row), so the restored face leaves both files and the row holds."""
    import cv2

    out = tmp_path / "out"
    cfg, rows = build(weights_dir, out, {"brad": people["brad"]}, **{"output.access_copy": True,
                                                                    "output.access_long_side": 96})
    before = rows["brad"]
    later = cfg.model_copy(update={"output": cfg.output.model_copy(update={"access_copy": False})})
    runs.write_record(str(out), {"run_id": "20240201T000000Z-bbbbbb", "kind": "job", "state": "finished",
                                 "fingerprint": "fp-test", "config": later.model_dump(mode="json"),
                                 "software": "archive-restore test", "started_at": "2024-02-01T00:00:00+00:00",
                                 "lease_generation": 1}, cfg.storage)
    assert _apply(out, ["brad,0,reject"], cfg, tmp_path)["state"] == "finished"
    after = _latest(out, cfg)["brad"]
    access = (out / "access" / after["access_name"]).read_bytes()
    assert after["access_name"] == before["access_name"] and after["access_spec"] == "96px q85"
    assert hashlib.sha256(access).hexdigest() == after["access_sha256"] != before["access_sha256"]
    a = imageio.decode(access, 10**9).pixels.astype(int)
    derivative = imageio.decode((out / "images" / after["output_name"]).read_bytes(), 10**9).pixels
    small = cv2.resize(derivative, (a.shape[1], a.shape[0]), interpolation=cv2.INTER_AREA).astype(int)
    assert abs(a - small).mean() < 3  # the reverted derivative, small


def test_an_access_copy_added_to_a_signed_derivative_verifies(weights_dir, people, tmp_path):
    """derive.py signs the copy with the derivative as its parent and names the run that made it; the row
    keeps the derivative's run and says which run added the copy (``derived_by``), and verify checks the
    copy against that run and its certificate."""
    from pipeline.derive import AddAccessCopy
    from pipeline.stages import Compose

    pki = make_pki(tmp_path / "pki")
    out = tmp_path / "out"
    cfg, rows = build(weights_dir, out, {"blake": people["blake"]}, pki=pki)  # signed, without access copies
    on = cfg.model_copy(update={"output": cfg.output.model_copy(update={"access_copy": True})})
    material = provenance.load(on.provenance, on.storage)
    added_by = "20240301T000000Z-cccccc"
    runs.write_record(str(out), {"run_id": added_by, "kind": "job", "state": "finished", "fingerprint": "fp-test",
                                 "config": on.model_dump(mode="json"), "signing": material.describe(),
                                 "started_at": "2024-03-01T00:00:00+00:00", "lease_generation": 1}, on.storage)
    stage = AddAccessCopy(Compose(on, added_by, "fp-test", False, software="archive-restore test",
                                  provenance=material))
    done, failed = stage(pa.Table.from_pylist(list(_latest(out, cfg).values())))
    assert failed == [] and done.num_rows == 1
    ledger.write_part(done, ledger.part_uri(str(out), added_by, ["blake"]), on.storage)
    v = provenance.verify_output(str(out), cfg.storage, pki["ca"].read_bytes())
    assert (v["files"], v["valid"], v["invalid"]) == (2, 2, 0), v["invalid_files"]
    # A review then makes both files again (one face stays restored, so both stay signed): both are the
    # review's, and verify says so.
    assert _apply(out, ["blake,0,reject"], on, tmp_path)["state"] == "finished"
    after = _latest(out, cfg)["blake"]
    assert after["derived_by"] is None and after["access_uri"]
    v = provenance.verify_output(str(out), cfg.storage, pki["ca"].read_bytes())
    assert (v["files"], v["valid"], v["invalid"]) == (2, 2, 0), v["invalid_files"]


def test_rows_restored_on_another_device_than_planned_find_their_runs_settings():
    """A run's rows carry its planned fingerprint or, when an actor restored on another device, that
    device's (job._execute records both): decisions find the run's settings by either."""
    from pipeline.decisions import _job_records

    old = {"run_id": "r0", "kind": "job", "fingerprint": "a", "config": {"x": 0}}
    new = {"run_id": "r1", "kind": "job", "fingerprint": "b-cuda", "config": {"x": 1},
           "device_fingerprints": {"cuda": "b-cuda", "cpu": "b-cpu"}}
    review = {"run_id": "v", "kind": "review", "fingerprint": "b-cpu", "config": {"x": 2}}
    by_fp = _job_records([old, new, review])
    assert by_fp["a"] is old and by_fp["b-cuda"] is new and by_fp["b-cpu"] is new
    # a later run whose other-device fingerprint is an earlier run's own: the run that planned it wins
    later = {"run_id": "r2", "kind": "job", "fingerprint": "c-cuda", "config": {"x": 3},
             "device_fingerprints": {"cuda": "c-cuda", "cpu": "a"}}
    assert _job_records([old, later])["a"] is old and _job_records([later, old])["a"] is old
