"""Output keys: where each image's derivative (``images/<key>``) and access copy (``access/<key>``) go.

A key is the image's path relative to the input root, sanitised so that it can never leave the output
root: ``..`` and ``.`` segments, empty segments, control characters and characters invalid on common
filesystems are neutralised; letters of any script and inner spaces are kept (NFC) so that keys stay
recognisable. Sanitising maps some different paths to one key (``a?b``/``a*b``, ``x ``/``x``, NFD/NFC
spellings), and a fixed output format maps ``a.png`` and ``a.tif`` to one file; so keys are assigned
for a whole manifest at once, with Arrow kernels and 64-bit name hashes screened in numpy before an exact
comparison of the few candidates (10 M rows in about 20 s and well under 1 GB), and every image whose
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


def as_array(values) -> pa.Array:
    values = pa.array(values, pa.string()) if not isinstance(values, (pa.Array, pa.ChunkedArray)) else values
    if isinstance(values, pa.ChunkedArray):  # one chunk (a manifest's columns): no copy of 10 M strings
        return values.chunk(0) if values.num_chunks == 1 else values.combine_chunks()
    return values


# A path that needs no sanitising: printable ASCII (NFC leaves it alone) without an unsafe character, an
# empty, all-dots or space-edged segment. Most archives' paths are like this and skip the segment work.
_ASCII = r"^[\x20-\x7e]+$"
_DIRTY = r"[\\:*?\"<>|]|//|^/|/$|(^|/)\.+(/|$)|(^|/) | (/|$)|^ | $"


def sanitize_keys(relative) -> pa.Array:
    """Sanitised keys of relative paths, vectorised; "" where no usable segment is left."""
    rel = as_array(relative)
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
    return _keys_and_relative(as_array(uris), root, as_array(image_ids))[0]


def _keys_and_relative(uris: pa.Array, root: str, ids: pa.Array) -> tuple[pa.Array, pa.Array]:
    """(keys, the relative paths they were sanitised from)."""
    inside = pc.starts_with(uris, root) if root else pa.array(np.zeros(len(uris), bool))
    if root and pc.all(inside).as_py():  # the usual case: no external path to build for 10 M rows
        rel = pc.utf8_slice_codeunits(uris, len(root))
    else:
        base = pc.replace_substring_regex(uris, r"^.*/", "")
        external = pc.binary_join_element_wise("_external", ids, base, "/")
        rel = pc.if_else(inside, pc.utf8_slice_codeunits(uris, len(root)), external)
    keys = sanitize_keys(rel)
    empty = pc.equal(keys, "")
    if pc.any(empty).as_py():
        keys = pc.if_else(empty, pc.binary_join_element_wise("_external", ids, "image", "/"), keys)
    return keys, rel


def common_root(uris: list[str]) -> str:
    """The deepest directory containing every URI (a prefix ending at a ``/`` boundary)."""
    if not uris:
        return ""
    prefix = os.path.commonprefix(list(uris))
    return prefix[: prefix.rfind("/") + 1] if "/" in prefix else ""


def format_of_extension(keys) -> pa.Array:
    """The image format a key's extension names (JPEG, PNG, ...), null when it names none."""
    ext = pc.utf8_lower(pc.replace_substring_regex(as_array(keys), r"^.*?(\.[^./]*)?$", r"\1"))
    known = pa.array(list(EXTENSIONS), pa.string())
    idx = pc.index_in(ext, value_set=known)
    return pc.take(pa.array(list(EXTENSIONS.values()), pa.string()), idx)


