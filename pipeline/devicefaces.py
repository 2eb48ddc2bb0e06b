"""Faces found on the restoring device (``detect.device=gpu``): a JPEG master is decoded there (nvJPEG
through torchvision on CUDA; libjpeg-turbo on CPU, OpenCV's pixels to the bit), its detection copy is made
with OpenCV's INTER_AREA weights, RetinaFace runs on a batch of copies of one size, and the 512 crops are
sampled there as OpenCV's ``warpAffine`` samples them. Only the
landmarks and the crops come back to the host: the CPU side of such an image is reading and hashing it.

Used by ``stages.Restore``; torch is imported at the top, as this module only runs where torch does.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from . import imageio
from .faces import BORDER_VALUE, FACE_SIZE, Face, FaceDetector, align_matrix

log = logging.getLogger(__name__)


@dataclass
class Found:
    faces: list[Face]
    skipped: int                # detected but too small or over max_faces
    crops: np.ndarray           # (n, 512, 512, 3) uint8 BGR, aligned as faces.warp_face aligns them
    affines: list[np.ndarray]   # photo -> crop, one per face
    width: int
    height: int
    decode_s: float
    detect_s: float


def _orient(t: torch.Tensor, orientation: int) -> torch.Tensor:
    """EXIF orientation on a (C, H, W) tensor: ``imageio._apply_orientation``'s transforms."""
    if orientation in (5, 6, 7, 8):
        t = t.transpose(1, 2)
    flips = {2: (2,), 3: (1, 2), 4: (1,), 6: (2,), 7: (1, 2), 8: (1,)}.get(orientation)
    return t.flip(flips) if flips else t


