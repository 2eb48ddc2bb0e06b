"""Derivatives made on the restoring device (``output.device=gpu``): a JPEG master that was decoded there to
find its faces (devicefaces.py) gets its restored faces pasted back on the device, as ``faces.paste_face``
pastes them (facexlib's mask, the 8-bit warp, the blend: within two levels, more than one at < 1e-4 of the
pixels, tested), and is encoded there (nvJPEG through torchvision on CUDA, which writes 4:4:4 chroma;
libjpeg on CPU, 4:2:0 as OpenCV), with its review crops and access copy. Compose then
only carries the metadata, signs and writes: no second decode, paste or encode on a CPU.

Used by ``stages.Restore``; torch is imported at the top, as this module only runs where torch does.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy.fft import next_fast_len
from torchvision.io import encode_jpeg

from . import imageio, review
from .devicefaces import area_resize
from .faces import FACE_SIZE, paste_region


@dataclass
class Made:
    derivative: bytes               # the JPEG, before metadata (Compose carries the master's)
    access: bytes | None            # the access copy's JPEG, before metadata; None: not asked for
    review: list[tuple[bytes, bytes]]  # per face: the before and after crops (review.crop_names)


class Unsupported(Exception):
    """This master's derivative is made on the CPU (Compose), as without ``output.device=gpu``."""


def _ramp(u: torch.Tensor) -> torch.Tensor:
    """Along one crop axis, the bilinear warp of 512 ones with zeros around: 1 on [0, 511], down to 0 at -1
    and 512."""
    return torch.minimum(u + 1, FACE_SIZE - u).clamp_(0, 1)


def _erode(m: torch.Tensor, k: int) -> torch.Tensor:
    """OpenCV's erosion by a k x k square (its anchor; the window clipped at the borders) of a footprint, as
    ``faces._erode_wide`` computes it: the minimum at the window's clamped corners (exact for a log-concave
    footprint)."""
    lo = k // 2
    hi = k - 1 - lo
    h, w = m.shape
    p = F.pad(m[None, None], (lo, hi, lo, hi), mode="replicate")[0, 0]
    n = lo + hi
    return torch.minimum(torch.minimum(p[:h, :w], p[:h, n:n + w]), torch.minimum(p[n:n + h, :w], p[n:n + h, n:n + w]))


def _blur(m: torch.Tensor, ksize: int) -> torch.Tensor:
    """``cv2.GaussianBlur(m, (ksize, ksize), 0)``: OpenCV's kernel, borders reflected (REFLECT_101)."""
    r = ksize // 2
    if r >= min(m.shape):  # OpenCV reflects again beyond a mirrored copy; a sliver of a face: the CPU's work
        raise Unsupported(f"a paste region of {tuple(m.shape)} px is narrower than its feather ({r} px)")
    g = torch.from_numpy(cv2.getGaussianKernel(ksize, 0).ravel()).to(m.device)
    x = F.pad(m[None, None].double(), (r, r, r, r), mode="reflect")[0, 0]
    return _correlate(_correlate(x, g, 1), g, 0).float()


def _correlate(x: torch.Tensor, g: torch.Tensor, dim: int) -> torch.Tensor:
    """The 'valid' correlation of float64 ``x`` with the symmetric kernel ``g`` along ``dim``, through the FFT.
    The feather's kernel is wide (141 taps for a face of 1,400 px), and a direct convolution in float64 has no
    fast kernel (95% of the device's paste of a 12 MP master, profiled on a CPU: 21 s). float64 keeps the blur
    within 1e-6 of OpenCV's (tested; cuFFT has no TF32 mode either way). The transform's length is rounded up
    to a 5-smooth one (SciPy's ``next_fast_len``), which transforms fast."""
    n_in, k = x.shape[dim], g.numel()
    n = next_fast_len(n_in + k - 1, real=True)  # at least this long: no wrap-around
    shape = [1, 1]
    shape[dim] = -1
    full = torch.fft.irfft(torch.fft.rfft(x, n=n, dim=dim) * torch.fft.rfft(g, n=n).view(shape), n=n, dim=dim)
    return full.narrow(dim, k - 1, n_in - k + 1)