def derivative_keys(keys, fmts) -> pa.Array:
    """The file name a key gets in format ``fmts`` (one format for all, or one per key): the key itself when
    its extension already names that format (case kept: ``a.JPG`` stays ``a.JPG``), else the key with its
    extension replaced by the format's (``a.tif`` -> ``a.jpg``)."""
    keys = as_array(keys)
    fmts = pa.array([fmts] * len(keys), pa.string()) if isinstance(fmts, str) else as_array(fmts)
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
    keys = as_array(keys)
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
    ids, uris = as_array(image_ids), as_array(uris)
    keys, rel = _keys_and_relative(uris, root, ids)
    # A path outside the root is compared as given: its key is under _external/, so it never counts as unchanged.
    outside = pc.invert(pc.starts_with(uris, root)) if root else None
    if outside is None:
        rel = uris
    elif pc.any(outside).as_py():
        rel = pc.if_else(outside, uris, rel)
    unchanged = pc.fill_null(pc.equal(rel, keys), False)
    del rel
    # Every name hashed once; as strings, only the candidates' names are made again (names_at).
    index = _Index.of(_names(keys, output_format, access_copy), claims)

    def names_at(at: pa.Array) -> dict[str, pa.Array]:  # reads ``keys`` when called: the suffixed ones later
        return _names(keys.take(at), output_format, access_copy)

    contested = _decide(ids, names_at, claims, index, _screen(ids, index, claims))
    if not contested.any():
        return keys, pa.nulls(len(keys), pa.string())
    mask = pa.array(contested)
    sub = pa.table({"image_id": ids, "key": keys, "unchanged": unchanged}).filter(mask)
    sub_names = _names(sub["key"], output_format, access_copy)
    keep = _holders(sub, sub_names, _claims_near(claims, sub_names, index))
    lose = pc.and_(mask, pc.invert(pc.is_in(ids, value_set=pa.array(sorted(keep), pa.string()))))
    idx = pc.indices_nonzero(lose)
    tagged = [with_tag(k, i) for k, i in zip(pc.take(keys, idx).to_pylist(), pc.take(ids, idx).to_pylist())]
    recheck = contested  # what can still collide: the contested images, and any image named like a new name
    if tagged:
        keys = pc.replace_with_mask(keys, lose, pa.array(tagged, pa.string()))
        log.warning("%d images would share an output file with another image; their keys get a ~suffix "
                    "(e.g. %s)", len(tagged), tagged[0])
        recheck = contested.copy()
        for ns, col in _names(pa.array(tagged, pa.string()), output_format, access_copy).items():
            recheck[index.rows_named(ns, _folded_hashes(col))] = True
    still = _decide(ids, names_at, claims, index, recheck)  # with the suffixed keys
    error = pc.if_else(pa.array(still), pa.scalar("its output name collides with another image's; rename one of "
                                                  "the files"), pa.scalar(None, pa.string()))
    return keys, error


def _names(keys, output_format: str, access_copy: bool) -> dict[str, pa.Array]:
    out = {"images": planned_names(keys, output_format)}
    if access_copy:
        out["access"] = derivative_keys(keys, "JPEG")
    return out


def _fold(names) -> pa.Array:
    """Names as the most forgiving filesystem compares them: case-insensitive (macOS, SMB, exFAT) and blind
    to trailing dots and spaces in a segment (SMB, Windows). Names equal after folding are one file there."""
    lower = pc.utf8_lower(as_array(names))
    if not pc.any(pc.match_substring_regex(lower, r"[. ](/|$)")).as_py():  # the usual case: no second copy
        return lower
    return pc.replace_substring_regex(lower, r"[. ]+(/|$)", r"\1")


_HASH_ROWS = 1 << 18  # names hashed per step: bounds the per-byte arrays to a few tens of MB
_CLAIM_ROWS = 1 << 21  # claims looked up per step
_P = np.uint64(0x100000001B3)
_POWERS = np.ones(1, np.uint64)