@functools.lru_cache(maxsize=64)
def _area_table(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_AREA weights for shrinking ``n_in`` samples to ``n_out`` (``computeResizeAreaTab``):
    each output is a weighted sum of the inputs its cell overlaps. As (n_out, K) indices and weights,
    padded with weight 0."""
    scale = n_in / n_out
    rows = []
    for d in range(n_out):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, n_in - f1)
        s2 = min(int(np.floor(f2)), n_in - 1)
        s1 = min(int(np.ceil(f1)), s2)
        taps = []
        if s1 - f1 > 1e-3:
            taps.append((s1 - 1, (s1 - f1) / cell))
        taps += [(s, 1.0 / cell) for s in range(s1, s2)]
        if f2 - s2 > 1e-3:
            taps.append((s2, min(min(f2 - s2, 1.0), cell) / cell))
        rows.append(taps)
    k = max(len(t) for t in rows)
    idx = np.zeros((n_out, k), np.int64)
    w = np.zeros((n_out, k), np.float32)
    for d, taps in enumerate(rows):
        for j, (s, a) in enumerate(taps):
            idx[d, j], w[d, j] = s, a
    return idx, w


def area_resize(t: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """A (C, H, W) uint8 image shrunk to (C, out_h, out_w) float32 as ``cv2.resize(..., INTER_AREA)`` does
    (rows first, then columns, rounded): equal to OpenCV's up to float summation order (tested)."""
    def along(x: torch.Tensor, dim: int, n_out: int) -> torch.Tensor:
        idx, w = (torch.from_numpy(a).to(x.device) for a in _area_table(x.shape[dim], n_out))
        out = None
        for j in range(idx.shape[1]):
            shape = [1] * x.dim()
            shape[dim] = n_out
            term = x.index_select(dim, idx[:, j]) * w[:, j].view(shape)
            out = term if out is None else out.add_(term)
        return out

    x = t.float()
    x = along(x, 2, out_w) if out_w != t.shape[2] else x
    x = along(x, 1, out_h) if out_h != t.shape[1] else x
    if t.shape[1] == 2 * out_h and t.shape[2] == 2 * out_w:  # OpenCV's 2x2 path: (sum + 2) >> 2, ties up
        return x.add_(0.5).floor_().clamp_(0, 255)
    return x.round_().clamp_(0, 255)  # elsewhere OpenCV rounds ties to even


def warp_crops(master: torch.Tensor, affines: list[np.ndarray]) -> torch.Tensor:
    """``faces.warp_face`` of a (3, H, W) uint8 BGR master for each affine (photo -> crop), on the master's
    device: (n, 512, 512, 3) uint8. Bilinear in float32 with the border grey outside the photo, as OpenCV 5's
    ``warpAffine`` computes it: equal to it but for about 1 value in 10,000 that is one level off (tested)."""
    _, h, w = master.shape
    dev = master.device
    flat = master.reshape(3, -1)
    border = torch.tensor(BORDER_VALUE, dtype=torch.float32, device=dev).view(3, 1, 1)
    ys, xs = torch.meshgrid(torch.arange(FACE_SIZE, dtype=torch.float32, device=dev),
                            torch.arange(FACE_SIZE, dtype=torch.float32, device=dev), indexing="ij")
    out = []
    for affine in affines:
        inv = cv2.invertAffineTransform(affine.astype(np.float64)).astype(np.float32)  # crop -> photo
        sx = xs * float(inv[0, 0]) + ys * float(inv[0, 1]) + float(inv[0, 2])
        sy = xs * float(inv[1, 0]) + ys * float(inv[1, 1]) + float(inv[1, 2])
        x0, y0 = sx.floor(), sy.floor()
        ax, ay = sx - x0, sy - y0
        x0, y0 = x0.long(), y0.long()
        acc = torch.zeros((3, FACE_SIZE, FACE_SIZE), dtype=torch.float32, device=dev)
        for dy, dx, wgt in ((0, 0, (1 - ax) * (1 - ay)), (0, 1, ax * (1 - ay)), (1, 0, (1 - ax) * ay), (1, 1, ax * ay)):
            px, py = x0 + dx, y0 + dy
            inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
            at = (py.clamp(0, h - 1) * w + px.clamp(0, w - 1)).view(-1)
            val = flat.index_select(1, at).view(3, FACE_SIZE, FACE_SIZE).float()
            acc += torch.where(inside, val, border) * wgt
        out.append(acc.round_().clamp_(0, 255).to(torch.uint8))
    if not out:
        return torch.empty((0, FACE_SIZE, FACE_SIZE, 3), dtype=torch.uint8, device=dev)
    return torch.stack(out).permute(0, 2, 3, 1)


class DeviceFaces:
    """Decode, detect and align JPEG masters on the detector's device, ``batch`` masters at a time."""

    def __init__(self, detector: FaceDetector, batch: int):
        self.detector, self.batch = detector, batch
        self.device = detector.net.mean_tensor.device
        self.lock = threading.Lock()

    def _decode(self, data: list[bytes], orientations: list[int]) -> list[torch.Tensor | Exception]:
        """(3, H, W) uint8 BGR upright masters on the device. A master the device's decoder refuses
        (progressive on some nvJPEG versions, odd sampling) is decoded by ``imageio.decode`` on the host,
        whose DecodeError then says why it is broken."""
        from torchvision.io import ImageReadMode, decode_jpeg

        raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
        cuda = self.device.type == "cuda"
        if cuda:  # nvJPEG writes on a stream of its own that does not wait for ours (pytorch/vision#9606)
            torch.cuda.current_stream(self.device).synchronize()
        try:
            decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device)
        except Exception:  # one bad master fails the whole list: decode them one by one
            decoded = []
            for r in raw:
                try:
                    decoded.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=self.device))
                except Exception as e:
                    decoded.append(e)
        if cuda:  # ... nor ours for it
            torch.cuda.synchronize(self.device)
        out = []
        for d, o, t in zip(data, orientations, decoded):
            if isinstance(t, torch.Tensor):
                out.append(_orient(t.flip(0), o))
                continue
            try:  # the host's decoder: the same pixels, or the reason they cannot be had
                img = imageio.decode(d, max_pixels=1 << 62)
                bgr = imageio.to_bgr8(img.pixels)
                out.append(torch.from_numpy(np.ascontiguousarray(bgr)).permute(2, 0, 1).to(self.device))
            except Exception as e:
                out.append(e)
        return out

    def __call__(self, data: list[bytes], orientations: list[int]) -> list[Found | Exception]:
        out: list[Found | Exception] = []
        with self.lock:  # one caller at a time: the Restore calls in flight share the decoder and the device
            for a in range(0, len(data), self.batch):
                out += self._chunk(data[a:a + self.batch], orientations[a:a + self.batch])
        return out

    def _chunk(self, data: list[bytes], orientations: list[int]) -> list[Found | Exception]:
        t0 = time.perf_counter()
        masters = self._decode(data, orientations)
        t1 = time.perf_counter()
        results: list[Found | Exception | None] = [m if isinstance(m, Exception) else None for m in masters]
        todo = [i for i, m in enumerate(masters) if not isinstance(m, Exception)]
        by_size: dict[tuple, list[int]] = {}
        scales = {}
        for i in todo:
            scale, ch, cw = self.detector.copy_size(*masters[i].shape[1:])
            scales[i] = scale
            by_size.setdefault((ch, cw), []).append(i)
        dets = {}
        for (ch, cw), members in by_size.items():
            try:
                copies = torch.stack([area_resize(masters[i], ch, cw) if scales[i] != 1.0 else masters[i].float()
                                      for i in members]).contiguous(memory_format=torch.channels_last)
                dets.update(zip(members, self.detector.detect_batch(copies)))
            except Exception as e:  # e.g. out of memory on a large batch: these masters fail, not the call
                log.exception("detection on the device failed for %d masters", len(members))
                results = [e if i in members else r for i, r in enumerate(results)]
        for i in todo:
            if i not in dets:
                continue
            try:
                faces, skipped = self.detector.select(dets[i], scales[i])
                affines = [align_matrix(f.landmarks) for f in faces]
                crops = warp_crops(masters[i], affines).cpu().numpy()
                results[i] = Found(faces, skipped, crops, affines, masters[i].shape[2], masters[i].shape[1],
                                   0.0, 0.0)
            except Exception as e:
                results[i] = e
        t2 = time.perf_counter()
        for r in results:  # the chunk's device time, shared out (its steps run for all masters at once)
            if isinstance(r, Found):
                r.decode_s, r.detect_s = (t1 - t0) / len(data), (t2 - t1) / len(data)
        return results
