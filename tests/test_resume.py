import datetime as dt

import pyarrow as pa

from pipeline import resume

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
                      "gave_up": 0, "todo": 2, "skipped": 4}


def test_nothing_to_do_when_everything_is_current():
    res = _results([(c, "ok", "fp", 0) for c in "abcdef"])
    assert resume.plan(MANIFEST, res, "fp", "outdated").todo.num_rows == 0


def test_latest_row_per_image():
    latest = resume.latest_rows(RESULTS).sort_by("image_id")
    assert latest["status"].to_pylist() == ["ok", "read_error", "decode_error", "ok", "no_face"]


def test_an_image_keeps_every_name_it_was_ever_given():
    """A's derivative a_b.jpg was made by an ok row; a later error row must not let B take the name."""
    from pipeline import keys
    from pipeline.config import OutputConfig

    results = pa.table({
        "image_id": ["A", "A"], "status": ["ok", "read_error"], "fingerprint": ["f", "f"],
        "finished_at": pa.array([T0, T0 + dt.timedelta(days=1)], pa.timestamp("ms", tz="UTC")),
        "output_uri": ["/out/images/a_b.jpg", None], "access_uri": [None, None],
        "output_name": ["a_b.jpg", None], "access_name": [None, None]})
    manifest = pa.table({"image_id": ["A", "B"], "uri": ["/in/a?b.jpg", "/in/a_b.jpg"]})
    held = resume.claims(results)  # names, not URIs: the output may be spelled differently today
    keyed = resume.assign_keys(manifest, "/in/", OutputConfig(), held)
    assert keyed["output_key"].to_pylist() == ["a_b.jpg", keys.with_tag("a_b.jpg", "B")]
    assert resume.plan(manifest, results, "f", "missing").todo["image_id"].to_pylist() == ["B"]


def test_rows_of_earlier_versions_claim_their_files_by_uri(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.config import StorageConfig

    d = tmp_path / "out" / "_results" / "run=old"
    d.mkdir(parents=True)
    pq.write_table(pa.table({"image_id": ["A"], "status": ["ok"], "fingerprint": ["f"],
                             "finished_at": pa.array([T0], pa.timestamp("ms", tz="UTC")),
                             "output_uri": [str(tmp_path / "out" / "images" / "x" / "a.jpg")],
                             "access_uri": [str(tmp_path / "out" / "access" / "x" / "a.jpg")]}), d / "part.parquet")
    results = resume.load_for_planning(str(tmp_path / "out"), StorageConfig())
    assert "output_uri" not in results.column_names
    assert sorted(resume.claims(results).to_pylist(), key=lambda r: r["ns"]) == [
        {"image_id": "A", "ns": "access", "name": "x/a.jpg"}, {"image_id": "A", "ns": "images", "name": "x/a.jpg"}]