def _folded_hashes(names) -> np.ndarray:
    """A 64-bit hash of each name after ``_fold``: a polynomial over its UTF-8 bytes, computed with numpy over
    Arrow's buffers a slice at a time. Equal folded names hash equal; the few unequal ones that collide are
    told apart by the exact check that follows (``_decide``), so the hash only has to be cheap."""
    global _POWERS
    names = as_array(names)
    out = np.zeros(len(names), np.uint64)
    for start in range(0, len(names), _HASH_ROWS):
        part = pc.fill_null(_fold(names.slice(start, _HASH_ROWS)), "").cast(pa.large_string())
        offsets = np.frombuffer(part.buffers()[1], np.int64, len(part) + 1, part.offset * 8)
        buf = part.buffers()[2]
        data = np.frombuffer(buf, np.uint8)[offsets[0]:offsets[-1]] if buf is not None else np.zeros(0, np.uint8)
        lengths = np.diff(offsets)
        if len(lengths) and lengths.max() >= len(_POWERS):
            _POWERS = np.concatenate([[np.uint64(1)], np.cumprod(np.full(int(lengths.max()) * 2, _P, np.uint64))])
        # byte j of a name of length L weighs P**(L-1-j); numpy's uint64 arithmetic wraps, i.e. is mod 2**64
        exponent = np.repeat(offsets[1:] - offsets[0], lengths) - 1 - np.arange(len(data))
        weighted = (data.astype(np.uint64) + np.uint64(1)) * _POWERS[exponent]
        nonempty = lengths > 0
        h = np.zeros(len(part), np.uint64)
        if nonempty.any():
            h[nonempty] = np.add.reduceat(weighted, (offsets[:-1] - offsets[0])[nonempty])
        out[start:start + len(part)] = h ^ (lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    return out


class _Index:
    """The hashes of the manifest's folded names (per namespace, sorted, with their rows) and of the claims'
    names: computed once per plan and shared by the screening, the exact steps and the re-check after
    suffixing. 8 bytes a name, where a lookup table of 10 M names held ~1 GB (and a grouped count of owners
    before it ~2.5 GB)."""

    def __init__(self, hashes: dict[str, np.ndarray], orders: dict[str, np.ndarray], claims: np.ndarray | None):
        self.hashes, self.orders, self.claims = hashes, orders, claims

    @classmethod
    def of(cls, names: dict[str, pa.Array], claims: pa.Table | None) -> "_Index":
        hashes, orders = {}, {}
        for ns, col in names.items():
            h = _folded_hashes(col)
            orders[ns] = np.argsort(h, kind="stable").astype(np.int32 if len(h) < 2**31 else np.int64)
            hashes[ns] = h[orders[ns]]
        claimed = _folded_hashes(claims["name"]) if claims is not None and claims.num_rows else None
        return cls(hashes, orders, claimed)

    def rows_named(self, ns: str, hashes: np.ndarray) -> np.ndarray:
        """The manifest rows whose ``ns`` name hashes like one of ``hashes``."""
        h = self.hashes[ns]
        lo, hi = np.searchsorted(h, hashes, "left"), np.searchsorted(h, hashes, "right")
        count = hi - lo
        starts = np.repeat(lo - np.concatenate([[0], np.cumsum(count)[:-1]]), count)
        return self.orders[ns][starts + np.arange(count.sum())]


def _screen(ids: pa.Array, index: _Index, claims: pa.Table | None) -> np.ndarray:
    """The manifest images that may be contested: a name whose hash another image's name shares, or that a
    claim of another owner hashes like. Every contested image is among them (equal names hash equal); the
    few others are hash collisions, which ``_decide`` tells apart."""
    n = len(ids)
    candidate = np.zeros(n, bool)
    for ns, h in index.hashes.items():
        order = index.orders[ns]
        same = np.flatnonzero(h[1:] == h[:-1])
        candidate[order[same]] = True
        candidate[order[same + 1]] = True
        if index.claims is None or not n:
            continue
        mine = np.flatnonzero(pc.equal(claims["ns"], ns).to_numpy(zero_copy_only=False))
        for start in range(0, len(mine), _CLAIM_ROWS):  # slices bound the lookup's arrays
            part = mine[start:start + _CLAIM_ROWS]
            hc = index.claims[part]
            by_hash = np.argsort(hc)  # sorted needles: searchsorted walks the table once instead of at random
            at = np.searchsorted(h, hc[by_hash]).clip(max=n - 1)
            found = h[at] == hc[by_hash]
            claim, rows = part[by_hash[found]], order[at[found]]  # a claim, and a row with its name's hash
            other = pc.not_equal(claims["image_id"].take(pa.array(claim)), ids.take(pa.array(rows)))
            candidate[rows[pc.fill_null(other, True).to_numpy(zero_copy_only=False)]] = True
    return candidate


def _decide(ids: pa.Array, names_at, claims: pa.Table | None, index: _Index, rows: np.ndarray) -> np.ndarray:
    """Which of ``rows`` (a mask over the manifest, closed under sharing a name) are contested, exactly:
    per manifest image, whether one of its names is also another manifest image's name, or is claimed by
    another image's earlier result. ``names_at(positions)``: those images' names by namespace (only the
    rows' names are ever made: not a second set for the whole manifest)."""
    contested = np.zeros(len(ids), bool)
    if rows.any():
        at = pa.array(np.flatnonzero(rows))
        sub_names = names_at(at)
        contested[rows] = _contested_exactly(ids.take(at), sub_names, _claims_near(claims, sub_names, index))
    return contested


def _contested(ids, names: dict[str, pa.Array], claims: pa.Table | None) -> pa.Array:
    """Per manifest image: whether one of its names is also another manifest image's name, or is claimed by
    another image's earlier result (screened by hashes, then decided exactly)."""
    ids = as_array(ids)
    index = _Index.of(names, claims)
    return pa.array(_decide(ids, lambda at: {ns: as_array(col).take(at) for ns, col in names.items()}, claims,
                            index, _screen(ids, index, claims)))


def _claims_near(claims: pa.Table | None, names: dict[str, pa.Array], index: _Index) -> pa.Table | None:
    """The claims whose folded name hashes like one of ``names`` (per namespace): every claim on those names
    and practically no other, so the exact steps never fold or join a 10 M-row ledger's claims."""
    if claims is None or not claims.num_rows:
        return None
    near = np.zeros(claims.num_rows, bool)
    for ns, col in names.items():
        near |= pc.equal(claims["ns"], ns).to_numpy(zero_copy_only=False) & np.isin(index.claims,
                                                                                    _folded_hashes(col))
    c = claims.select(["image_id", "ns", "name"]).filter(pa.array(near))
    return c.cast(pa.schema([("image_id", pa.string()), ("ns", pa.string()), ("name", pa.string())]))


def _contested_exactly(ids: pa.Array, names: dict[str, pa.Array], claims: pa.Table | None) -> np.ndarray:
    """``_contested`` by exact comparison of the folded names: each name, the manifest's and the claims', is
    looked up among the manifest's names of its namespace and compared with its owner's position."""
    n = len(ids)
    contested = np.zeros(n, bool)
    owners = None
    if claims is not None and claims.num_rows:
        owners = pc.index_in(claims["image_id"], value_set=ids)  # null: an image no longer in the manifest
    for ns, col in names.items():
        folded = _fold(col)
        mine = pc.equal(claims["ns"], ns) if owners is not None else None
        every = mine is not None and pc.all(mine).as_py()
        claimed = None
        if every or (mine is not None and pc.any(mine).as_py()):
            claimed = _fold(pc.cast(claims["name"] if every else claims["name"].filter(mine), pa.string()))
        # One lookup table of the manifest's names serves both: each name's first holder in the manifest.
        found = pc.index_in(pa.chunked_array([folded] + ([claimed] if claimed is not None else []), pa.string()),
                            value_set=folded)
        first = found.slice(0, n).to_numpy()
        dup = first != np.arange(n)  # a later image with an earlier one's name: both are contested
        contested[dup] = True
        contested[first[dup]] = True
        if claimed is None:
            continue
        at = found.slice(n)
        by = owners if every else owners.filter(mine)
        hit = pc.and_(pc.is_valid(at), pc.fill_null(pc.not_equal(at, by), True))  # someone else's claim
        contested[pc.filter(at, hit).to_numpy(zero_copy_only=False).astype(np.int64)] = True
    return contested


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
        if holder is None and len(ms) == 1:  # a contested image's other name that nobody else has
            holder = next(iter(ms))
        elif holder is None:
            unchanged = ms & plain
            holder = next(iter(unchanged)) if len(unchanged) == 1 else None
        if holder in ms:
            keeps.add(holder)
        loses |= ms - {holder}
    return keeps - loses
