"""The results ledger: idempotent per-batch files, reads that never change anything, torn vs damaged files."""

import datetime as dt
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ledger, resume
from pipeline.config import StorageConfig
from pipeline.errors import StorageError
from pipeline.schema import RESULT_SCHEMA

CFG = StorageConfig(retries=1)
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _rows(ids, run="r1"):
    return pa.table({"image_id": ids, "status": ["ok"] * len(ids), "fingerprint": ["f"] * len(ids),
                     "run_id": [run] * len(ids),
                     "finished_at": pa.array([T0] * len(ids), pa.timestamp("ms", tz="UTC"))})


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_retried_batch_rewrites_its_own_file(tmp_path):
    out = str(tmp_path)
    a = ledger.part_uri(out, "r1", ["b", "a"])
    assert a == ledger.part_uri(out, "r1", ["a", "b"]) != ledger.part_uri(out, "r2", ["a", "b"])
    ledger.write_part(_rows(["a", "b"]), a, CFG)
    ledger.write_part(_rows(["a", "b"]), a, CFG)  # the same batch again, after its task was retried
    assert ledger.load_results(out, CFG).num_rows == 2
    assert [p.name for p in (tmp_path / "_results" / "run=r1").iterdir()] == [a.rsplit("/", 1)[1]]


def test_torn_files_are_skipped_by_readers_and_moved_only_by_set_aside(tmp_path, caplog):
    out = str(tmp_path)
    ledger.write_part(_rows(["a", "b"]), ledger.part_uri(out, "r1", ["a", "b"]), CFG)
    good = next((tmp_path / "_results" / "run=r1").iterdir())
    torn = good.with_name("written-in-place.parquet")
    torn.write_bytes(good.read_bytes()[:-30])  # a writer killed before its footer
    before = _files(tmp_path)
    seen = []
    with caplog.at_level(logging.WARNING):
        assert ledger.load_results(out, CFG, torn=seen).num_rows == 2
    assert seen == [str(torn)] and "incomplete" in caplog.text
    assert _files(tmp_path) == before  # reading changed nothing
    assert ledger.set_aside(seen, CFG) == [str(torn)]
    assert not torn.exists() and torn.with_name(".torn-" + torn.name).exists()
    assert ledger.load_results(out, CFG).num_rows == 2


def test_a_damaged_file_stops_the_reader_and_says_which(tmp_path):
    out = str(tmp_path)
    uri = ledger.part_uri(out, "r1", ["a"])
    ledger.write_part(_rows(["a"]), uri, CFG)
    data = bytearray(open(uri, "rb").read())
    data[10:40] = b"\0" * 30  # footer intact, pages garbled: not torn, damaged
    open(uri, "wb").write(bytes(data))
    before = _files(tmp_path)
    with pytest.raises(StorageError, match="damaged") as e:
        ledger.load_results(out, CFG)
    assert uri in str(e.value)
    assert ledger.set_aside([uri], CFG) == []  # a whole (footer-complete) file is never moved
    assert _files(tmp_path) == before


def test_older_files_without_a_column_read_as_nulls(tmp_path):
    out = str(tmp_path)
    old = _rows(["a"]).drop_columns(["run_id"])
    pq.write_table(old, tmp_path / "old.parquet")
    (tmp_path / "_results" / "run=r0").mkdir(parents=True)
    (tmp_path / "old.parquet").rename(tmp_path / "_results" / "run=r0" / "part-old.parquet")
    ledger.write_part(_rows(["b"]), ledger.part_uri(out, "r1", ["b"]), CFG)
    t = ledger.load_results(out, CFG, columns=["image_id", "run_id"]).sort_by("image_id")
    assert t["run_id"].to_pylist() == [None, "r1"]


