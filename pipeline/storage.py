"""Locations: URI -> filesystem (fsspec/s3fs, pyarrow.fs), reads with bounded retries, atomic writes,
and the mapping from an input URI to an output key that cannot escape the output root."""

from __future__ import annotations

import logging
import os
import posixpath
import re
import tempfile
import time
import unicodedata

import fsspec
import pyarrow.fs as pafs

from .config import StorageConfig

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(uri: str) -> bool:
    return bool(_SCHEME.match(uri)) and not uri.startswith("file://")


def normalize(uri: str) -> str:
    """Local paths become absolute POSIX paths; URIs keep their scheme, without a trailing slash."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if is_remote(uri):
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def get_fs(uri: str, cfg: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it (fsspec caches instances)."""
    uri = normalize(uri)
    opts = {}
    if uri.startswith(("s3://", "s3a://")) and cfg.s3_endpoint_url:
        opts["client_kwargs"] = {"endpoint_url": cfg.s3_endpoint_url}
    fs, path = fsspec.core.url_to_fs(uri, **opts)
    return fs, path


def get_arrow_fs(uri: str, cfg: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for Arrow/Ray readers and writers, sharing fsspec's credentials logic."""
    fs, path = get_fs(uri, cfg)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(root: str, *parts: str) -> str:
    return posixpath.join(normalize(root), *parts) if is_remote(root) else os.path.join(normalize(root), *parts)


def read_bytes(uri: str, cfg: StorageConfig) -> bytes:
    """Read a whole object; transient failures are retried with backoff, a missing object is not."""
    fs, path = get_fs(uri, cfg)
    for attempt in range(cfg.read_retries + 1):
        try:
            with fs.open(path, "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except OSError as e:
            if attempt == cfg.read_retries:
                raise
            delay = 0.2 * 2**attempt
            log.warning("read of %s failed (%s); retry %d in %.1fs", uri, e, attempt + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def write_bytes(uri: str, data: bytes, cfg: StorageConfig) -> None:
    """Write so that readers see the old object or the whole new one, never a torn file.

    Object stores publish an object only when its upload completes; on a local disk we write a
    temporary file beside the target and rename it over the target.
    """
    fs, path = get_fs(uri, cfg)
    if is_remote(uri):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def is_inside(child: str, parent: str) -> bool:
    """Whether ``child`` equals or lies below ``parent`` (both normalised, compared by path segments)."""
    c, p = normalize(child).rstrip("/"), normalize(parent).rstrip("/")
    return c == p or c.startswith(p + "/")


_UNSAFE = re.compile(r"[\x00-\x1f\x7f\\:*?\"<>|]")


def sanitize_key(relative: str) -> str:
    """Turn a relative input path into an output key that stays below the output root.

    ``..`` and ``.`` segments, empty segments, control characters and characters that are invalid on
    common filesystems are neutralised; unicode letters and spaces are kept (NFC-normalised) so keys
    stay recognisable to the archive's users.
    """
    relative = unicodedata.normalize("NFC", relative)
    parts = []
    for seg in relative.replace("\\", "/").split("/"):
        seg = _UNSAFE.sub("_", seg).strip()
        if seg in ("", "."):
            continue
        if set(seg) == {"."}:
            seg = "_" * len(seg)
        parts.append(seg)
    if not parts:
        raise ValueError(f"no usable path segment in {relative!r}")
    return "/".join(parts)


def common_root(uris: list[str]) -> str:
    """The deepest directory containing every URI (a prefix ending at a ``/`` boundary)."""
    if not uris:
        return ""
    prefix = os.path.commonprefix([normalize(u) for u in uris])
    return prefix[: prefix.rfind("/") + 1] if "/" in prefix else ""


def output_key(uri: str, root: str, image_id: str) -> str:
    """Key of ``uri``'s derivative: its path relative to ``root``, sanitised.

    A URI outside ``root`` (possible when the user sets ``input.root``) goes under ``_external/<id>/``
    rather than anywhere its path would lead.
    """
    u, r = normalize(uri), root
    if r and u.startswith(r):
        rel = u[len(r):]
    else:
        rel = f"_external/{image_id}/{posixpath.basename(u)}"
    try:
        return sanitize_key(rel)
    except ValueError:
        return f"_external/{image_id}/image"