def _crop_coords(roi_inv: np.ndarray, size: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each pixel of a region of ``size`` (w, h), where it falls in the crop: (x, y), each (h, w) float32."""
    w, h = size
    a = torch.from_numpy(cv2.invertAffineTransform(roi_inv).astype(np.float32)).to(device)  # region -> crop
    ys = torch.arange(h, dtype=torch.float32, device=device).view(-1, 1)
    xs = torch.arange(w, dtype=torch.float32, device=device).view(1, -1)
    return xs * a[0, 0] + ys * a[0, 1] + a[0, 2], xs * a[1, 0] + ys * a[1, 1] + a[1, 2]


def paste_mask(roi_inv: np.ndarray, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``faces.paste_mask``'s mask for a region of ``size`` (w, h) on ``device``."""
    return _mask(*_crop_coords(roi_inv, size, device))


def _mask(cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """The mask over crop coordinates ``cx``, ``cy``: the crop's footprint (the product of two ramps of them:
    what warping its ones bilinearly gives, without a gather), eroded by 2 px, then by 2 w_edge and
    Gaussian-feathered over 2 w_edge + 1 as facexlib does."""
    mask = _erode(_ramp(cx) * _ramp(cy), 2)
    w_edge = int(float(mask.sum(dtype=torch.float64)) ** 0.5) // 20
    if w_edge > 0:
        mask = _blur(_erode(mask, 2 * w_edge), 2 * w_edge + 1)
    return mask


def _warp(face_bgr: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """``cv2.warpAffine`` of a (3, 512, 512) uint8 face sampled at crop coordinates ``cx``, ``cy``: bilinear,
    zeros outside, rounded to 8 bits as facexlib's warp of the uint8 face is. (3, h, w) float32 of levels."""
    scale = 2.0 / (FACE_SIZE - 1)  # pixel centres to grid_sample's [-1, 1] (align_corners)
    grid = torch.stack([cx * scale - 1, cy * scale - 1], dim=-1)
    out = F.grid_sample(face_bgr[None].float(), grid[None], mode="bilinear", padding_mode="zeros",
                        align_corners=True)[0]
    return out.round_().clamp_(0, 255)


def paste_face(master: torch.Tensor, face_bgr: torch.Tensor, affine: np.ndarray) -> None:
    """``faces.paste_face`` (colour, 8 bits) of a (3, 512, 512) uint8 face into a (3, H, W) uint8 BGR master
    on the device, in place."""
    ys, xs, roi_inv = paste_region(master.shape[1:], affine)
    if ys.stop <= ys.start:
        return
    cx, cy = _crop_coords(roi_inv, (xs.stop - xs.start, ys.stop - ys.start), master.device)  # once for both
    m = _mask(cx, cy)
    face = _warp(face_bgr, cx, cy)
    del cx, cy
    region = master[:, ys, xs]
    c = region.float()
    region.copy_(c.add_(face.sub_(c).mul_(m)).round_().clamp_(0, 255).to(torch.uint8))


def _shrunk(px: torch.Tensor, long_side: int, copy: bool = False) -> torch.Tensor:
    """(3, h, w) uint8 shrunk (never enlarged) to ``long_side`` as OpenCV's INTER_AREA shrinks it, with the
    sizes ``Compose`` and ``review.crop_preview`` give; ``copy``: never a view of ``px``."""
    h, w = px.shape[1:]
    if max(h, w) <= long_side:
        return px.clone() if copy else px
    f = long_side / max(h, w)
    return area_resize(px, max(1, round(h * f)), max(1, round(w * f))).to(torch.uint8)


def _jpegs(images: list[torch.Tensor], qualities: list[int]) -> list[bytes]:
    """(3, h, w) uint8 BGR images as JPEGs, one call per quality (on CUDA: one batch for nvJPEG)."""
    out: list[bytes | None] = [None] * len(images)
    for q in sorted(set(qualities)):
        idx = [i for i, qi in enumerate(qualities) if qi == q]
        encoded = encode_jpeg([images[i].flip(0).contiguous() for i in idx], quality=q)
        for i, e in zip(idx, encoded):
            out[i] = e.cpu().numpy().tobytes()
            _check_jpeg(out[i], images[i].shape[1:])
    return out


def _check_jpeg(data: bytes, hw: tuple[int, int]) -> None:
    """A JPEG the encoder made is whole (SOI, EOI) and says the size it was given, or the row is Compose's:
    CUDA encoders have handed back broken files in threaded processes (pytorch/vision#8587, #9060)."""
    try:
        head = imageio.probe(data, 1 << 62)
    except Exception as e:
        raise RuntimeError(f"the device's JPEG encoder gave a broken file: {e}") from None
    if data[:2] != b"\xff\xd8" or head.format != "JPEG" or head.stored_size != (hw[1], hw[0]):
        raise RuntimeError(f"the device's JPEG encoder gave a {head.format} of {head.stored_size} for {hw[::-1]}")


# A monochrome test this close to its bound is left to Compose: the device's decoder (nvJPEG) rounds otherwise
# than the host's, and a print judged colour here but grey there would get colour faces.
GREY_MARGIN = 0.5


def is_grey(master: torch.Tensor) -> bool:
    """``imageio.decode``'s monochrome test of a (3, H, W) uint8 BGR master: its chroma sample, on the host.
    Raises Unsupported near the bound."""
    step = imageio.grey_step(*master.shape[1:])
    spread = imageio.chroma_spread(master[:, ::step, ::step].permute(1, 2, 0).cpu().numpy())
    if abs(spread - imageio.GREY_SPREAD) < GREY_MARGIN:
        raise Unsupported(f"monochrome or not: its chroma spread {spread:.2f} is near {imageio.GREY_SPREAD}")
    return spread <= imageio.GREY_SPREAD


def make_derivative(master: torch.Tensor, faces: list[dict], restored: np.ndarray, quality: int,
                    access: tuple[int, int] | None, crops: tuple[int, int] | None) -> Made:
    """Paste the ``restored`` faces (n, 512, 512, 3 uint8 BGR) whose ``action`` is "restored" into the
    (3, H, W) uint8 BGR ``master`` (in place) and encode it at JPEG ``quality``; ``access``: (long side,
    quality) of the access copy; ``crops``: (size, quality) of the review crops, before and after, of every
    face (``review.crop_box``)."""
    dev = master.device
    _, h, w = master.shape
    boxes = [review.crop_box(f["bbox"], w, h) for f in faces] if crops else []
    before = [_shrunk(master[:, y0:y1, x0:x1], crops[0], copy=True) for x0, y0, x1, y1 in boxes]
    for f, face in zip(faces, restored):
        if f.get("action") == "restored":
            paste_face(master, torch.from_numpy(np.ascontiguousarray(face)).to(dev).permute(2, 0, 1),
                       np.array(f["affine"], np.float64).reshape(2, 3))
    images, qualities = [master], [quality]
    if access:
        images.append(_shrunk(master, access[0]))
        qualities.append(access[1])
    after = [_shrunk(master[:, y0:y1, x0:x1], crops[0]) for x0, y0, x1, y1 in boxes]
    for b, a in zip(before, after):
        images += [b, a]
        qualities += [crops[1]] * 2
    out = _jpegs(images, qualities)
    k = 2 if access else 1
    return Made(out[0], out[1] if access else None, [(out[k + 2 * i], out[k + 2 * i + 1]) for i in range(len(boxes))])

