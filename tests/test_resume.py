import datetime as dt
import json

import pyarrow as pa
import pyarrow.compute as pc

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


def _reference_plan(manifest_ids, rows, fp, mode, max_attempts):
    """The rules of ``resume.plan`` one image at a time, in plain Python: the oracle for its vectorised form."""
    from pipeline.schema import ERROR_STATUSES, FINAL_STATUSES

    final = {s.value for s in FINAL_STATUSES}
    error = {s.value for s in ERROR_STATUSES}
    by_image: dict[str, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r)
    todo, counts = [], dict.fromkeys(["completed", "current", "failed", "gave_up"], 0)
    for i in manifest_ids:
        rs = sorted(by_image.get(i, []), key=lambda r: r["finished_at"])
        finals = [r for r in rs if r["status"] in final]
        completed, current = bool(finals), bool(finals) and finals[-1]["fingerprint"] == fp
        failed = bool(rs) and rs[-1]["status"] in error
        tries = sum(r["fingerprint"] == fp and r["status"] in {s.value for s in resume.RETRYABLE} for r in rs)
        gave_up = bool(max_attempts) and tries >= max_attempts and not current
        counts["completed"] += completed
        counts["current"] += current
        counts["failed"] += failed
        counts["gave_up"] += gave_up
        done = {"all": False, "missing": completed, "outdated": current, "failed": completed and not failed}[mode]
        if mode in ("missing", "outdated"):
            done = done or gave_up
        if not done:
            todo.append(i)
    return todo, counts


def test_plan_matches_the_rules_one_image_at_a_time():
    import random

    from pipeline.schema import Status

    rng = random.Random(11)
    ids = [f"i{k:03d}" for k in range(120)]
    rows = []
    for i in ids + ["not-in-manifest"]:
        t = T0
        for _ in range(rng.randint(0, 6)):
            t += dt.timedelta(seconds=rng.randint(1, 1000))
            rows.append({"image_id": i, "status": rng.choice([s.value for s in Status] + ["ok"] * 4),
                         "fingerprint": rng.choice(["f1", "f2", None]), "finished_at": t})
    rng.shuffle(rows)
    results = pa.Table.from_pylist(rows, pa.schema([("image_id", pa.string()), ("status", pa.string()),
                                                    ("fingerprint", pa.string()),
                                                    ("finished_at", pa.timestamp("ms", tz="UTC"))]))
    manifest = pa.table({"image_id": ids[::-1], "uri": [f"/x/{i}" for i in ids[::-1]]})  # not sorted by id
    for fp in ("f1", "f2", "f3"):
        for mode in resume.MODES:
            for n in (None, 1, 2, 3):
                got = resume.plan(manifest, results, fp, mode, n)
                todo, counts = _reference_plan(ids[::-1], rows, fp, mode, n)
                assert got.todo["image_id"].to_pylist() == todo, (fp, mode, n)
                assert {k: got.counts[k] for k in counts} == counts, (fp, mode, n)
                assert got.counts["todo"] == len(todo) and got.counts["manifest"] == len(ids)


