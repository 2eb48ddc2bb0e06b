"""Folding the ledger: a compacted ledger plans, claims, reuses detections and checks decisions exactly as the
full one did; no row is lost (the others are in history); a fold is all or nothing for readers."""

import datetime as dt
import json
import random

import pyarrow as pa
import pytest

from pipeline import compaction, decisions, ledger, resume
from pipeline.config import StorageConfig
from pipeline.errors import StorageError
from pipeline.schema import Status

CFG = StorageConfig(retries=1)
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
STATUSES = [s.value for s in Status]
FACE = pa.struct([("bbox", pa.list_(pa.float64())), ("score", pa.float64()),
                  ("landmarks", pa.list_(pa.float64())), ("review", pa.string())])


def _ledger(out: str, seed: int = 0, n_images: int = 80, n_files: int = 30, cfg: StorageConfig = CFG) -> pa.Table:
    """A random ledger of several runs and reviews, as loose per-batch files; returns all its rows."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_images):
        image = f"img{i:03d}"
        t = T0 + dt.timedelta(days=rng.randrange(5))
        for k in range(rng.randint(1, 7)):
            t += dt.timedelta(seconds=rng.randint(1, 10_000))  # distinct per image: "latest" is well defined
            status = rng.choice(STATUSES + ["ok"] * 6 + ["restore_error"] * 2)
            review = status == "ok" and k and rng.random() < 0.25
            ext = rng.choice(["jpg", "jpg", "png"])
            rows.append({
                "image_id": image, "status": status, "fingerprint": rng.choice(["f1", "f2", "f3"]),
                "finished_at": t, "run_id": f"r{rng.randrange(5)}", "review_id": "rv" if review else None,
                "detect_fingerprint": rng.choice([None, "d1", "d2"]) if status in ("ok", "no_face") else None,
                "output_name": f"{image}.{ext}" if status in ("ok", "no_face") else None,
                "access_name": f"{image}.jpg" if status == "ok" and rng.random() < 0.3 else None,
                "out_sha256": f"{rng.getrandbits(64):016x}",
                "src_sha256": rng.choice(["s1", "s2"]), "faces_skipped": rng.randrange(2),
                "faces": [{"bbox": [1.0 * k, 2.0, 3.0, 4.0], "score": 0.9, "landmarks": [0.5] * 10,
                           "review": rng.choice([None, "rejected"])} for _ in range(rng.randrange(3))],
            })
    rng.shuffle(rows)
    schema = pa.schema([("image_id", pa.string()), ("status", pa.string()), ("fingerprint", pa.string()),
                        ("finished_at", pa.timestamp("ms", tz="UTC")), ("run_id", pa.string()),
                        ("review_id", pa.string()), ("detect_fingerprint", pa.string()),
                        ("output_name", pa.string()), ("access_name", pa.string()), ("out_sha256", pa.string()),
                        ("src_sha256", pa.string()), ("faces_skipped", pa.int32()), ("faces", pa.list_(FACE))])
    table = pa.Table.from_pylist(rows, schema)
    step = -(-len(rows) // n_files)
    for start in range(0, len(rows), step):
        part = table.slice(start, step)
        ledger.write_part(part, ledger.part_uri(out, part["run_id"][0].as_py(), part["image_id"].to_pylist()), cfg)
    return table


def _view(out: str, written: pa.Table, cfg: StorageConfig = CFG) -> dict:
    """Everything the ledger's readers decide from it (``written``: every row ever written, for the sha256s
    a decisions file may name)."""
    manifest = pa.table({"image_id": [f"img{i:03d}" for i in range(90)], "uri": [f"/a/{i}.tif" for i in range(90)]})
    planning = resume.load_for_planning(out, cfg)
    plans = {(fp, mode, n): (resume.plan(manifest, planning, fp, mode, n).todo["image_id"].to_pylist(),
                             resume.plan(manifest, planning, fp, mode, n).counts)
             for fp in ("f1", "f2", "f4") for mode in ("missing", "outdated", "failed", "all") for n in (None, 2, 3)}
    prior = resume.attach_prior(manifest, planning, out, cfg)
    rows = ledger.load_results(out, cfg)
    history: dict[str, list[dict]] = {}
    for r in sorted(rows.to_pylist(), key=lambda r: r["finished_at"]):
        history.setdefault(r["image_id"], []).append(r)
    stale = {(r["image_id"], r["out_sha256"]): decisions._stale(history.get(r["image_id"], []), r["out_sha256"])
             for r in written.select(["image_id", "out_sha256"]).to_pylist()}
    return {"plans": plans, "claims": sorted({(r["image_id"], r["ns"], r["name"])
                                              for r in resume.claims(planning).to_pylist()}),
            "prior": sorted(prior.drop_columns(["uri"]).to_pylist(), key=lambda r: r["image_id"]),
            "latest": sorted(resume.latest_rows(rows).to_pylist(), key=lambda r: r["image_id"]), "stale": stale}


def _all_rows(out: str, cfg: StorageConfig = CFG) -> list:
    listing = ledger.list_ledger(out, cfg)
    t = ledger.load_results(out, cfg, history=True)
    assert t.num_rows == ledger.load_results(out, cfg, files=listing.files + listing.history).num_rows
    return sorted(json.dumps(r, default=str, sort_keys=True) for r in t.to_pylist())


def _canon(table: pa.Table) -> list:
    return sorted(json.dumps(r, default=str, sort_keys=True) for r in table.to_pylist())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_compacted_ledger_answers_every_reader_as_the_full_one_did_and_loses_no_row(tmp_path, seed):
    out = str(tmp_path / "out")
    rows = _ledger(out, seed)
    before = _view(out, rows)
    assert len(ledger.result_files(out, CFG)) >= 20
    summary = compaction.compact(out, CFG, by="test")
    listing = ledger.list_ledger(out, CFG)
    assert len(listing.files) == 1 and not listing.loose and not listing.replaced and not listing.orphans
    assert summary["files_before"] >= 20 and summary["rows_kept"] + summary["rows_to_history"] == rows.num_rows
    assert 0 < summary["rows_to_history"] < rows.num_rows  # the rule does drop rows from the live ledger
    assert _view(out, rows) == before
    assert _all_rows(out) == _canon(rows)  # live + history: every row, once
    # Nothing but the fold is left under _results: the replaced per-batch files are gone.
    assert sorted(str(p.relative_to(tmp_path / "out" / "_results")) for p in (tmp_path / "out" / "_results").rglob("*")
                  if p.is_file()) == [f"_folds/{summary['fold_id']}.json", f"fold={summary['fold_id']}/part-00000.parquet"]


def test_later_runs_folds_and_a_second_compaction_keep_history_and_answers(tmp_path):
    out = str(tmp_path / "out")
    first = _ledger(out, 3, n_images=40)
    compaction.compact(out, CFG, by="c1")
    later = _ledger(out, 4, n_images=60)  # new runs over the same and new images, loose again
    every = pa.concat_tables([first, later])
    fold = compaction.fold_loose(out, CFG, by="run")
    assert fold["files_before"] >= 20 and fold["files_after"] == 1 and fold["rows"] == later.num_rows
    assert _all_rows(out) == _canon(every)
    before = _view(out, every)
    compaction.compact(out, CFG, by="c2")
    listing = ledger.list_ledger(out, CFG)
    assert len(listing.records) == 1 and len(listing.files) == 1 and not listing.superseded
    assert len(listing.history) == 2  # the first compaction's history is carried, not orphaned
    assert _view(out, every) == before
    assert _all_rows(out) == _canon(every)
    compaction.compact(out, CFG, by="c3", delete_history=True)  # only with the explicit flag
    listing = ledger.list_ledger(out, CFG)
    assert not listing.history and not list((tmp_path / "out" / "_history").rglob("*.parquet"))
    assert _view(out, every) == before


def test_an_interrupted_fold_changes_nothing_readers_see_and_the_next_one_cleans_up(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    rows = _ledger(out, 5, n_images=30)
    before, files = _view(out, rows), ledger.result_files(out, CFG)

    def killed(*a, **k):
        raise KeyboardInterrupt  # killed after writing every new file, before the record

    with monkeypatch.context() as m:
        m.setattr(compaction, "_commit", killed)
        with pytest.raises(KeyboardInterrupt):
            compaction.compact(out, CFG, by="c1")
    listing = ledger.list_ledger(out, CFG)
    assert listing.files == files and listing.orphans and _view(out, rows) == before
    assert _all_rows(out) == _canon(rows)  # no duplicates from the unfinished fold's files
    # Killed after the commit, before the cleanup: replaced files are still there, and hidden.
    with monkeypatch.context() as m:
        m.setattr(compaction, "cleanup", lambda *a, **k: {"records": 0, "files": 0, "history": 0})
        compaction.compact(out, CFG, by="c2")
    listing = ledger.list_ledger(out, CFG)
    assert len(listing.files) == 1 and len(listing.replaced) == len(files) and listing.orphans
    assert _view(out, rows) == before and _all_rows(out) == _canon(rows)
    # c3 supersedes c2 and must go on hiding c2's leftovers: killed in its cleanup after it deleted c2's
    # record, before any file, the leftovers must not come back as results.
    real_delete = compaction.storage.delete

    def delete(uri, cfg):
        if uri.endswith(".parquet"):
            raise KeyboardInterrupt
        real_delete(uri, cfg)

    with monkeypatch.context() as m:
        m.setattr(compaction.storage, "delete", delete)
        with pytest.raises(KeyboardInterrupt):
            compaction.compact(out, CFG, by="c3")
    assert _view(out, rows) == before and _all_rows(out) == _canon(rows)
    compaction.compact(out, CFG, by="c4")
    listing = ledger.list_ledger(out, CFG)
    assert not listing.replaced and not listing.orphans and not listing.superseded
    assert _view(out, rows) == before and _all_rows(out) == _canon(rows)


def test_a_fold_record_naming_a_file_that_is_gone_stops_readers(tmp_path):
    out = str(tmp_path / "out")
    _ledger(out, 6, n_images=10, n_files=3)
    compaction.compact(out, CFG, by="c1")
    (part,) = (tmp_path / "out" / "_results").rglob("part-00000.parquet")
    part.unlink()
    with pytest.raises(StorageError, match="name result files that are gone"):
        ledger.load_results(out, CFG)


def test_kept_rows_rule_on_a_hand_made_history():
    t = pa.table({
        "image_id": ["a"] * 6,
        "status": ["ok", "restore_error", "ok", "decode_error", "ok", "ok"],
        "fingerprint": ["f1", "f1", "f2", "f2", "f2", "f2"],
        "finished_at": pa.array([T0 + dt.timedelta(hours=h) for h in range(6)], pa.timestamp("ms", tz="UTC")),
        "detect_fingerprint": [None, None, "d", None, None, None],
        "review_id": [None, None, None, None, None, "rv"],
        "output_name": ["a.jpg", None, "a.jpg", None, "a.png", "a.png"],
        "access_name": pa.nulls(6, pa.string()),
    })
    # 5: the latest (a review) and the latest final and a.png's; 4: the latest run row before that review;
    # 2: the latest with detections, and a.jpg's; 1: a retryable error. 0 (a.jpg again, older) and 3 (an older
    # final error) go to history.
    assert compaction.kept_rows(t).tolist() == [False, True, True, False, True, True]


@pytest.mark.integration
def test_compaction_on_s3(s3_endpoint, s3fs_client):
    s3fs_client.mkdir("ledger")
    cfg = StorageConfig(s3_endpoint_url=s3_endpoint, retries=1)
    out = "s3://ledger/out"
    rows = _ledger(out, 7, n_images=40, n_files=12, cfg=cfg)
    before = _view(out, rows, cfg)
    summary = compaction.compact(out, cfg, by="test")
    assert summary["files_before"] == 12 and summary["files_after"] == 1
    assert _view(out, rows, cfg) == before and _all_rows(out, cfg) == _canon(rows)
    left = sorted(p.split("/out/", 1)[1] for p in s3fs_client.find("ledger/out"))
    fold = f"fold={summary['fold_id']}"
    assert left == [f"_history/{fold}/part-00000.parquet", f"_results/_folds/{summary['fold_id']}.json",
                    f"_results/{fold}/part-00000.parquet"]  # the 12 per-batch files are gone


def test_a_reader_racing_a_fold_lists_again_instead_of_failing_or_losing_rows(tmp_path, monkeypatch):
    """``status`` takes no lease: a compaction may commit and clean up between its listing and its reads."""
    out = str(tmp_path / "out")
    rows = _ledger(out, 8, n_images=20, n_files=6)
    compaction.compact(out, CFG, by="c1")
    _ledger(out, 9, n_images=20, n_files=6)
    every = ledger.load_results(out, CFG).num_rows
    real_record, real_read = ledger._read_record, ledger._read_one
    raced = {"record": False, "file": False}

    def record_then_fold(uri, cfg):  # the first record read finds the record superseded and deleted
        if not raced["record"]:
            raced["record"] = True
            compaction.compact(out, CFG, by="c2")
        return real_record(uri, cfg)

    monkeypatch.setattr(ledger, "_read_record", record_then_fold)
    assert ledger.load_results(out, CFG).num_rows < every  # compacted: fewer live rows, and no error
    assert raced["record"]
    monkeypatch.setattr(ledger, "_read_record", real_record)
    _ledger(out, 10, n_images=20, n_files=6)
    listing_rows = ledger.load_results(out, CFG, history=True).num_rows

    def file_then_fold(uri, cfg, columns):  # a listed file is folded away before it is read
        if not raced["file"]:
            raced["file"] = True
            compaction.fold_loose(out, CFG, by="run")
        return real_read(uri, cfg, columns)

    monkeypatch.setattr(ledger, "_read_one", file_then_fold)
    assert ledger.load_results(out, CFG, history=True).num_rows == listing_rows and raced["file"]
    assert rows.num_rows  # (the first ledger)


def test_compaction_deletes_nothing_under_history_but_its_own_files(tmp_path):
    out = tmp_path / "out"
    _ledger(str(out), 11, n_images=10, n_files=3)
    mine = [out / "_history" / "scans" / "portrait_1901.tif", out / "_history" / "fold=x" / "notes.parquet"]
    for p in mine:  # someone's own files in a folder that happens to be called _history
        p.parent.mkdir(parents=True)
        p.write_bytes(b"original")
    compaction.compact(str(out), CFG, by="c1")
    compaction.compact(str(out), CFG, by="c2", delete_history=True)
    assert all(p.read_bytes() == b"original" for p in mine)
    assert not list((out / "_history").rglob("part-*.parquet"))


def test_a_listing_torn_by_a_concurrent_fold_is_taken_again(tmp_path, monkeypatch):
    """A listing is not a snapshot: pages served before a fold's commit and after its cleanup show the new
    files without their record and the old ones gone. The reader must not take that as an empty ledger."""
    out = str(tmp_path / "out")
    rows = _ledger(out, 12, n_images=15, n_files=5)
    compaction.compact(out, CFG, by="c1")
    real = compaction.storage.list_files
    calls = []

    def torn(uri, cfg):  # listings of the result files and of the records, in turn
        got = real(uri, cfg)
        calls.append(uri)
        if len(calls) == 2:  # the records, listed before the commit: none, so the fold's parts look orphaned
            return []
        if len(calls) == 3:  # the result files before the parts were written (and the old ones deleted)...
            return [u for u in got if "/fold=" not in u]
        return got  # ...and the records after the commit: a record whose files the listing lacks

    monkeypatch.setattr(ledger.storage, "list_files", torn)
    assert ledger.load_results(out, CFG).num_rows == compaction.kept_rows(  # every live row, none lost
        resume.names_only(rows, out)).sum()
    assert len(calls) >= 6


def test_cleanup_stops_when_the_lease_is_lost(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    _ledger(out, 13, n_images=10, n_files=4)
    monkeypatch.setattr(compaction, "cleanup", lambda *a, **k: {"history": 0})  # commit, leave the old files
    compaction.compact(out, CFG, by="c1")
    monkeypatch.undo()
    before = sorted(p for p in (tmp_path / "out").rglob("*") if p.is_file())
    with pytest.raises(StorageError, match="lease was lost"):
        compaction.cleanup(out, CFG, still_ours=lambda: False)
    assert sorted(p for p in (tmp_path / "out").rglob("*") if p.is_file()) == before


def test_what_an_interrupted_fold_left_is_cleaned_by_the_next_run_even_without_a_fold(tmp_path, monkeypatch):
    """Its files make every reader list the ledger twice (a fold might be committing), so they must not
    stay until the next fold, which a finished archive may never have."""
    out = str(tmp_path / "out")
    _ledger(out, 14, n_images=10, n_files=4)
    with monkeypatch.context() as m:
        m.setattr(compaction, "_commit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            compaction.compact(out, CFG, by="c1")
    compaction.compact(out, CFG, by="c2")  # the ledger is folded now: one file, nothing loose
    assert not ledger.list_ledger(out, CFG).orphans
    with monkeypatch.context() as m:  # interrupted again, on a ledger with nothing loose to fold
        m.setattr(compaction, "_commit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            compaction.compact(out, CFG, by="c3")
    assert ledger.list_ledger(out, CFG).orphans
    assert compaction.fold_loose(out, CFG, by="next run") is None  # nothing to fold...
    assert not ledger.list_ledger(out, CFG).orphans  # ...but the leftovers are gone


def test_delete_many_takes_names_with_glob_characters_literally(tmp_path):
    from pipeline import storage

    d = tmp_path / "a[1]"
    d.mkdir()
    files = [d / "x*.parquet", d / "y?.parquet", d / "plain.parquet"]
    for f in files:
        f.write_bytes(b"x")
    keep = d / "x1.parquet"  # what the glob x*.parquet would also match
    keep.write_bytes(b"keep")
    storage.delete_many([str(f) for f in files] + [str(d / "gone.parquet")], CFG)
    assert [p.name for p in d.iterdir()] == ["x1.parquet"]


@pytest.mark.integration
def test_delete_many_on_s3_in_bulk_and_literally(s3_endpoint, s3fs_client):
    from pipeline import storage

    s3fs_client.mkdir("bulk")
    names = ["a[1]/x*.parquet", "a[1]/y?.parquet", "a[1]/x1.parquet"] + [f"b/p{i}.parquet" for i in range(5)]
    for n in names:
        s3fs_client.pipe_file(f"bulk/{n}", b"x")
    cfg = StorageConfig(s3_endpoint_url=s3_endpoint, retries=1)
    storage.delete_many([f"s3://bulk/{n}" for n in names if n != "a[1]/x1.parquet"] + ["s3://bulk/b/gone"], cfg)
    s3fs_client.invalidate_cache()
    assert s3fs_client.find("bulk") == ["bulk/a[1]/x1.parquet"]
