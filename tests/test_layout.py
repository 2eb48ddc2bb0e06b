"""Layouts where a write of the run could reach an input are refused before anything is written; the guard
at the write refuses what the layout check could not see coming."""

import os

import pyarrow as pa
import pytest

from pipeline import layout
from pipeline.errors import StorageError


def _files(d, names=("a.jpg", "b.jpg")):
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        (d / n).write_bytes(b"original " + n.encode())
    return [str(d / n) for n in names]


def _check(uris, out, root, manifest=None):
    layout.check(pa.array([str(u) for u in uris]), manifest, str(out), root)


@pytest.mark.parametrize("area", layout.WRITE_AREAS)
def test_inputs_in_any_write_area_are_refused(tmp_path, area):
    uris = _files(tmp_path / "x" / area)
    with pytest.raises(StorageError, match=f"output's {area}/"):
        _check(uris, tmp_path / "x", str(tmp_path / "x" / area) + "/")


def test_symlinks_and_dotdot_are_resolved(tmp_path):
    uris = _files(tmp_path / "x" / "images")
    os.symlink(tmp_path / "x" / "images", tmp_path / "link")
    with pytest.raises(StorageError, match="images/"):
        _check([tmp_path / "link" / "a.jpg"], tmp_path / "x", str(tmp_path / "link") + "/")
    os.symlink(tmp_path / "x" / "images" / "a.jpg", tmp_path / "file-link.jpg")
    with pytest.raises(StorageError, match="images/"):
        _check([tmp_path / "file-link.jpg"], tmp_path / "x", str(tmp_path) + "/")
    os.symlink(tmp_path / "in", tmp_path / "out-link")
    ins = _files(tmp_path / "in")
    with pytest.raises(StorageError, match="inside the input"):
        _check(ins, tmp_path / "out-link", str(tmp_path / "in") + "/")
    assert uris


def test_the_manifest_in_a_write_area_is_refused(tmp_path):
    ins = _files(tmp_path / "in")
    with pytest.raises(StorageError, match="manifest"):
        _check(ins, tmp_path / "out", str(tmp_path / "in") + "/", manifest=str(tmp_path / "out" / "_results" / "m.csv"))


def test_s3_layouts_are_refused_with_and_without_folding(tmp_path):
    with pytest.raises(StorageError, match="images/"):
        _check(["s3://b/x/images/a.jpg"], "s3://b/x", "s3://b/x/images/")
    with pytest.raises(StorageError, match="images/"):
        _check(["s3://b/x/q/../images/a.jpg"], "s3://b/x", "s3://b/x/q/")
    with pytest.raises(StorageError, match="inside the input"):
        _check(["s3://b/scans/a.jpg", "s3://b/scans/c/d.jpg"], "s3://b/scans/restored", "s3://b/scans/")


def test_safe_layouts_pass(tmp_path):
    ins = _files(tmp_path / "archive" / "scans")
    _check(ins, tmp_path / "restored", str(tmp_path / "archive" / "scans") + "/")
    # an output that contains the archive but writes only into its own areas
    _check(ins, tmp_path / "archive", str(tmp_path / "archive" / "scans") + "/")
    # inputs spread over two buckets: every folder holding one counts as input, the output is elsewhere
    _check(["s3://one/a.jpg", "s3://two/b.jpg"], "s3://three/out", "s3://")
    _check(["s3://museum/scans/a.jpg", "s3://museum/photos/b.jpg"], "s3://museum/restored", "s3://museum/")
    with pytest.raises(StorageError, match="inside the input"):
        _check(["s3://museum/scans/a.jpg", "s3://museum/photos/b.jpg"], "s3://museum/scans/out", "s3://museum/")


def test_the_write_guard_refuses_what_appears_mid_run(tmp_path):
    out = tmp_path / "out"
    guard = layout.WriteGuard(str(out))
    src = _files(tmp_path / "in")[0]
    guard.check(str(out / "images" / "a.jpg"), "images", src)  # fine
    # the images folder is swapped for a symlink to the archive after the run started
    out.mkdir()
    os.symlink(tmp_path / "in", out / "images")
    with pytest.raises(layout.UnsafeWrite, match="outside the output's images/"):
        guard.check(str(out / "images" / "a.jpg"), "images", src)
    # a hard link of the input where the derivative goes: the same file by inode
    other = tmp_path / "out2"
    (other / "images").mkdir(parents=True)
    os.link(src, other / "images" / "a.jpg")
    with pytest.raises(layout.UnsafeWrite, match="same file"):
        layout.WriteGuard(str(other)).check(str(other / "images" / "a.jpg"), "images", src)
    with pytest.raises(layout.UnsafeWrite, match="own input"):
        layout.WriteGuard("s3://b/out").check("s3://b/out/images/a.jpg", "images", "s3://b/out/images/./a.jpg")


def test_one_protocol_under_two_spellings_is_one_location():
    with pytest.raises(StorageError, match="images/"):
        _check(["s3a://b/x/images/a.jpg"], "s3://b/x", "s3a://b/x/images/")
    with pytest.raises(layout.UnsafeWrite, match="own input"):
        layout.WriteGuard("s3://b/out").check("s3://b/out/images/a.jpg", "images", "s3a://b/out/images/a.jpg")


_IN_NAMESPACE = """
import os, sys, pyarrow as pa
from pipeline import layout
from pipeline.errors import StorageError
a, b = sys.argv[1], sys.argv[2]
assert os.system(f"mount --bind {a} {b}") == 0, "mount --bind failed"
try:
    layout.check(pa.array([f"{a}/x.jpg", f"{a}/images/x.jpg"]), None, b, a + "/")
    print("ACCEPTED")
except StorageError as e:
    print("REFUSED", e)
"""


def test_a_folder_under_two_names_is_one_folder(tmp_path):
    """A bind mount (or a share mounted twice): no string comparison can see it, folder identity does."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None:
        pytest.fail("util-linux's unshare is needed (it keeps the test's bind mount in its own namespace)")
    a, b = tmp_path / "a", tmp_path / "b"
    _files(a, ("x.jpg",))
    _files(a / "images", ("x.jpg",))
    b.mkdir()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for flags in (["-m"], ["-r", "-m"]):  # as root; else in a user namespace of our own
        r = subprocess.run(["unshare", *flags, "--propagation", "private", sys.executable, "-c", _IN_NAMESPACE,
                            str(a), str(b)], capture_output=True, text=True, cwd=repo)
        if "REFUSED" in r.stdout or "ACCEPTED" in r.stdout:
            break
    assert "REFUSED" in r.stdout and "another name" in r.stdout, r.stdout + r.stderr


def test_a_symlinked_input_in_a_folder_that_cannot_be_listed(tmp_path, monkeypatch):
    """Mode 0711: its files are read by name, but listing it fails (for anyone but root, who runs this test:
    the failure is injected at the listing); its files are then resolved one by one."""
    _files(tmp_path / "out" / "images", ("a.jpg",))
    private = tmp_path / "in" / "private"
    private.mkdir(parents=True)
    os.symlink(tmp_path / "out" / "images" / "a.jpg", private / "a.jpg")
    real_scandir = os.scandir

    def scandir(path):
        if os.path.realpath(path) == str(private):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(layout.os, "scandir", scandir)
    with pytest.raises(StorageError, match="images/"):
        _check([private / "a.jpg"], tmp_path / "out", str(private) + "/")
