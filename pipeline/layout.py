"""Where a run writes, and the proof that it never writes on an input.

Every write of a run lands in one of the output's areas (``WRITE_AREAS``). Before any write, ``check``
refuses a layout where an area could reach an input:

- no input image, and not the manifest, lies on or under a write area (``-o /x`` with ``/x/images/a.jpg``
  listed, also through a symlinked folder or file, or ``..``);
- the output does not lie on or under the input root (an output inside the archive, or a symlink to it,
  would put derivatives among the originals and into the next listing of the archive).

Paths are compared resolved: symlinks and ``..`` (local), one spelling per protocol and ``.``/``..``/``//``
folded (object stores; both the folded and the literal reading of a key are checked). On a local disk
folders are also compared by identity (device and inode), which sees through what string comparison
cannot: a bind mount or a share mounted twice, and case-insensitive filesystems (``Images`` is
``images``). At the write itself ``WriteGuard.check`` refuses a target whose resolved location has left
its area (a folder swapped for a symlink mid-run), is the image's own input (by path, and by inode), or
lies in a folder that holds inputs. With the preflight proof that no manifest entry lies in a write area,
a derivative is never written to a URI of the manifest.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import storage
from .errors import StorageError

log = logging.getLogger(__name__)

WRITE_AREAS = ("images", "access", "review", "_results", "_history", "_runs", "_lock", "_verify", "report")
_REMOTE = r"^[a-zA-Z][a-zA-Z0-9+.-]*://"


class UnsafeWrite(StorageError):
    """A write that would land on an input or outside its area."""


def _inside_any(uris: pa.Array, parent: str) -> pa.Array:
    p = parent.rstrip("/")
    return pc.or_(pc.equal(uris, p), pc.starts_with(uris, p + "/"))


def _canonical_schemes(uris: pa.Array) -> pa.Array:
    for alias, scheme in storage.SCHEME_ALIASES.items():
        uris = pc.replace_substring_regex(uris, f"(?i)^{alias}://", f"{scheme}://")
    return uris


def _literal(uri: str) -> str:
    """A remote URI as written, but with one spelling per protocol (no folding of its path)."""
    scheme, rest = uri.split("://", 1)
    return f"{storage.SCHEME_ALIASES.get(scheme.lower(), scheme.lower())}://{rest}"


def _folder_key(st: os.stat_result) -> int:
    """A folder's identity (device, inode) as one int64, for a sorted array any task can search."""
    return hash((st.st_dev, st.st_ino))


@dataclass
class Inputs:
    """The inputs, resolved: their locations, and (local) the identities of the folders that hold them."""
    resolved: pa.Array
    folders: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # sorted _folder_key values


def resolve_inputs(uris: pa.Array) -> Inputs:
    """Each input's resolved location. Local: every distinct folder is resolved once (``realpath``), and a
    file that is itself a symlink (found with one ``scandir`` per folder, no ``stat`` per file; per file in
    a folder that can be entered but not listed) is resolved on its own. Remote: ``.``/``..`` folded
    where a URI has such segments, one spelling per protocol."""
    uris = uris.combine_chunks() if isinstance(uris, pa.ChunkedArray) else uris
    remote = pc.match_substring_regex(uris, _REMOTE)
    local = pc.invert(remote)
    out = _canonical_schemes(uris)
    odd = pc.and_(remote, pc.match_substring_regex(uris, r"(/\.\.?(/|$))|(://.*//)"))
    if pc.any(odd).as_py():
        out = pc.replace_with_mask(out, odd, pa.array([storage.resolve(u) for u in uris.filter(odd).to_pylist()],
                                                      pa.string()))
    if not pc.any(local).as_py():
        return Inputs(out)
    paths = uris.filter(local)
    dirs = pc.replace_substring_regex(paths, r"/[^/]*$", "")
    base = pc.replace_substring_regex(paths, r"^.*/", "")
    distinct = pc.unique(dirs)
    real = pa.array([os.path.realpath(d or "/") for d in distinct.to_pylist()], pa.string())
    resolved = pc.binary_join_element_wise(pc.take(real, pc.index_in(dirs, value_set=distinct)), base, "/")
    resolved = pc.replace_substring_regex(resolved, "^//", "/")
    links, unlisted = _symlinked_files(distinct.to_pylist())
    one_by_one = pc.is_in(paths, value_set=pa.array(sorted(links), pa.string()))
    if unlisted:
        one_by_one = pc.or_(one_by_one, pc.is_in(dirs, value_set=pa.array(sorted(unlisted), pa.string())))
    if pc.any(one_by_one).as_py():
        resolved = pc.replace_with_mask(resolved, one_by_one, pa.array(
            [os.path.realpath(p) for p in paths.filter(one_by_one).to_pylist()], pa.string()))
    folders = {_folder_key(st) for st in _stats(set(real.to_pylist()))}
    return Inputs(pc.replace_with_mask(out, local, resolved), np.array(sorted(folders), np.int64))


def _stats(paths) -> list[os.stat_result]:
    out = []
    for p in paths:
        try:
            out.append(os.stat(p))
        except OSError:
            continue
    return out


