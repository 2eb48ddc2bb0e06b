import datetime as dt
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import resume
from pipeline.config import StorageConfig
from pipeline.errors import StorageError

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _results(rows):
    ids, status, fp, days = zip(*rows)
    return pa.table({"image_id": list(ids), "status": list(status), "fingerprint": list(fp),
                     "finished_at": pa.array([T0 + dt.timedelta(days=d) for d in days], pa.timestamp("ms", tz="UTC"))})


MANIFEST = pa.table({"image_id": list("abcdef"), "uri": [f"/x/{c}.jpg" for c in "abcdef"]})
RESULTS = _results([
    ("a", "ok", "new", 0),             # current
    ("b", "read_error", "new", 0),     # passing failure: never completed
    ("c", "ok", "old", 0),             # completed with old settings, then ...
    ("c", "decode_error", "new", 1),   # ... a permanent failure with the new ones
    ("d", "ok", "old", 0),             # outdated
    ("e", "no_face", "new", 0),        # current
])                                     # f: never seen


def test_modes():
    todo = {m: resume.plan(MANIFEST, RESULTS, "new", m).todo["image_id"].to_pylist()
            for m in ("missing", "outdated", "failed", "all")}
    assert todo["missing"] == ["b", "f"]
    assert todo["outdated"] == ["b", "d", "f"]
    assert todo["failed"] == ["b", "c", "f"]
    assert todo["all"] == list("abcdef")
    counts = resume.plan(MANIFEST, RESULTS, "new", "missing").counts
    assert counts == {"manifest": 6, "completed": 4, "current": 3, "outdated": 1, "failed": 2, "missing": 2,
                      "todo": 2, "skipped": 4}


def test_nothing_to_do_when_everything_is_current():
    res = _results([(c, "ok", "fp", 0) for c in "abcdef"])
    assert resume.plan(MANIFEST, res, "fp", "outdated").todo.num_rows == 0


def test_latest_row_per_image():
    latest = resume.latest_rows(RESULTS).sort_by("image_id")
    assert latest["status"].to_pylist() == ["ok", "read_error", "decode_error", "ok", "no_face"]


def test_torn_result_file_is_set_aside_and_its_images_redone(tmp_path):
    d = tmp_path / "_results" / "run=1"
    d.mkdir(parents=True)
    pq.write_table(RESULTS, d / "good.parquet")
    (d / "torn.parquet").write_bytes((d / "good.parquet").read_bytes()[:50])  # a writer killed mid-file
    loaded = resume.load_results(str(tmp_path), StorageConfig())
    assert loaded.num_rows == RESULTS.num_rows
    assert (d / ".torn-torn.parquet").exists() and not (d / "torn.parquet").exists()
    assert resume.load_results(str(tmp_path), StorageConfig()).num_rows == RESULTS.num_rows


def test_a_live_run_on_the_same_output_is_refused_and_a_dead_one_waited_out(tmp_path):
    cfg = StorageConfig()
    rec = {"run_id": "other", "state": "running", "started_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    with resume.Heartbeat(str(tmp_path), rec, cfg, every_s=0.2):
        with pytest.raises(StorageError, match="still running"):
            resume.wait_for_other_runs(str(tmp_path), cfg, "mine", heartbeat_s=0.2)
    # the same record, no longer refreshed (its driver was killed): waited out, then allowed
    t0 = time.perf_counter()
    resume.wait_for_other_runs(str(tmp_path), cfg, "mine", heartbeat_s=0.2)
    assert time.perf_counter() - t0 < 2