def test_detection_reuse_reads_only_the_files_holding_reusable_rows(tmp_path, monkeypatch):
    from pipeline import ledger
    from pipeline.config import StorageConfig

    cfg, out = StorageConfig(), str(tmp_path / "out")
    face = [{"bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.9, "landmarks": [0.5] * 10, "review": None}]
    for image, status in (("a", "ok"), ("b", "read_error"), ("c", "ok")):
        ledger.write_part(pa.Table.from_pylist([{
            "image_id": image, "status": status, "fingerprint": "f", "detect_fingerprint": "d" if status == "ok" else None,
            "finished_at": T0, "src_sha256": "s", "faces": face if status == "ok" else None, "faces_skipped": 0}]),
            ledger.part_uri(out, "r1", [image]), cfg)
    planning = resume.load_for_planning(out, cfg)
    manifest = pa.table({"image_id": ["a", "b", "c"], "uri": ["/a", "/b", "/c"]})
    read = []
    real = ledger._read_one
    monkeypatch.setattr(ledger, "_read_one", lambda uri, *a: read.append(uri) or real(uri, *a))
    todo = resume.plan(manifest, planning, "f", "missing").todo  # b: a retry; it never completed
    assert todo["image_id"].to_pylist() == ["b"]
    assert resume.attach_prior(todo, planning, out, cfg).column_names == todo.column_names and read == []
    todo = resume.plan(manifest, planning, "g", "outdated").todo.filter(pc.equal(manifest["image_id"], "a"))
    got = resume.attach_prior(todo, planning, out, cfg)
    assert read == [ledger.part_uri(out, "r1", ["a"])]  # one file, the one holding a's faces
    assert got["prior_detect_fp"].to_pylist() == ["d"]
    from pipeline.schema import RESERVED_COLUMNS  # a manifest column of these names is renamed (manifest.py)

    assert set(got.column_names) - set(todo.column_names) <= RESERVED_COLUMNS
    assert got["prior_faces"].to_pylist() == [[{k: face[0][k] for k in ("bbox", "score", "landmarks", "review")}]]


def test_stored_faces_keeps_what_reuse_needs_across_chunks_slices_and_nulls():
    face = pa.struct([("bbox", pa.list_(pa.float64())), ("score", pa.float64()), ("landmarks", pa.list_(pa.float64())),
                      ("identity_similarity", pa.float64()), ("review", pa.string())])
    rows = [[{"bbox": [1.0, 2, 3, 4], "score": 0.9, "landmarks": [0.1] * 10, "identity_similarity": 0.5, "review": None},
             {"bbox": [5.0, 6, 7, 8], "score": 0.8, "landmarks": [0.2] * 10, "identity_similarity": 0.4,
              "review": "rejected"}],
            None, [],
            [{"bbox": [9.0, 9, 9, 9], "score": 0.7, "landmarks": [0.3] * 10, "identity_similarity": None, "review": None}]]
    full = pa.array(rows * 2, pa.list_(face))
    chunked = pa.chunked_array([full.slice(1, 3), full.slice(4, 3)])  # sliced chunks: offsets not at zero
    want = [None if fs is None else [{k: f[k] for k in ("bbox", "score", "landmarks", "review")} for f in fs]
            for fs in (rows * 2)[1:7]]
    assert resume.stored_faces(chunked).to_pylist() == want
    old = pa.array([[{"bbox": [1.0, 2, 3, 4], "score": 0.9, "landmarks": [0.1] * 10}]],  # rows before "review"
                   pa.list_(pa.struct([("bbox", pa.list_(pa.float64())), ("score", pa.float64()),
                                       ("landmarks", pa.list_(pa.float64()))])))
    assert resume.stored_faces(pa.chunked_array([old])).to_pylist() == [
        [{"bbox": [1.0, 2, 3, 4], "score": 0.9, "landmarks": [0.1] * 10, "review": None}]]


def test_a_row_without_a_finish_time_is_the_oldest():
    res = pa.table({"image_id": ["a", "a"], "status": ["ok", "ok"], "fingerprint": ["new", "old"],
                    "finished_at": pa.array([T0, None], pa.timestamp("ms", tz="UTC"))})
    manifest = pa.table({"image_id": ["a"], "uri": ["/a"]})
    assert resume.latest_rows(res)["fingerprint"].to_pylist() == ["new"]
    assert resume.plan(manifest, res, "new", "outdated").counts["current"] == 1


def test_files_that_only_settings_outside_the_fingerprint_ask_for():
    """Access copies and no-face copies: turned on (or changed) after an archive was processed, they are
    added without GFP-GAN. A no-face image without a copy is processed again (its faces, none, reused); an
    ok image without an access copy of today's spec goes to ``derive``, with the ledger file of its row."""
    m = pa.table({"image_id": list("abcdefgh"), "uri": [f"/x/{c}.jpg" for c in "abcdefgh"]})
    res = _results([("a", "ok", "fp", 0), ("b", "ok", "fp", 0), ("c", "ok", "fp", 0), ("d", "no_face", "fp", 0),
                    ("e", "no_face", "fp", 0), ("f", "ok", "legacy", 0), ("g", "read_error", "fp", 0),
                    ("h", "ok", "old", 0)])
    res = res.append_column("output_name", pa.array(["a.jpg", "b.jpg", "c.jpg", None, "e.jpg", "f.jpg", None,
                                                     "h.jpg"]))
    res = res.append_column("access_name", pa.array([None, "b.jpg", "c.jpg", None, "e.jpg", "f.jpg", None, None]))
    res = res.append_column("access_spec", pa.array([None, "2048px q85", "1024px q85", None, "2048px q85",
                                                     None, None, None]))  # f: made before specs were recorded
    res = res.append_column("_source", pa.array([f"/out/_results/{c}.parquet" for c in "abcdefgh"]))
    wants = resume.Wants(copy_no_face=True, access_spec="2048px q85", legacy_specs={"legacy": "2048px q85"})
    p = resume.plan(m, res, ["fp", "legacy"], "missing", wants=wants)
    assert p.todo["image_id"].to_pylist() == ["d", "g"]
    assert p.derive["image_id"].to_pylist() == ["a", "c", "h"]  # h: outdated, but left alone in this mode
    assert p.derive["_source"].to_pylist() == [f"/out/_results/{c}.parquet" for c in "ach"]
    assert (p.counts["copy_no_face"], p.counts["derive"]) == (1, 3)
    # outdated: h is processed again (its access copy comes with it); nothing is derived twice
    p = resume.plan(m, res, ["fp", "legacy"], "outdated", wants=wants)
    assert p.todo["image_id"].to_pylist() == ["d", "g", "h"] and p.derive["image_id"].to_pylist() == ["a", "c"]
    # without the settings: nothing more to do than before; with "all", everything is processed
    p = resume.plan(m, res, ["fp", "legacy"], "missing")
    assert p.todo["image_id"].to_pylist() == ["g"] and p.derive is None and "derive" not in p.counts
    assert resume.plan(m, res, "fp", "all", wants=wants).derive is None
    # the legacy fingerprint counts as current only when accepted
    assert resume.plan(m, res, "fp", "outdated", wants=wants).todo["image_id"].to_pylist() == ["d", "f", "g", "h"]
    # only no-face copies asked for
    p = resume.plan(m, res, "fp", "missing", wants=resume.Wants(copy_no_face=True))
    assert p.todo["image_id"].to_pylist() == ["d", "g"] and p.derive is None
    # a legacy row's copy made with other settings than today's, or with settings nobody knows: made again
    p = resume.plan(m, res, ["fp", "legacy"], "missing", wants=resume.Wants(
        access_spec="2048px q85", legacy_specs={"legacy": "1024px q85"}))
    assert p.derive["image_id"].to_pylist() == ["a", "c", "f", "h"]
    assert resume.plan(m, res, ["fp", "legacy"], "missing", wants=resume.Wants(
        access_spec="2048px q85")).derive["image_id"].to_pylist() == ["a", "c", "f", "h"]


def test_added_files_never_hide_an_error_or_retry_forever_or_redo_outdated_images():
    m = pa.table({"image_id": list("abc"), "uri": [f"/x/{c}.jpg" for c in "abc"]})
    res = _results([("a", "ok", "fp", 0), ("a", "read_error", "fp", 1),      # a later passing failure
                    ("b", "no_face", "old", 0),                              # outdated: missing mode leaves it
                    ("c", "no_face", "fp", 0)] + [("c", "read_error", "fp", d) for d in (1, 2, 3)])
    res = res.append_column("output_name", pa.array(["a.jpg", None, None, None, None, None, None]))
    res = res.append_column("access_name", pa.nulls(7, pa.string()))
    wants = resume.Wants(copy_no_face=True, access_spec="2048px q85")
    p = resume.plan(m, res, "fp", "missing", 3, wants=wants)
    assert p.derive is None and p.todo.num_rows == 0 and p.counts["failed"] == 2
    assert resume.plan(m, res, "fp", "failed", 3, wants=wants).todo["image_id"].to_pylist() == ["a", "c"]
    assert resume.plan(m, res, "fp", "outdated", 3, wants=wants).todo["image_id"].to_pylist() == ["b"]
    assert resume.plan(m, res.slice(0, 5), "fp", "missing", 3, wants=wants).todo["image_id"].to_pylist() == ["c"]
    # errors before the no-face result do not count against its copy
    later = _results([(c, "read_error", "fp", d) for d, c in enumerate("ccc")] + [("c", "no_face", "fp", 5)])
    later = later.append_column("output_name", pa.nulls(4, pa.string()))
    assert resume.plan(m.slice(2), later, "fp", "missing", 3, wants=wants).todo["image_id"].to_pylist() == ["c"]