def _symlinked_files(dirs: list[str]) -> tuple[set[str], set[str]]:
    """Files that are symlinks, and folders that could not be listed (their files are resolved one by one)."""
    found, unlisted = set(), set()
    for d in dirs:
        try:
            with os.scandir(d or "/") as it:
                found |= {os.path.join(d, e.name) for e in it if e.is_symlink()}
        except OSError:  # e.g. mode 0711: files readable by name, the folder not listable
            unlisted.add(d)
    return found, unlisted


def _ancestors(path: str) -> list[str]:
    out = [path]
    while path not in ("/", ""):
        path = os.path.dirname(path)
        out.append(path)
    return out


def _shallow(root: str) -> bool:
    """A filesystem root or a bare bucket: too coarse to stand for "the archive"."""
    if not storage.is_remote(root):
        return root.rstrip("/") == ""
    rest = root.split("://", 1)[1].strip("/")
    return "/" not in rest


def check(uris: pa.Array, manifest_uri: str | None, output_root: str, input_root: str) -> Inputs:
    """Raise StorageError, naming an example and the fix, for a layout where a write could reach an input;
    return the resolved inputs (the write guard needs their folders)."""
    out = storage.normalize(output_root)
    out_real = storage.resolve(out)
    inputs = resolve_inputs(uris)
    forms = [(out_real, inputs.resolved)]
    if storage.is_remote(out):  # an object store may or may not fold "..": refuse if either reading overlaps
        forms.append((_literal(out), _canonical_schemes(uris)))
    for root, resolved in forms:
        for area in WRITE_AREAS:
            hit = _inside_any(resolved, storage.join(root, area))
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
        return inputs
    roots = [storage.resolve(input_root)] if input_root and not _shallow(storage.resolve(input_root)) else []
    if not roots:  # inputs spread over a whole disk or bucket: every folder that holds one counts
        roots = pc.unique(pc.replace_substring_regex(inputs.resolved, r"/[^/]*$", "")).to_pylist()
    out_forms = [out_real] + ([_literal(out)] if storage.is_remote(out) else [])
    for r in roots:
        if any(storage.is_inside(o, r) for o in out_forms):
            shown = out if out == out_real else f"{out} (really {out_real})"
            raise StorageError(f"the output {shown!r} is inside the input {r!r}: choose an output outside it, "
                               "so derivatives can never overwrite or be mistaken for originals")
    if not storage.is_remote(out):
        _check_identities(out_real, inputs, roots)
    return inputs


def _check_identities(out_real: str, inputs: Inputs, roots: list[str]) -> None:
    """The same checks by folder identity: a bind mount, a share mounted twice or a case-insensitive
    filesystem gives one folder two names that no string comparison can match."""
    input_dirs = set(pc.unique(pc.replace_substring_regex(inputs.resolved, r"/[^/]*$", "")).to_pylist())
    seen = set()
    for d in input_dirs:
        for a in _ancestors(d or "/"):
            if a in seen:
                break
            seen.add(a)
    holding = {_folder_key(st) for st in _stats(seen)}  # every folder on the way to an input
    for area in WRITE_AREAS:
        try:
            st = os.stat(os.path.join(out_real, area))
        except OSError:
            continue  # not there: nothing can be in it
        if _folder_key(st) in holding:
            raise StorageError(f"the output's {area}/ folder ({os.path.join(out_real, area)!r}) is a folder of the "
                               "inputs under another name (a bind mount, a share mounted twice, or a case-"
                               "insensitive filesystem): the run would write over originals. Choose another output")
    root_keys = {_folder_key(st) for st in _stats(r for r in roots if not storage.is_remote(r))}
    for a in _ancestors(out_real):
        try:
            if _folder_key(os.stat(a)) in root_keys:
                raise StorageError(f"the output {out_real!r} is inside the input ({a!r} is the input root under "
                                   "another name): choose an output outside it")
        except OSError:
            continue


class WriteGuard:
    """The last check before a derivative or access copy is written (see the module docstring)."""

    def __init__(self, output_root: str, input_folders: np.ndarray | None = None):
        self.areas = {a: storage.resolve(storage.join(output_root, a)) for a in ("images", "access", "review")}
        self.input_folders = input_folders if input_folders is not None else np.zeros(0, np.int64)

    def check(self, target: str, area: str, source: str) -> None:
        real = storage.resolve(target)
        if not storage.is_inside(real, self.areas[area]):
            raise UnsafeWrite(f"refused to write {target}: it resolves to {real}, outside the output's {area}/ "
                              "folder (a symlink?)")
        if real == storage.resolve(source):
            raise UnsafeWrite(f"refused to write {target}: it is this image's own input")
        if storage.is_remote(target):
            return
        if not storage.is_remote(source):
            try:
                same = os.path.samefile(target, source)
            except OSError:  # one of them does not exist: cannot be the same file
                same = False
            if same:
                raise UnsafeWrite(f"refused to write {target}: it is the same file as this image's input {source}")
        if len(self.input_folders):
            try:
                key = _folder_key(os.stat(os.path.dirname(real)))
            except OSError:
                return  # the folder does not exist yet: it holds no input
            i = np.searchsorted(self.input_folders, key)
            if i < len(self.input_folders) and self.input_folders[i] == key:
                raise UnsafeWrite(f"refused to write {target}: its folder holds inputs (under another name)")
