"""Access copies made from derivatives (derive.py), called directly: no Ray."""

import hashlib

import cv2
import numpy as np
import pyarrow as pa

from pipeline import imageio
from pipeline.config import OutputConfig, RunConfig
from pipeline.derive import AddAccessCopy
from pipeline.schema import RESULT_SCHEMA
from pipeline.stages import Compose


def _setup(tmp_path, long_side=32):
    master = tmp_path / "in" / "a.png"
    master.parent.mkdir()
    y, x = np.mgrid[0:60, 0:90]
    px = np.stack([x * 2, y * 3, (x + y)], -1).astype(np.uint8)  # smooth: JPEG keeps it within a few levels
    cv2.imwrite(str(master), px)
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    derivative = cv2.imencode(".png", px[:, ::-1].copy())[1].tobytes()  # stands for the restored image
    (out / "images" / "a.png").write_bytes(derivative)
    cfg = RunConfig(output=OutputConfig(root=str(out), access_copy=True, access_long_side=long_side))
    row = {"image_id": "a", "uri": str(master), "status": "ok", "output_key": "a.png", "output_name": "a.png",
           "output_uri": str(out / "images" / "a.png"), "src_sha256": hashlib.sha256(master.read_bytes()).hexdigest(),
           "out_sha256": hashlib.sha256(derivative).hexdigest(), "faces": [], "run_id": "r0", "fingerprint": "f",
           "notes": None}
    return cfg, row, out, px


def _stage(cfg, provenance=None):
    return AddAccessCopy(Compose(cfg, "r1", "f", False, provenance=provenance))


def test_an_access_copy_from_the_derivative_and_the_row_again(tmp_path):
    cfg, row, out, px = _setup(tmp_path)
    rows, failed = _stage(cfg)(pa.Table.from_pylist([row], schema=RESULT_SCHEMA))
    assert failed == [] and rows.num_rows == 1
    r = rows.to_pylist()[0]
    assert (r["access_name"], r["access_spec"], r["run_id"], r["fingerprint"]) == ("a.jpg", "32px q85", "r0", "f")
    assert r["derived_by"] == "r1"
    got = imageio.decode((out / "access" / "a.jpg").read_bytes(), 10**9).pixels
    assert got.shape == (21, 32, 3)
    want = cv2.resize(px[:, ::-1], (32, 21), interpolation=cv2.INTER_AREA)  # the derivative's, not the master's
    assert abs(got.astype(int) - want).mean() < 3


def test_an_image_that_cannot_be_derived_keeps_its_row_and_says_why(tmp_path):
    cfg, row, out, _ = _setup(tmp_path)
    changed = dict(row, out_sha256="0" * 64)
    gone = dict(row, image_id="b", output_name="b.png")
    signed = dict(row, image_id="c", c2pa_signed=True)
    moved = dict(row, image_id="d", src_sha256="1" * 64)
    rows, failed = _stage(cfg)(pa.Table.from_pylist([changed, gone, signed, moved], schema=RESULT_SCHEMA))
    assert rows.num_rows == 0 and not (out / "access").exists()
    reasons = dict(failed)
    assert "derivative" in reasons["a"] and "not the one its result row describes" in reasons["a"]
    assert "missing" in reasons["b"]
    assert "provenance.c2pa=sign" in reasons["c"]
    assert "master" in reasons["d"] and "not the one" in reasons["d"]


def test_rows_written_again_with_an_access_copy_are_no_runs_throughput():
    """The row keeps the run that made the derivative; a chart that counted it there would stretch that
    run's active time to the day the copy was added."""
    import datetime as dt

    from pipeline import report

    t = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    rows = [{"image_id": i, "run_id": "r0", "n_faces": 1, "finished_at": t + dt.timedelta(seconds=s),
             "review_id": None, "derived_by": None} for i, s in (("a", 10), ("b", 20))]
    records = [{"run_id": "r0", "kind": "job", "started_at": t.isoformat()},
               {"run_id": "r1", "kind": "job", "started_at": (t + dt.timedelta(days=3)).isoformat()}]
    before = report.throughput(pa.Table.from_pylist(rows), records)
    later = dict(rows[0], finished_at=t + dt.timedelta(days=3), derived_by="r1")
    assert report.throughput(pa.Table.from_pylist(rows + [later]), records) == before


def test_the_planned_access_name_rows_of_older_versions_and_a_row_the_ledger_cannot_take(tmp_path):
    """The access name comes from the key planned with today's settings (``access_key``: suffixed where two
    images' copies would share a name); a row without ``output_name`` (older versions) finds its derivative
    by URI; a row whose values the ledger cannot take, or whose key has an error, fails before any write;
    the new row is never older than the one it replaces."""
    import datetime as dt

    cfg, row, out, _ = _setup(tmp_path)
    ahead = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5)  # a clock that ran fast
    old = dict(row, output_name=None, access_key="a~1234.png", finished_at=ahead, year=1950)
    bad = dict(row, image_id="b", year="c. 1950")
    clash = dict(row, image_id="c", key_error="its output name collides with another image's")
    stage = AddAccessCopy(Compose(cfg, "r1", "f", False, passthrough=pa.schema([("year", pa.int64())])))
    batch = {}
    for k in old | bad | clash:  # a numpy batch: per-row values of any type, as a hand-made batch may hold
        batch[k] = np.empty(3, object)
        batch[k][:] = [d.get(k) for d in (old, bad, clash)]
    rows, failed = stage(batch)
    assert [r["image_id"] for r in rows.to_pylist()] == ["a"]
    r = rows.to_pylist()[0]
    assert r["access_name"] == "a~1234.jpg" and r["output_name"] == "a.png" and r["finished_at"] > ahead
    assert sorted(p.name for p in (out / "access").iterdir()) == ["a~1234.jpg"]
    reasons = dict(failed)
    assert "c. 1950" in reasons["b"] and "collides" in reasons["c"]
