import os

import pytest

from pipeline import keys, storage
from pipeline.config import StorageConfig


@pytest.mark.parametrize("rel,key", [
    ("a/b/c.jpg", "a/b/c.jpg"),
    ("../../etc/passwd", "__/__/etc/passwd"),
    ("a/./b//c.jpg", "a/b/c.jpg"),
    ("/abs/x.png", "abs/x.png"),
    ("Ölgemälde von Anna/Foto 1.JPG", "Ölgemälde von Anna/Foto 1.JPG"),
    ("a\\..\\b.jpg", "a/__/b.jpg"),
    ("bad\x00name?.tif", "bad_name_.tif"),
])
def test_sanitized_keys_stay_below_the_root(rel, key, tmp_path):
    got = keys.sanitize_key(rel)
    assert got == key
    root = tmp_path / "out"
    assert storage.is_inside(os.path.join(root, got), str(root))


def test_output_key_is_relative_to_root_or_external():
    got = keys.output_keys(["/data/archive/x/y.jpg", "/elsewhere/y.jpg", "/data/archive/.."],
                           "/data/archive/", ["id1", "id1", "id3"]).to_pylist()
    assert got == ["x/y.jpg", "_external/id1/y.jpg", "__"]
    assert keys.output_keys(["s3://b/scans/a b.jpg"], "s3://b/scans/", ["i"]).to_pylist() == ["a b.jpg"]


def test_common_root_and_is_inside():
    assert keys.common_root(["/a/bc/x.jpg", "/a/bd/y.jpg"]) == "/a/"
    assert keys.common_root(["s3://b/p/x.jpg", "s3://b/p/q/y.jpg"]) == "s3://b/p/"
    assert storage.is_inside("/a/b/c", "/a/b") and not storage.is_inside("/a/bc", "/a/b")
    assert storage.is_inside("s3://b/x/out", "s3://b/x/") and not storage.is_inside("s3://b/xy", "s3://b/x")


def test_atomic_local_write_leaves_no_temp_files(tmp_path):
    cfg = StorageConfig()
    target = str(tmp_path / "d" / "f.bin")
    storage.write_bytes(target, b"one", cfg)
    storage.write_bytes(target, b"two", cfg)
    assert storage.read_bytes(target, cfg) == b"two"
    assert os.listdir(tmp_path / "d") == ["f.bin"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "missing"), cfg)


def test_name_below_compares_whole_segments():
    assert storage.name_below("s3://b/out/images/x/a.jpg", "s3://b/out/images") == "x/a.jpg"
    assert storage.name_below("s3://b/out/images/x/a.jpg", "s3://b/out/images/") == "x/a.jpg"
    assert storage.name_below("s3://b/out/images2/a.jpg", "s3://b/out/images") is None
    assert storage.name_below("/old/out/images/a.jpg", "/new/out/images") is None
