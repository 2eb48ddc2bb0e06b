"""Model files: registry (file, official URL, publisher checksum, licence), resolution, verification,
safe loading.

A file is looked for, in order, in ``weights_dir`` (a folder or an ``s3://`` prefix, whose files are
copied into the local cache and fetched again whenever the object on the store changes), the local
cache (``$XDG_CACHE_HOME/archive-restore/weights``), and finally downloaded from its official URL when
``allow_download`` is set and the machine is online. Only a checksum its publisher published is
required of a file; other known-good copies are listed so that the run record can say which one was
used. Every file's sha256 and size go into the run record and its sha256 into the fingerprint; the
workers load only files with exactly the hashes that the driver's preflight checked.
PyTorch files load with ``torch.load(weights_only=True)``: a checkpoint can never run code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from . import storage
from .config import QAConfig, RunConfig
from .errors import WeightsError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightSpec:
    name: str
    filename: str
    kind: str                       # gfpgan | retinaface | arcface | onnx
    url: str | None
    sha256: str | None              # published by the file's publisher: required when set. None for all today.
    licence: str
    arch: dict | None = field(default_factory=dict)  # None: read from the checkpoint (user-supplied GFP-GAN)
    note: str = ""
    known: dict[str, str] = field(default_factory=dict)  # other sha256s known to be good copies -> where from


_FACEXLIB = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/"
_GFPGAN = "https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/"

# No publisher of these files publishes a checksum: each file's hash is recorded, not required.
REGISTRY: dict[str, WeightSpec] = {s.name: s for s in [
    WeightSpec("GFPGANv1.4", "GFPGANv1.4.pth", "gfpgan", _GFPGAN + "GFPGANv1.4.pth", None, "Apache-2.0 (TencentARC)"),
    WeightSpec("GFPGANv1.3", "GFPGANv1.3.pth", "gfpgan", _GFPGAN + "GFPGANv1.3.pth", None, "Apache-2.0 (TencentARC)"),
    WeightSpec("retinaface_resnet50", "detection_Resnet50_Final.pth", "retinaface",
               _FACEXLIB + "detection_Resnet50_Final.pth", None, "MIT (biubug6/Pytorch_Retinaface)"),
    WeightSpec("retinaface_mobile0.25", "detection_mobilenet0.25_Final.pth", "retinaface",
               _FACEXLIB + "detection_mobilenet0.25_Final.pth", None, "MIT (biubug6/Pytorch_Retinaface)",
               known={"38ec7bb3c9cbfe2f40edabc05fab970a6d648747cbc534092be85d5eb9b37ed0":
                      "the copy in the public fork m2man/Pytorch_Retinaface (may differ from facexlib's release)"}),
    WeightSpec("arcface_ir_se50", "recognition_arcface_ir_se50.pth", "arcface",
               _FACEXLIB + "recognition_arcface_ir_se50.pth", None, "MIT (TreB1eN/InsightFace_Pytorch)"),
    WeightSpec("mobilefacenet_arcface", "identity_mobilefacenet_arcface.onnx", "onnx", None, None,
               "Apache-2.0 (foamliu/MobileFaceNet)",
               known={"b7120c095d60094f28a4a54ba6a8bf51b297a6273fb40ef6350dfec1f63d9507":
                      "an ONNX export of foamliu/MobileFaceNet"},
               note="no download URL: stage the ONNX file by hand"),
]}


@dataclass(frozen=True)
class Resolved:
    spec: WeightSpec
    path: Path | None               # None: untrained (seeded random) stand-in
    sha256: str
    size: int = 0

    @property
    def untrained(self) -> bool:
        return self.path is None

    def describe(self) -> dict:
        """What the run record says of this file."""
        return {"file": self.spec.filename, "sha256": self.sha256, "size": self.size, "untrained": self.untrained,
                "licence": self.spec.licence, "publisher_sha256": self.spec.sha256,
                "known_copy": self.spec.known.get(self.sha256)}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "archive-restore" / "weights"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def spec_for(name: str) -> WeightSpec:
    if name in REGISTRY:
        return REGISTRY[name]
    raise WeightsError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}, or a path to a "
                       "GFP-GAN .pth or an identity .onnx file")


def identity_model(qa: QAConfig) -> str:
    """Registry name (or ONNX path) of the identity network the QA settings use."""
    return qa.onnx_model if qa.identity_backend == "onnx" else "arcface_ir_se50"


def models_needed(cfg: RunConfig) -> list[str]:
    """Registry names (or paths) the run's settings use."""
    return [cfg.restore.model, cfg.detect.model, identity_model(cfg.qa)]


def _spec_or_path(name: str) -> tuple[WeightSpec, Path | None]:
    """A GFP-GAN checkpoint (.pth, architecture read from its tensors) or an ONNX model may be given as a path."""
    if name in REGISTRY:
        return REGISTRY[name], None
    for ext, kind in ((".onnx", "onnx"), (".pth", "gfpgan")):
        if name.endswith(ext):
            p = Path(name).expanduser()
            return WeightSpec(p.name, p.name, kind, None, None, "user-supplied", arch=None), p
    return spec_for(name), None


