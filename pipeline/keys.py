"""Output keys: where each image's derivative (``images/<key>``) and access copy (``access/<key>``) go.

A key is the image's path relative to the input root, sanitised so that it can never leave the output
root: ``..`` and ``.`` segments, empty segments, control characters and characters invalid on common
filesystems are neutralised; letters of any script and inner spaces are kept (NFC) so that keys stay
recognisable. Sanitising maps some different paths to one key (``a?b``/``a*b``, ``x ``/``x``, NFD/NFC
spellings), and a fixed output format maps ``a.png`` and ``a.tif`` to one file; so keys are assigned
for a whole manifest at once, with Arrow kernels (millions of rows in seconds), and every image whose
file name would be shared gets a short suffix from its id: ``a_b~3f09c2d1.jpg``. Who keeps the plain
name is decided the same way on every run: the image whose result already holds it, else the one whose
path needed no change. Nothing is ever overwritten silently.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .imageio import EXTENSIONS, FORMATS

log = logging.getLogger(__name__)

_UNSAFE = r"[\x00-\x1f\x7f\\:*?\"<>|]"
# What str.strip() removes once control characters are gone: Unicode separators and NEL (tested).
_EDGE_SPACE = r"^[\p{Z}\x{85}]+|[\p{Z}\x{85}]+$"
_EXT = r"\.[^./]*$"


def _as_array(values) -> pa.Array:
    values = pa.array(values, pa.string()) if not isinstance(values, (pa.Array, pa.ChunkedArray)) else values
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


# A path that needs no sanitising: printable ASCII (NFC leaves it alone) without an unsafe character, an
# empty, all-dots or space-edged segment. Most archives' paths are like this and skip the segment work.
_ASCII = r"^[\x20-\x7e]+$"
_DIRTY = r"[\\:*?\"<>|]|//|^/|/$|(^|/)\.+(/|$)|(^|/) | (/|$)|^ | $"


def sanitize_keys(relative) -> pa.Array:
    """Sanitised keys of relative paths, vectorised; "" where no usable segment is left."""
    rel = _as_array(relative)
    clean = pc.and_(pc.fill_null(pc.match_substring_regex(rel, _ASCII), False),
                    pc.invert(pc.fill_null(pc.match_substring_regex(rel, _DIRTY), True)))
    if pc.all(clean).as_py():
        return rel
    dirty = pc.invert(clean)
    if pc.any(clean).as_py():
        return pc.replace_with_mask(rel, dirty, _sanitize(rel.filter(dirty)))
    return _sanitize(rel)


def _sanitize(relative: pa.Array) -> pa.Array:
    rel = pc.replace_substring(pc.utf8_normalize(relative, form="NFC"), "\\", "/")
    segments = pc.split_pattern(rel, "/")
    flat = pc.list_flatten(segments)
    parent = pc.list_parent_indices(segments)
    flat = pc.replace_substring_regex(pc.replace_substring_regex(flat, _UNSAFE, "_"), _EDGE_SPACE, "")
    keep = pc.invert(pc.or_(pc.equal(flat, ""), pc.equal(flat, ".")))
    dots = pc.match_substring_regex(flat, r"^\.+$")
    flat = pc.if_else(dots, pc.replace_substring(flat, ".", "_"), flat).filter(keep)
    counts = np.bincount(np.asarray(parent.filter(keep), np.int64), minlength=len(rel))
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    return pc.binary_join(pa.ListArray.from_arrays(offsets, flat), "/")


def sanitize_key(relative: str) -> str:
    """One relative path's key (see ``sanitize_keys``); ValueError when nothing usable is left."""
    key = sanitize_keys([relative])[0].as_py()
    if not key:
        raise ValueError(f"no usable path segment in {relative!r}")
    return key


def output_keys(uris, root: str, image_ids) -> pa.Array:
    """Keys of the images at ``uris``: their paths relative to ``root``, sanitised. A URI outside ``root``
    (possible when the user sets ``input.root``) goes under ``_external/<image_id>/`` instead."""
    uris, ids = _as_array(uris), _as_array(image_ids)
    inside = pc.starts_with(uris, root) if root else pa.array(np.zeros(len(uris), bool))
    base = pc.replace_substring_regex(uris, r"^.*/", "")
    external = pc.binary_join_element_wise("_external", ids, base, "/")
    rel = pc.if_else(inside, pc.utf8_slice_codeunits(uris, len(root)), external)
    keys = sanitize_keys(rel)
    fallback = pc.binary_join_element_wise("_external", ids, "image", "/")
    return pc.if_else(pc.equal(keys, ""), fallback, keys)


