import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import RunConfig, InputConfig, StorageConfig
from pipeline.errors import ManifestError
from pipeline.manifest import build_manifest, image_id_for, list_images, read_manifest


def _cfg(path, **kw):
    return RunConfig(input=InputConfig(manifest=str(path), **kw))


def test_csv_with_relative_paths_ids_and_passthrough(tmp_path):
    (tmp_path / "m.csv").write_text("uri,image_id,collection\nphotos/a.jpg,007,A\nphotos/b.jpg,,B\nphotos/a.jpg,007,A\n,,C\n")
    m = read_manifest(_cfg(tmp_path / "m.csv"))
    t = m.table
    assert t["uri"].to_pylist() == [str(tmp_path / "photos/a.jpg"), str(tmp_path / "photos/b.jpg")]
    assert t["image_id"].to_pylist()[0] == "007"  # kept as a string, not the integer 7
    assert t["image_id"].to_pylist()[1] == image_id_for(str(tmp_path / "photos/b.jpg"))
    assert t["collection"].to_pylist() == ["A", "B"]
    assert (m.rows_read, m.duplicates, m.without_uri) == (4, 1, 1)
    assert m.root == str(tmp_path / "photos") + "/"
    assert m.passthrough.names == ["collection"]


def test_parquet_folder_and_jsonl(tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"uri": [f"/x/{i}.jpg"], "n": [i]}), d / f"p{i}.parquet")
    assert read_manifest(_cfg(d)).table.num_rows == 3
    (tmp_path / "m.jsonl").write_text('{"uri": "/x/1.jpg"}\n{"uri": "/x/2.jpg"}\n')
    assert read_manifest(_cfg(tmp_path / "m.jsonl")).table.num_rows == 2


def test_errors_name_the_problem(tmp_path):
    pq.write_table(pa.table({"path": ["/a.jpg"]}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="no 'uri' column .*path"):
        read_manifest(_cfg(tmp_path / "m.parquet"))
    assert read_manifest(_cfg(tmp_path / "m.parquet", uri_column="path")).table.num_rows == 1
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(_cfg(tmp_path / "nope.parquet"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="cannot be read"):
        read_manifest(_cfg(tmp_path / "bad.parquet"))


def test_listing_is_recursive_and_case_insensitive(tmp_path):
    for rel in ["a/X.JPG", "a/b/y.Png", "z.tiff", "notes.txt", ".hidden.jpg"]:
        p = tmp_path / "in" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    found = list_images(str(tmp_path / "in"), StorageConfig())
    assert [f.split("/in/")[1] for f in found] == ["a/X.JPG", "a/b/y.Png", "z.tiff"]
    n = build_manifest(str(tmp_path / "in"), str(tmp_path / "m.parquet"), StorageConfig())
    assert n == 3 and pq.read_table(tmp_path / "m.parquet").num_rows == 3


def test_blank_uris_and_duplicate_ids_across_files(tmp_path):
    """Blank URIs (Unicode white space included) are counted and left out; a duplicate id keeps its first
    row, in manifest order, even when the copies sit in different files of a Parquet folder."""
    d = tmp_path / "parts"
    d.mkdir()
    pq.write_table(pa.table({"uri": ["/x/a.jpg", " \u00a0\u2003", "/x/b.jpg", None], "image_id": ["1", "2", "3", "4"],
                             "n": [0, 1, 2, 3]}), d / "p0.parquet")
    pq.write_table(pa.table({"uri": ["/x/c.jpg", "/x/a-again.jpg", "\t\x0b\x1c\x1f"], "image_id": ["5", "1", "6"],
                             "n": [4, 5, 6]}), d / "p1.parquet")
    m = read_manifest(_cfg(d))
    assert m.table["image_id"].to_pylist() == ["1", "3", "5"]
    assert m.table["uri"].to_pylist() == ["/x/a.jpg", "/x/b.jpg", "/x/c.jpg"]
    assert m.table["n"].to_pylist() == [0, 2, 4]
    assert (m.rows_read, m.duplicates, m.without_uri) == (7, 1, 3)


def test_uri_column_doubling_as_the_id_column(tmp_path):
    pq.write_table(pa.table({"uri": ["/x/a.jpg", "/x/b.jpg", "/x/a.jpg"]}), tmp_path / "m.parquet")
    m = read_manifest(_cfg(tmp_path / "m.parquet", id_column="uri"))
    assert m.table["image_id"].to_pylist() == ["/x/a.jpg", "/x/b.jpg"] and m.duplicates == 1


def test_a_manifest_column_named_like_one_of_ours_is_carried_under_another_name(tmp_path, caplog):
    """Museum manifests have 'notes', 'width' or 'status' columns; the pipeline writes columns of those
    names. Theirs must not be overwritten or dropped (nor steer planning, as a 'prior_faces' column
    would): it travels as manifest_<name>, said once in the log."""
    pq.write_table(pa.table({"path": ["/x/a.jpg", "/x/b.jpg"], "notes": ["torn corner", None],
                             "width": [12.5, 20.0], "status": ["catalogued", "on loan"],
                             "prior_faces": ["?", "?"], "uri": ["old", "old"], "output_key": ["k1", "k2"],
                             "access_key": ["a", "b"], "_i": [7, 8], "shelf": [1, 2]}), tmp_path / "m.parquet")
    m = read_manifest(_cfg(tmp_path / "m.parquet", uri_column="path"))
    assert m.passthrough.names == ["manifest_notes", "manifest_width", "manifest_status", "manifest_prior_faces",
                                   "manifest_uri", "manifest_output_key", "manifest_access_key", "manifest__i",
                                   "shelf"]
    assert m.table["manifest_notes"].to_pylist() == ["torn corner", None]
    assert m.table["manifest_output_key"].to_pylist() == ["k1", "k2"]
    assert m.table["uri"].to_pylist() == ["/x/a.jpg", "/x/b.jpg"]
    assert "manifest_notes" in caplog.text and "'notes'" in caplog.text
    from pipeline.schema import RESERVED_COLUMNS, RESULT_SCHEMA, WORK_SCHEMA

    assert set(WORK_SCHEMA.names) | set(RESULT_SCHEMA.names) <= RESERVED_COLUMNS
    # a renamed column that would clash again is refused, naming both
    pq.write_table(pa.table({"uri": ["/x/a.jpg"], "notes": ["n"], "manifest_notes": ["m"]}), tmp_path / "m2.parquet")
    with pytest.raises(ManifestError, match="'notes'.*'manifest_notes'"):
        read_manifest(_cfg(tmp_path / "m2.parquet"))