def test_files_that_disagree_on_a_columns_type_read_as_one_ledger_and_fold(tmp_path, caplog):
    """A manifest column whose type each run inferred from its own manifest (a shelf mark 12, then "A12"; a
    64-bit number, then a float), and an older archive's manifest columns named like ones of ours that later
    became ours (``cpu_s``, ``access_spec``): whole rows of every file still read, nothing rounded, and
    they fold without a conversion written back, instead of failing the concat."""
    from pipeline import compaction

    out = str(tmp_path)
    big = 2**53 + 1  # not a float64
    # an older archive: the manifest's cpu_s and access_spec under what are now our names
    old = _rows(["a"], run="r0").append_column("shelf", pa.array([12])).append_column("cpu_s", pa.array(["fast"])) \
        .append_column("access_spec", pa.array([7])).append_column("acc", pa.array([big]))
    new = _rows(["b", "c"], run="r1").append_column("shelf", pa.array(["A12", None])) \
        .append_column("cpu_s", pa.array([1.5, 2.0], pa.float32())).append_column("tags", pa.array(["x", None])) \
        .append_column("access_spec", pa.array(["q90", None])) \
        .append_column("manifest_access_spec", pa.array(["7a", None])) \
        .append_column("faces", pa.array([[], None], RESULT_SCHEMA.field("faces").type)) \
        .append_column("acc", pa.array([1.5, None]))
    # a manifest column named like our "faces" (not of its kind) and a nested one whose type changed
    mixed = _rows(["d"], run="r2").append_column("faces", pa.array([["a list of text"]])) \
        .append_column("tags", pa.array([["y", "z"]]))
    uris = []
    for t, run in ((old, "r0"), (new, "r1"), (mixed, "r2")):
        uris.append(ledger.part_uri(out, run, t["image_id"].to_pylist()))
        ledger.write_part(t, uris[-1], CFG)
    with pytest.raises(pa.ArrowTypeError):  # what reading them did before
        pa.concat_tables([old, new, mixed], promote_options="permissive")
    with caplog.at_level(logging.WARNING, "pipeline.ledger"):
        t = ledger.load_results(out, CFG).sort_by("image_id")
    assert t["image_id"].to_pylist() == ["a", "b", "c", "d"]
    assert t["shelf"].to_pylist() == ["12", "A12", None, None]
    assert t["acc"].to_pylist() == [str(big), "1.5", None, None]  # text, not rounded through a float
    assert t.schema.field("cpu_s").type == pa.float32() and t["cpu_s"].to_pylist() == [None, 1.5, 2.0, None]
    assert t["manifest_cpu_s"].to_pylist() == ["fast", None, None, None]
    assert t["access_spec"].to_pylist() == [None, "q90", None, None]
    assert t["manifest_access_spec"].to_pylist() == ["7", "7a", None, None]  # renamed, then text with today's
    assert t["manifest_faces"].to_pylist() == [None, None, None, ["a list of text"]]
    assert t["faces"].to_pylist() == [None, [], None, None]
    assert t["tags"].to_pylist() == [None, "x", None, '["y", "z"]']
    assert "shelf" in caplog.text and "tags" in caplog.text
    # a file of ours is told from the manifest's by its own columns, whatever else is read with it
    alone = ledger.load_results(out, CFG, files=[uris[0]])
    assert "cpu_s" not in alone.column_names and alone["manifest_cpu_s"].to_pylist() == ["fast"]
    picked = ledger.load_results(out, CFG, columns=["image_id", "cpu_s"]).sort_by("image_id")
    assert picked.column_names == ["image_id", "cpu_s"] and picked["cpu_s"].to_pylist() == [None, 1.5, 2.0, None]
    # planning's read (status and fingerprint dictionary-encoded per file) keeps our columns as ours
    plan = resume.load_for_planning(out, CFG).sort_by("image_id")
    assert plan["status"].to_pylist() == ["ok"] * 4 and plan["access_spec"].to_pylist() == [None, "q90", None, None]
    # a fold writes no conversion back: rows whose columns are not of one kind go to different files, and
    # the ledger reads the same afterwards
    assert compaction.fold_loose(out, CFG, by="test")["files_after"] == 3
    folded = [pq.read_schema(p) for p in sorted(tmp_path.glob("_results/fold=*/*.parquet"))]
    assert [s.field("shelf").type for s in folded[:2]] == [pa.int64(), pa.string()]
    assert [s.field("acc").type for s in folded[:2]] == [pa.int64(), pa.float64()]
    assert folded[0].field("manifest_cpu_s").type == pa.string() and folded[2].field("tags").type == pa.list_(pa.string())
    again = ledger.load_results(out, CFG).sort_by("image_id")
    assert again.select(t.column_names).equals(t.select(t.column_names))