def common_root(uris: list[str]) -> str:
    """The deepest directory containing every URI (a prefix ending at a ``/`` boundary)."""
    if not uris:
        return ""
    prefix = os.path.commonprefix(list(uris))
    return prefix[: prefix.rfind("/") + 1] if "/" in prefix else ""


def format_of_extension(keys) -> pa.Array:
    """The image format a key's extension names (JPEG, PNG, ...), null when it names none."""
    ext = pc.utf8_lower(pc.replace_substring_regex(_as_array(keys), r"^.*?(\.[^./]*)?$", r"\1"))
    known = pa.array(list(EXTENSIONS), pa.string())
    idx = pc.index_in(ext, value_set=known)
    return pc.take(pa.array(list(EXTENSIONS.values()), pa.string()), idx)


def derivative_keys(keys, fmts) -> pa.Array:
    """The file name a key gets in format ``fmts`` (one format for all, or one per key): the key itself when
    its extension already names that format (case kept: ``a.JPG`` stays ``a.JPG``), else the key with its
    extension replaced by the format's (``a.tif`` -> ``a.jpg``)."""
    keys = _as_array(keys)
    fmts = pa.array([fmts] * len(keys), pa.string()) if isinstance(fmts, str) else _as_array(fmts)
    same = pc.fill_null(pc.equal(format_of_extension(keys), fmts), False)
    new_ext = pc.take(pa.array(list(FORMATS.values()), pa.string()),
                      pc.index_in(fmts, value_set=pa.array(list(FORMATS), pa.string())))
    stem = pc.replace_substring_regex(keys, _EXT, "")
    return pc.if_else(same, keys, pc.binary_join_element_wise(stem, new_ext, ""))


def derivative_key(key: str, fmt: str) -> str:
    return derivative_keys([key], fmt)[0].as_py()


def planned_names(keys, output_format: str) -> pa.Array:
    """The derivative names a plan can know before decoding: with ``output.format: same`` a key whose
    extension names a format keeps it; a key with another extension keeps its name as the claim (Compose
    then adds the image's suffix, see ``written_name``)."""
    keys = _as_array(keys)
    if output_format != "same":
        return derivative_keys(keys, output_format.upper())
    return keys


def tag(image_id: str) -> str:
    """Short, stable suffix that tells two images' files apart."""
    return hashlib.blake2b(image_id.encode(), digest_size=4).hexdigest()


def with_tag(key: str, image_id: str) -> str:
    """``dir/a.jpg`` -> ``dir/a~<tag>.jpg`` (``dir/a`` -> ``dir/a~<tag>``)."""
    head, base = posixpath.split(key)
    stem, dot, ext = base.rpartition(".")
    base = f"{stem}~{tag(image_id)}.{ext}" if dot and stem else f"{base}~{tag(image_id)}"
    return posixpath.join(head, base) if head else base


def written_name(key: str, image_id: str, fmt: str, output_format: str) -> str:
    """The derivative's name as Compose writes it, once the master's real format ``fmt`` is known. When it
    differs from the plan's claim (a ``.jpg`` that is really a PNG, an unknown extension), the image's
    suffix keeps it apart from every name the plan gave out."""
    name = derivative_key(key, fmt)
    if name != planned_names([key], output_format)[0].as_py():
        name = derivative_key(with_tag(key, image_id), fmt)
    return name


def assign(image_ids, uris, root: str, output_format: str, access_copy: bool,
           claims: pa.Table | None = None) -> tuple[pa.Array, pa.Array]:
    """Unique output keys for a manifest: ``(keys, error)``, ``error`` null except for images whose name
    still collides after suffixing (practically never: a 32-bit tag clash, or a file literally named like
    another image's suffixed name), which must not be written.

    ``claims``: (``image_id``, ``ns``, ``name``) held by earlier results (ns ``images`` or ``access``);
    their holder keeps the name.
    """
    ids, uris = _as_array(image_ids), _as_array(uris)
    keys = output_keys(uris, root, ids)
    rel = pc.if_else(pc.starts_with(uris, root), pc.utf8_slice_codeunits(uris, len(root)), uris) if root else uris
    unchanged = pc.fill_null(pc.equal(rel, keys), False)
    contested = _contested(ids, _names(keys, output_format, access_copy), claims)
    if not pc.any(contested).as_py():
        return keys, pa.nulls(len(keys), pa.string())
    sub = pa.table({"image_id": ids, "key": keys, "unchanged": unchanged}).filter(contested)
    keep = _holders(sub, _names(sub["key"], output_format, access_copy), claims)
    lose = pc.and_(contested, pc.invert(pc.is_in(ids, value_set=pa.array(sorted(keep), pa.string()))))
    idx = pc.indices_nonzero(lose)
    tagged = [with_tag(k, i) for k, i in zip(pc.take(keys, idx).to_pylist(), pc.take(ids, idx).to_pylist())]
    if tagged:
        keys = pc.replace_with_mask(keys, lose, pa.array(tagged, pa.string()))
        log.warning("%d images would share an output file with another image; their keys get a ~suffix "
                    "(e.g. %s)", len(tagged), tagged[0])
    still = _contested(ids, _names(keys, output_format, access_copy), claims)
    error = pc.if_else(still, pa.scalar("its output name collides with another image's; rename one of the files"),
                       pa.scalar(None, pa.string()))
    return keys, error


