"""Model files: registry (file, official URL, sha256, licence), resolution, verification, safe loading.

A file is looked for, in order, in ``weights_dir`` (a folder or an ``s3://`` prefix, which is copied
into the local cache), the local cache (``$XDG_CACHE_HOME/archive-restore/weights``), and finally
downloaded from its official URL when ``allow_download`` is set and the machine is online.
PyTorch files load with ``torch.load(weights_only=True)``: a checkpoint can never run code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .config import QAConfig, RunConfig
from .errors import WeightsError
from . import storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightSpec:
    name: str
    filename: str
    kind: str                       # gfpgan | retinaface | arcface | onnx
    url: str | None
    sha256: str | None              # None where no official hash is published; the file's hash is recorded
    licence: str
    arch: dict = field(default_factory=dict)
    note: str = ""


_FACEXLIB = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/"
_GFPGAN = "https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/"

REGISTRY: dict[str, WeightSpec] = {s.name: s for s in [
    WeightSpec("GFPGANv1.4", "GFPGANv1.4.pth", "gfpgan", _GFPGAN + "GFPGANv1.4.pth", None, "Apache-2.0 (TencentARC)"),
    WeightSpec("GFPGANv1.3", "GFPGANv1.3.pth", "gfpgan", _GFPGAN + "GFPGANv1.3.pth", None, "Apache-2.0 (TencentARC)"),
    WeightSpec("GFPGAN-tiny", "GFPGAN-tiny.pth", "gfpgan", None, None, "test-only",
               arch=dict(num_style_feat=128, narrow=0.125),
               note="a 1/8-width architecture for smoke tests; use --untrained or stage a checkpoint of that shape"),
    WeightSpec("retinaface_resnet50", "detection_Resnet50_Final.pth", "retinaface",
               _FACEXLIB + "detection_Resnet50_Final.pth", None, "MIT (biubug6/Pytorch_Retinaface)"),
    WeightSpec("retinaface_mobile0.25", "detection_mobilenet0.25_Final.pth", "retinaface",
               _FACEXLIB + "detection_mobilenet0.25_Final.pth",
               "38ec7bb3c9cbfe2f40edabc05fab970a6d648747cbc534092be85d5eb9b37ed0", "MIT (biubug6/Pytorch_Retinaface)"),
    WeightSpec("arcface_ir_se50", "recognition_arcface_ir_se50.pth", "arcface",
               _FACEXLIB + "recognition_arcface_ir_se50.pth", None, "MIT (TreB1eN/InsightFace_Pytorch)"),
    WeightSpec("mobilefacenet_arcface", "identity_mobilefacenet_arcface.onnx", "onnx", None,
               "b7120c095d60094f28a4a54ba6a8bf51b297a6273fb40ef6350dfec1f63d9507", "Apache-2.0 (foamliu/MobileFaceNet)"),
]}


@dataclass(frozen=True)
class Resolved:
    spec: WeightSpec
    path: Path | None               # None: untrained (seeded random) stand-in
    sha256: str

    @property
    def untrained(self) -> bool:
        return self.path is None


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
    raise WeightsError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")


def identity_model(qa: QAConfig) -> str:
    """Registry name (or ONNX path) of the identity network the QA settings use."""
    return qa.onnx_model if qa.identity_backend == "onnx" else "arcface_ir_se50"


def models_needed(cfg: RunConfig) -> list[str]:
    """Registry names (or ONNX paths) the run's settings use."""
    return [cfg.restore.model, cfg.detect.model, identity_model(cfg.qa)]


def _spec_or_path(name: str) -> tuple[WeightSpec, Path | None]:
    """An ONNX model may be given as a path instead of a registry name."""
    if name in REGISTRY:
        return REGISTRY[name], None
    if name.endswith(".onnx"):
        p = Path(name).expanduser()
        return WeightSpec(p.name, p.name, "onnx", None, None, "user-supplied"), p
    return spec_for(name), None


def _verify(path: Path, spec: WeightSpec) -> str:
    digest = sha256_file(path)
    if spec.sha256 and digest != spec.sha256:
        raise WeightsError(f"{path} has sha256 {digest}, expected {spec.sha256} for {spec.name}: "
                           "the file is corrupt or a different model; stage it again")
    return digest


def download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
        shutil.copyfileobj(r, f)
    os.replace(tmp, dest)


def resolve(name: str, cfg: RunConfig) -> Resolved:
    """Find, fetch and verify one model file; raise WeightsError saying how to stage it if missing."""
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
            if not local.exists():
                try:
                    data = storage.read_bytes(remote, cfg.storage)
                    local.parent.mkdir(parents=True, exist_ok=True)
                    storage.write_bytes(str(local), data, cfg.storage)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise WeightsError(f"cannot read {remote}: {e}") from None
            candidates.append(local)
        else:
            candidates.append(Path(cfg.weights_dir).expanduser() / spec.filename)
    candidates.append(cache_dir() / spec.filename)
    for c in candidates:
        looked.append(str(c))
        if c.is_file():
            return Resolved(spec, c, _verify(c, spec))
    if spec.url and cfg.allow_download and direct is None:
        dest = cache_dir() / spec.filename
        try:
            log.info("downloading %s from %s", spec.filename, spec.url)
            download(spec.url, dest)
            return Resolved(spec, dest, _verify(dest, spec))
        except OSError as e:
            looked.append(f"{spec.url} ({type(e).__name__}: {e})")
    if cfg.untrained:
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
