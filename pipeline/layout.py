"""Where a run writes, and the proof that it never writes on an input.

Every write of a run lands in one of the output's areas (``WRITE_AREAS``). Before any write, ``check``
refuses a layout where an area could reach an input, with symlinks and ``..`` resolved (local paths) or
``.``/``..``/``//`` folded (object stores, where some clients and proxies fold them):

- no input image, and not the manifest, lies on or under a write area (``-o /x`` with ``/x/images/a.jpg``
  listed, also through a symlinked folder or ``..``);
- the output does not lie on or under the input root (an output inside the archive, or a symlink to it,
  would put derivatives among the originals and into the next listing of the archive).

At the write itself ``WriteGuard.check`` refuses a target whose resolved location has left its area (a
folder swapped for a symlink mid-run) or is the image's own input (by path, and on a local disk by inode).
With the preflight proof that no manifest entry lies in a write area, a derivative is never written to a
URI of the manifest.
"""

from __future__ import annotations

import logging
import os

import pyarrow as pa
import pyarrow.compute as pc

from . import storage
from .errors import StorageError

log = logging.getLogger(__name__)

WRITE_AREAS = ("images", "access", "_results", "_runs", "_lock", "report")


class UnsafeWrite(StorageError):
    """A write that would land on an input or outside its area."""


def _inside_any(uris: pa.Array, parent: str) -> pa.Array:
    p = parent.rstrip("/")
    return pc.or_(pc.equal(uris, p), pc.starts_with(uris, p + "/"))


def resolve_inputs(uris: pa.Array) -> pa.Array:
    """Each input's resolved location. Local: every distinct folder is resolved once (``realpath``), and a
    file that is itself a symlink (found with one ``scandir`` per folder, no ``stat`` per file) is resolved
    on its own. Remote: ``.``/``..`` folded where a URI has such segments."""
    uris = uris.combine_chunks() if isinstance(uris, pa.ChunkedArray) else uris
    remote = pc.match_substring_regex(uris, r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
    local = pc.and_(pc.invert(remote), pc.invert(pc.starts_with(uris, "file://")))
    out = uris
    odd = pc.and_(remote, pc.match_substring_regex(uris, r"(/\.\.?(/|$))|(://.*//)"))
    if pc.any(odd).as_py():
        out = pc.replace_with_mask(out, odd, pa.array([storage.resolve(u) for u in uris.filter(odd).to_pylist()],
                                                      pa.string()))
    if not pc.any(local).as_py():
        return out
    paths = uris.filter(local)
    dirs = pc.replace_substring_regex(paths, r"/[^/]*$", "")
    base = pc.replace_substring_regex(paths, r"^.*/", "")
    distinct = pc.unique(dirs)
    real = pa.array([os.path.realpath(d or "/") for d in distinct.to_pylist()], pa.string())
    resolved = pc.binary_join_element_wise(pc.take(real, pc.index_in(dirs, value_set=distinct)), base, "/")
    resolved = pc.replace_substring_regex(resolved, "^//", "/")
    links = _symlinked_files(distinct.to_pylist())
    if links:
        is_link = pc.is_in(paths, value_set=pa.array(sorted(links), pa.string()))
        if pc.any(is_link).as_py():
            resolved = pc.replace_with_mask(resolved, is_link, pa.array(
                [os.path.realpath(p) for p in paths.filter(is_link).to_pylist()], pa.string()))
    return pc.replace_with_mask(out, local, resolved)


def _symlinked_files(dirs: list[str]) -> set[str]:
    found = set()
    for d in dirs:
        try:
            with os.scandir(d or "/") as it:
                found |= {os.path.join(d, e.name) for e in it if e.is_symlink()}
        except OSError:  # a folder that cannot be listed holds inputs that cannot be read: their rows say so
            continue
    return found


def _shallow(root: str) -> bool:
    """A filesystem root or a bare bucket: too coarse to stand for "the archive"."""
    if not storage.is_remote(root):
        return root.rstrip("/") == ""
    rest = root.split("://", 1)[1].strip("/")
    return "/" not in rest


def check(uris: pa.Array, manifest_uri: str | None, output_root: str, input_root: str) -> None:
    """Raise StorageError, naming an example and the fix, for a layout where a write could reach an input."""
    out = storage.normalize(output_root)
    out_real = storage.resolve(out)
    resolved = resolve_inputs(uris)
    forms = [(out_real, resolved)]
    if storage.is_remote(out):
        forms.append((out, uris))  # an object store may or may not fold "..": refuse if either reading overlaps
    for root, inputs in forms:
        for area in WRITE_AREAS:
            hit = _inside_any(inputs, storage.join(root, area))
            if pc.any(hit).as_py():
                n, example = pc.sum(hit).as_py(), uris.filter(hit)[0].as_py()
                raise StorageError(
                    f"{n} input(s) lie in the output's {area}/ folder ({example!r} is under "
                    f"{storage.join(root, area)!r}): the run would write over originals. Choose an output "
                    "outside the archive, or move the originals out of it")
    if manifest_uri:
        m = storage.resolve(manifest_uri)
        for area in WRITE_AREAS:
            if storage.is_inside(m, storage.join(out_real, area)):
                raise StorageError(f"the manifest {manifest_uri!r} lies in the output's {area}/ folder: "
                                   "move it, or choose another output")
    if not len(uris):
        return
    roots = [storage.resolve(input_root)] if input_root and not _shallow(storage.resolve(input_root)) else []
    if not roots:  # inputs spread over a whole disk or bucket: every folder that holds one counts
        roots = pc.unique(pc.replace_substring_regex(resolved, r"/[^/]*$", "")).to_pylist()
    for r in roots:
        if storage.is_inside(out_real, r) or (storage.is_remote(out) and storage.is_inside(out, r)):
            shown = out if out == out_real else f"{out} (really {out_real})"
            raise StorageError(f"the output {shown!r} is inside the input {r!r}: choose an output outside it, "
                               "so derivatives can never overwrite or be mistaken for originals")


class WriteGuard:
    """The last check before a derivative or access copy is written (see the module docstring)."""

    def __init__(self, output_root: str):
        self.areas = {a: storage.resolve(storage.join(output_root, a)) for a in ("images", "access")}

    def check(self, target: str, area: str, source: str) -> None:
        real = storage.resolve(target)
        if not storage.is_inside(real, self.areas[area]):
            raise UnsafeWrite(f"refused to write {target}: it resolves to {real}, outside the output's {area}/ "
                              "folder (a symlink?)")
        if real == storage.resolve(source):
            raise UnsafeWrite(f"refused to write {target}: it is this image's own input")
        if not storage.is_remote(target) and not storage.is_remote(source):
            try:
                same = os.path.samefile(target, source)
            except OSError:  # one of them does not exist: cannot be the same file
                same = False
            if same:
                raise UnsafeWrite(f"refused to write {target}: it is the same file as this image's input {source}")