def _names(keys, output_format: str, access_copy: bool) -> dict[str, pa.Array]:
    out = {"images": planned_names(keys, output_format)}
    if access_copy:
        out["access"] = derivative_keys(keys, "JPEG")
    return out


def _fold(names) -> pa.Array:
    """Names as the most forgiving filesystem compares them: case-insensitive (macOS, SMB, exFAT) and blind
    to trailing dots and spaces in a segment (SMB, Windows). Names equal after folding are one file there."""
    return pc.replace_substring_regex(pc.utf8_lower(_as_array(names)), r"[. ]+(/|$)", r"\1")


def _claims_table(ids: pa.Array, names: dict[str, pa.Array], claims: pa.Table | None) -> pa.Table:
    parts = [pa.table({"image_id": ids, "ns": pa.array([ns] * len(ids), pa.string()), "name": _fold(n)})
             for ns, n in names.items()]
    if claims is not None and claims.num_rows:
        c = claims.select(["image_id", "ns", "name"])
        parts.append(c.set_column(2, "name", _fold(c["name"])).cast(parts[0].schema))
    return pa.concat_tables(parts)


def _contested(ids: pa.Array, names: dict[str, pa.Array], claims: pa.Table | None) -> pa.Array:
    """Per manifest image: whether another image (in the manifest or an earlier result) claims one of its names."""
    table = _claims_table(ids, names, claims)
    counts = table.group_by(["ns", "name"]).aggregate([("image_id", "count_distinct")])
    shared = counts.filter(pc.greater(counts["image_id_count_distinct"], 1))
    if not shared.num_rows:
        return pa.array(np.zeros(len(ids), bool))
    hit = table.join(shared.select(["ns", "name"]), ["ns", "name"], join_type="left semi")
    return pc.is_in(ids, value_set=pc.unique(hit["image_id"]))


def _holders(sub: pa.Table, names: dict[str, pa.Array], claims: pa.Table | None) -> set[str]:
    """Of the contested images (``sub``), those that keep their plain names: for each contested name, the
    image whose earlier result holds it, else the only one whose path needed no change, else nobody.
    An image keeps its key only if it holds every one of its contested names."""
    names = {ns: _fold(col) for ns, col in names.items()}
    held: dict[tuple[str, str], str] = {}
    if claims is not None and claims.num_rows:
        contested = pa.table({"ns": pa.array([ns for ns, col in names.items() for _ in range(len(col))], pa.string()),
                              "name": pa.concat_arrays(list(names.values()))})
        c = claims.select(["image_id", "ns", "name"])
        mine = c.set_column(2, "name", _fold(c["name"])).join(contested, ["ns", "name"], join_type="left semi")
        for r in mine.sort_by([("ns", "ascending"), ("name", "ascending"), ("image_id", "ascending")]).to_pylist():
            held.setdefault((r["ns"], r["name"]), r["image_id"])
    members: dict[tuple[str, str], set[str]] = {}
    for ns, col in names.items():
        for i, name in zip(sub["image_id"].to_pylist(), col.to_pylist()):
            members.setdefault((ns, name), set()).add(i)
    plain = {i for i, u in zip(sub["image_id"].to_pylist(), sub["unchanged"].to_pylist()) if u}
    keeps, loses = set(), set()
    for name, ms in members.items():
        holder = held.get(name)
        if holder is None:
            unchanged = ms & plain
            holder = next(iter(unchanged)) if len(unchanged) == 1 else None
        if holder in ms:
            keeps.add(holder)
        loses |= ms - {holder}
    return keeps - loses