def _verify(path: Path, spec: WeightSpec) -> tuple[str, int]:
    digest = sha256_file(path)
    if spec.sha256 and digest != spec.sha256:
        raise WeightsError(f"{path} has sha256 {digest}, but its publisher's checksum for {spec.name} is "
                           f"{spec.sha256}: the file is corrupt or a different model; stage it again")
    return digest, path.stat().st_size


def download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
        shutil.copyfileobj(r, f)
    os.replace(tmp, dest)


def _fetch_remote(remote: str, local: Path, cfg: RunConfig, force: bool = False) -> bool:
    """Bring ``remote`` into the cache at ``local`` unless the cached copy came from the same object version
    (same ETag and size, noted beside it). False when the remote file does not exist."""
    fs, path = storage.get_fs(remote, cfg.storage)
    fs.invalidate_cache(path)
    try:
        info = storage.retrying(lambda: fs.info(path), f"lookup of {remote}", cfg.storage)
    except FileNotFoundError:
        return False
    except Exception as e:  # no credentials, bad endpoint, refused: say which file could not be had
        raise WeightsError(f"cannot read {remote}: {type(e).__name__}: {e}") from None
    source = {"uri": remote, "etag": info.get("ETag") or info.get("etag"), "size": info.get("size")}
    note = local.with_name(local.name + ".source.json")
    if not force and local.is_file() and note.is_file() and json.loads(note.read_text()) == source:
        return True
    try:
        data = storage.read_bytes(remote, cfg.storage)
    except Exception as e:
        raise WeightsError(f"cannot read {remote}: {type(e).__name__}: {e}") from None
    storage.write_bytes(str(local), data, cfg.storage)
    storage.write_bytes(str(note), json.dumps(source).encode(), cfg.storage)
    return True


def resolve(name: str, cfg: RunConfig, expect: str | None = None) -> Resolved:
    """Find, fetch and verify one model file; raise WeightsError saying how to stage it if missing.

    ``expect``: the sha256 the run's preflight found. A worker whose file differs (replaced on the store
    since, or another copy on this node) fetches it again and, if it still differs, refuses to start.
    """
    r = _resolve(name, cfg)
    if expect is None or r.sha256 == expect:
        return r
    if cfg.weights_dir and storage.is_remote(cfg.weights_dir) and r.path is not None:
        r = _resolve(name, cfg, refetch=True)
    if r.sha256 != expect:
        where = r.path or "(untrained stand-in)"
        raise WeightsError(f"{r.spec.filename} at {where} has sha256 {r.sha256}, but the run's preflight checked "
                           f"{expect}: the file changed since the run started, or differs on this node. Stage the "
                           "same file everywhere and run again")
    return r


def _resolve(name: str, cfg: RunConfig, refetch: bool = False) -> Resolved:
    spec, direct = _spec_or_path(name)
    looked: list[str] = []
    candidates: list[Path] = []
    if direct is not None:
        candidates.append(direct)
    if cfg.weights_dir:
        if storage.is_remote(cfg.weights_dir):
            remote = storage.join(cfg.weights_dir, spec.filename)
            local = cache_dir() / hashlib.sha1(cfg.weights_dir.encode()).hexdigest()[:12] / spec.filename
            looked.append(remote)
            if _fetch_remote(remote, local, cfg, force=refetch):
                candidates.append(local)
        else:
            candidates.append(Path(cfg.weights_dir).expanduser() / spec.filename)
    candidates.append(cache_dir() / spec.filename)
    for c in candidates:
        looked.append(str(c))
        if c.is_file():
            digest, size = _verify(c, spec)
            return Resolved(spec, c, digest, size)
    if spec.url and cfg.allow_download and direct is None:
        dest = cache_dir() / spec.filename
        try:
            log.info("downloading %s from %s", spec.filename, spec.url)
            download(spec.url, dest)
            digest, size = _verify(dest, spec)
            return Resolved(spec, dest, digest, size)
        except OSError as e:
            looked.append(f"{spec.url} ({type(e).__name__}: {e})")
    if cfg.untrained:
        if spec.arch is None:
            raise WeightsError(f"{name} not found; an untrained stand-in needs a registry model, not a path")
        log.warning("UNTRAINED: %s not found; using seeded random weights. Outputs are NOT restorations.", spec.filename)
        return Resolved(spec, None, f"untrained:{spec.name}")
    where = "; ".join(looked)
    how = f"download it from {spec.url}" if spec.url else "obtain it from its publisher"
    raise WeightsError(
        f"model file {spec.filename} ({spec.name}) not found (looked in: {where}). "
        f"Stage it: {how} and put it in a folder or s3:// prefix passed as --weights-dir "
        f"(or ARCHIVE_RESTORE_WEIGHTS_DIR), or run `archive-restore models download --dest DIR` where online."
    )


def resolve_all(cfg: RunConfig) -> dict[str, Resolved]:
    return {name: resolve(name, cfg) for name in models_needed(cfg)}


def load_torch_file(path: Path) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download, a pickle with code, a non-PyTorch file
        raise WeightsError(f"cannot load {path} safely as a PyTorch state dict: {type(e).__name__}: {e}") from None


@contextlib.contextmanager
def seeded_init(seed: int = 0):
    """Build a model's untrained stand-in from a fixed seed without touching the process's random state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