def test_columns_of_one_kind_in_other_spellings_read_and_fold_without_loss(tmp_path):
    """A partition column read dictionary-encoded in one run and as text in the next, a time in two zone
    spellings, integers of two widths: one kind each, read whole; a fold merges integers of two widths but
    never an integer with a float."""
    from pipeline import compaction

    out = str(tmp_path)
    utc = dt.timezone.utc
    tables = [
        _rows(["a"], run="r0").append_column("collection", pa.array(["A"]).dictionary_encode())
        .append_column("seen", pa.array([T0], pa.timestamp("ms", tz="+00:00"))).append_column("n", pa.array([1], pa.int32())),
        _rows(["b"], run="r1").append_column("collection", pa.array(["B"]))
        .append_column("seen", pa.array([T0], pa.timestamp("ms", tz="UTC"))).append_column("n", pa.array([2**40])),
        _rows(["c"], run="r2").append_column("n", pa.array([2.5])),
    ]
    for t in tables:
        run = t["run_id"][0].as_py()
        ledger.write_part(t, ledger.part_uri(out, run, t["image_id"].to_pylist()), CFG)
    with pytest.raises(pa.ArrowTypeError):  # what reading them did before
        pa.concat_tables(tables, promote_options="permissive")
    t = ledger.load_results(out, CFG).sort_by("image_id")
    assert t["collection"].to_pylist() == ["A", "B", None]
    assert [v.astimezone(utc) if v else v for v in t["seen"].to_pylist()] == [T0, T0, None]
    assert t["n"].to_pylist() == ["1", str(2**40), "2.5"]  # an integer beside a float: text, not rounded
    assert compaction.fold_loose(out, CFG, by="test")["files_after"] == 3  # none merges as it is
    assert ledger.load_results(out, CFG).sort_by("image_id").equals(t)
    # a fold merges integers of two widths (one kind), never an integer with a float
    out2 = tmp_path / "widths"
    for run, n in (("r0", pa.array([1], pa.int32())), ("r1", pa.array([2**40])), ("r2", pa.array([2.5]))):
        ledger.write_part(_rows([run], run=run).append_column("n", n), ledger.part_uri(str(out2), run, [run]), CFG)
    before = ledger.load_results(str(out2), CFG).sort_by("image_id")
    assert compaction.fold_loose(str(out2), CFG, by="test")["files_after"] == 2
    folded = [pq.read_schema(p) for p in sorted(out2.glob("_results/fold=*/*.parquet"))]
    assert [s.field("n").type for s in folded] == [pa.int64(), pa.float64()]
    assert ledger.load_results(str(out2), CFG).sort_by("image_id").equals(before)


def _s3_ledger(s3fs_client, endpoint, bucket, n=12):
    s3fs_client.mkdir(bucket)
    cfg = StorageConfig(s3_endpoint_url=endpoint, retries=1)
    out = f"s3://{bucket}/out"
    for i in range(n):
        ledger.write_part(_rows([f"img{i:03d}a", f"img{i:03d}b"], run=f"r{i % 3}"),
                          ledger.part_uri(out, f"r{i % 3}", [f"img{i:03d}a"]), cfg)
    return out, cfg


