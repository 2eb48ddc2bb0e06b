"""Curator review without Ray: identity QA with real scores in the Restore stage, review crops, the
decisions file, and carried rejections."""

import json
import shutil

import cv2
import numpy as np
import pytest

from pipeline import decisions, imageio, review
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.stages import Compose, DecodeDetect, Restore

from conftest import IMAGES, need, test_overrides

PEOPLE = ["brad_1.jpg", "nicole_1.jpg"]


def _cfg(weights_dir, out, **extra):
    # The real identity model (ONNX ArcFace MobileFaceNet from ../shared/models): QA gives real verdicts.
    return load_config(None, test_overrides(weights_dir, out, **{"qa.identity_backend": "onnx",
                                                                  "output.format": "png", **extra}), environ={})


@pytest.fixture(scope="module")
def people(tmp_path_factory):
    src = tmp_path_factory.mktemp("people")
    for name in PEOPLE:
        shutil.copy(need(IMAGES / "identity" / name), src / name)
    return src


def _detect(cfg, src):
    batch = {"image_id": np.array([n.split(".")[0] for n in PEOPLE], object),
             "uri": np.array([str(src / n) for n in PEOPLE], object)}
    t = DecodeDetect(cfg, root=str(src) + "/")(batch)
    assert t["n_faces"].to_pylist() == [1, 1]  # one face each: the stand-ins below swap them
    return t


def _restore(cfg, detected, stand_in):
    stage = Restore(cfg)
    assert not stage.restorer.untrained  # real identity weights: verdicts are given
    stage.restorer.forward = stand_in  # replaces GFP-GAN only; the stage's QA rule and scorer are the real ones
    out = stage(detected)
    return out, [json.loads(r)["faces"][0] for r in out["faces_json"].to_pylist()]


def test_qa_passes_a_restorer_that_keeps_the_person(weights_dir, people, tmp_path):
    cfg = _cfg(weights_dir, tmp_path / "out")
    _, faces = _restore(cfg, _detect(cfg, people), lambda x: x)  # returns the input face
    assert [f["qa"] for f in faces] == ["pass", "pass"]
    assert all(f["identity_similarity"] > 0.9 for f in faces) and all(f["action"] == "restored" for f in faces)


def test_qa_flags_a_restorer_that_returns_another_person(weights_dir, people, tmp_path):
    cfg = _cfg(weights_dir, tmp_path / "out")
    _, faces = _restore(cfg, _detect(cfg, people), lambda x: x.flip(0))  # Brad gets Nicole's face and back
    assert [f["qa"] for f in faces] == ["flag", "flag"]
    assert all(f["identity_similarity"] < 0.3 for f in faces)
    assert all(f["action"] == "restored" for f in faces)  # on_low_identity=flag keeps the restoration


def _pixels(path):
    return imageio.decode(open(path, "rb").read(), 10**9).pixels


def test_keep_original_leaves_a_flagged_face_untouched(weights_dir, people, tmp_path):
    cfg = _cfg(weights_dir, tmp_path / "keep", **{"qa.on_low_identity": "keep_original"})
    restored, faces = _restore(cfg, _detect(cfg, people), lambda x: x.flip(0))
    assert [f["action"] for f in faces] == ["kept_original", "kept_original"]
    rows = Compose(cfg, "r", "f", False)(restored).to_pylist()
    for r, name in zip(rows, PEOPLE):
        assert r["status"] == "ok" and r["faces"][0]["action"] == "kept_original"
        assert np.array_equal(_pixels(r["output_uri"]), _pixels(people / name))
    # The same swap with on_low_identity=flag pastes the other person in: the check above can fail.
    cfg = _cfg(weights_dir, tmp_path / "flag")
    restored, _ = _restore(cfg, _detect(cfg, people), lambda x: x.flip(0))
    rows = Compose(cfg, "r", "f", False)(restored).to_pylist()
    assert not np.array_equal(_pixels(rows[0]["output_uri"]), _pixels(people / PEOPLE[0]))


def test_compose_writes_review_crops(weights_dir, people, tmp_path):
    cfg = _cfg(weights_dir, tmp_path / "out", **{"review.crop_size": 128})
    restored, _ = _restore(cfg, _detect(cfg, people), lambda x: x.flip(0))
    rows = Compose(cfg, "r", "f", False)(restored).to_pylist()
    for r, name in zip(rows, PEOPLE):
        f = r["faces"][0]
        assert f["review_before"] == str(tmp_path / "out" / "review" / name / "face-0-before.jpg")
        before, after = (cv2.imread(f[k]) for k in ("review_before", "review_after"))
        assert before.shape == after.shape and max(before.shape[:2]) <= 128
        # "before" is the master's region: cut the same box from the master and compare
        box = review.crop_box(f["bbox"], *_pixels(people / name).shape[1::-1])
        expect = cv2.imdecode(np.frombuffer(review.crop_jpeg(_pixels(people / name), box, 128, 88), np.uint8), 1)
        assert np.array_equal(before, expect)
        assert np.abs(before.astype(int) - after.astype(int)).mean() > 5  # the other person's face is visible
    off = _cfg(weights_dir, tmp_path / "off", **{"review.crops": False})
    rows = Compose(off, "r", "f", False)(restored).to_pylist()
    assert rows[0]["faces"][0]["review_before"] is None and not (tmp_path / "off" / "review").exists()


def test_review_settings_do_not_change_the_fingerprint(weights_dir, tmp_path):
    base = _cfg(weights_dir, tmp_path)
    for extra in ({"review.crops": False}, {"review.crop_size": 512}, {"review.carry_decisions": False}):
        assert _cfg(weights_dir, tmp_path, **extra).fingerprint({}) == base.fingerprint({})


def test_rejections_are_matched_by_box_overlap():
    rejected = review.rejected_boxes([{"bbox": [10, 10, 50, 50], "review": "rejected"},
                                      {"bbox": [100, 100, 150, 150], "review": "accepted"}, {"bbox": [0, 0, 1, 1]}])
    assert json.loads(rejected) == [[10, 10, 50, 50]]
    records = [{"bbox": [12, 11, 52, 49]}, {"bbox": [100, 100, 150, 150]}, {"bbox": [40, 40, 90, 90]}]
    assert review.mark_rejected(records, rejected) == 1
    assert [r.get("review") for r in records] == ["rejected", None, None]
    assert review.rejected_boxes([{"bbox": [1, 1, 2, 2], "review": "accepted"}]) is None


def test_decisions_file_csv_and_json():
    csv = b"\xef\xbb\xbfimage_id,face,decision,note\nabc,0,reject,\nabc,1,Accept,fine\n\"x,y\",2,rejected,\n"
    assert decisions.parse(csv, "d.csv") == ({("abc", 0): "rejected", ("abc", 1): "accepted", ("x,y", 2): "rejected"},
                                             {}, None)
    js = json.dumps({"output": "s3://m/out", "decisions": [
        {"image_id": "abc", "face": 0, "decision": "reject", "derivative_sha256": "ABCD"}]}).encode()
    assert decisions.parse(js, "d.json") == ({("abc", 0): "rejected"}, {"abc": "abcd"}, "s3://m/out")
    assert decisions.parse(b'[{"image_id": "a", "face": "3", "decision": "accept"}]', "x")[0] == {("a", 3): "accepted"}


@pytest.mark.parametrize("data,message", [
    (b"image,face\na,0\n", "must name image_id, face and decision (missing: decision, image_id)"),
    (b"image_id,face,decision\na,zero,reject\n", "line 2: face 'zero' is not a face number"),
    (b"image_id,face,decision\na,-1,reject\n", "line 2: face '-1' is not a face number"),
    (b"image_id,face,decision\na,0,maybe\n", "line 2: needs an image_id and a decision of accept or reject"),
    (b"image_id,face,decision\na,0,reject\nb,0,accept\na,0,accept\n", "line 4: face 0 of a is both accepted and rejected"),
    (b"[1, 2]", "line 1: not an object"),
    (b"{not json", "not valid JSON"),
])
def test_bad_decisions_files_are_refused_naming_the_line(data, message):
    with pytest.raises(ConfigError, match="nothing was applied|must name|not valid JSON") as e:
        decisions.parse(data, "d.csv")
    assert message in str(e.value)


def test_a_large_crop_previews_as_its_full_area_average_would():
    """A crop many times the preview's size is sampled before INTER_AREA (a preview, not an archival
    derivative): same size as the full average, and within a level of it on a real photo (measured 0.36-0.58
    on average; sampling each cell's corner instead of its centre, a shifted preview, measured 1.4)."""
    px = cv2.imread(str(need(IMAGES / "whole/gfpgan_Blake_Lively.jpg")))
    px = cv2.resize(px, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)  # a face ~2,000 px wide
    h, w = px.shape[:2]
    for box, size in [((0, 0, w, h), 256), ((37, 11, 2100, 1900), 256), ((5, 5, 300, 200), 256), ((0, 0, 9, 1500), 64)]:
        got = review.crop_preview(px, box, size)
        x0, y0, x1, y1 = box
        f = size / max(x1 - x0, y1 - y0)
        full = px[y0:y1, x0:x1]
        if f < 1:
            full = cv2.resize(full, (max(1, round((x1 - x0) * f)), max(1, round((y1 - y0) * f))), interpolation=cv2.INTER_AREA)
        assert got.shape == full.shape, box
        assert np.abs(got.astype(int) - full.astype(int)).mean() < 1.0, box
    for box in [(0, 0, 1, 2000), (0, 0, 3, 3000), (0, 0, 2799, 2), (7, 9, 8, 10)]:  # thinner than a cell
        x0, y0, x1, y1 = box
        f = min(1.0, 64 / max(x1 - x0, y1 - y0))
        assert review.crop_preview(px, box, 64).shape == (max(1, round((y1 - y0) * f)), max(1, round((x1 - x0) * f)), 3)
    grey16 = cv2.cvtColor(px, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257
    assert review.crop_preview(grey16, (0, 0, w, h), 256).shape == (170, 256, 3)