def test_s3_ledger_files_are_read_with_arrows_s3_client(s3_endpoint, s3fs_client, monkeypatch):
    """Per-batch files on S3 are fetched by Arrow's client (s3fs is never asked for them), same rows."""
    from pipeline import storage

    out, cfg = _s3_ledger(s3fs_client, s3_endpoint, "native-ledger")
    monkeypatch.setattr(storage, "_ARROW_S3_OFF", [])

    def no_s3fs(uri, cfg):
        raise AssertionError(f"s3fs read {uri}")

    monkeypatch.setattr(storage, "read_bytes", no_s3fs)
    got = ledger.load_results(out, cfg).sort_by("image_id")
    assert got["image_id"].to_pylist() == sorted(f"img{i:03d}{x}" for i in range(12) for x in "ab")
    assert set(got["run_id"].to_pylist()) == {"r0", "r1", "r2"} and not storage._ARROW_S3_OFF
    monkeypatch.undo()  # s3fs back: a file missing for both is missing, and Arrow's client stays in use
    monkeypatch.setattr(storage, "_ARROW_S3_OFF", [])
    with pytest.raises(FileNotFoundError):
        storage.read_small(f"{out}/_results/run=r0/gone.parquet", cfg)
    assert not storage._ARROW_S3_OFF


def test_a_file_arrows_client_cannot_find_but_s3fs_can_is_read_and_s3fs_kept(s3_endpoint, s3fs_client, monkeypatch,
                                                                             caplog):
    """Arrow's client does not share s3fs's settings (an endpoint or region from a profile): its "not
    found" is checked with s3fs before a reader takes the file for vanished."""
    import types

    from pipeline import storage

    out, cfg = _s3_ledger(s3fs_client, s3_endpoint, "elsewhere-ledger", n=3)
    monkeypatch.setattr(storage, "_ARROW_S3_OFF", [])

    def not_here(path):
        raise FileNotFoundError(f"Path does not exist '{path}'")

    monkeypatch.setattr(storage, "_arrow_s3", lambda bucket, cfg: types.SimpleNamespace(open_input_stream=not_here))
    with caplog.at_level(logging.WARNING, logger="pipeline.storage"):
        assert ledger.load_results(out, cfg).num_rows == 6
    assert storage._ARROW_S3_OFF and sum("where s3fs read it" in r.message for r in caplog.records) == 1


def test_when_arrows_s3_client_fails_the_ledger_is_read_through_s3fs(s3_endpoint, s3fs_client, monkeypatch, caplog):
    """A client Arrow cannot use here (credentials, region, an endpoint it reaches otherwise: a closed port
    stands in) costs one warning: every file is read through s3fs, and the process keeps to s3fs."""
    import pyarrow.fs as pafs

    from pipeline import storage
    from conftest import free_port

    out, cfg = _s3_ledger(s3fs_client, s3_endpoint, "fallback-ledger")
    monkeypatch.setattr(storage, "_ARROW_S3_OFF", [])
    broken = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{free_port()}", scheme="http", region="us-east-1",
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1), connect_timeout=1)
    asked = []
    monkeypatch.setattr(storage, "_arrow_s3", lambda bucket, cfg: asked.append(bucket) or broken)
    with caplog.at_level(logging.WARNING, logger="pipeline.storage"):
        got = ledger.load_results(out, cfg)
    assert got.num_rows == 24 and len(set(got["image_id"].to_pylist())) == 24
    assert storage._ARROW_S3_OFF and 1 <= len(asked) <= 16  # the threads already reading when it failed
    assert sum("reading through s3fs from now on" in r.message for r in caplog.records) == 1
    asked.clear()
    assert ledger.load_results(out, cfg).num_rows == 24 and not asked


def test_a_file_cut_by_a_rewrite_between_arrows_size_and_read_is_read_again(s3_endpoint, s3fs_client, monkeypatch):
    """Arrow's client reads a file's size, then that many bytes: a retried batch rewriting the file in between
    hands the reader a cut file. It is read again in one GET instead of being called damaged."""
    from pipeline import storage

    out, cfg = _s3_ledger(s3fs_client, s3_endpoint, "rewritten-ledger", n=2)
    cut = []

    def half(uri, cfg):
        data = storage.read_bytes(uri, cfg)
        cut.append(uri)
        return data[: len(data) // 2]

    monkeypatch.setattr(storage, "read_small", half)
    assert ledger.load_results(out, cfg).num_rows == 4 and len(cut) == 2
