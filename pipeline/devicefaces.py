"""Faces found on the restoring device (``detect.device=gpu``): a JPEG master is decoded there (nvJPEG
through torchvision on CUDA; libjpeg-turbo on CPU, OpenCV's pixels to the bit), its detection copy is made
with OpenCV's INTER_AREA weights, RetinaFace runs on a batch of copies on canvases of a few sizes
(``CANVAS_STEP``), and the 512 crops are
sampled there as OpenCV's ``warpAffine`` samples them. Only the
landmarks and the crops come back to the host: the CPU side of such an image is reading and hashing it.

Used by ``stages.Restore``; torch is imported at the top, as this module only runs where torch does.
"""

from __future__ import annotations

import contextlib
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
    master: torch.Tensor | None = None  # (3, H, W) uint8 BGR upright, on the device: only when asked to keep it


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
    """A (C, H, W) uint8 image shrunk to (C, out_h, out_w) float32 as ``cv2.resize(..., INTER_AREA)`` does,
    rounded: equal to OpenCV's (tested at archive ratios and whole factors). Never a float copy of the
    whole image: each pass gathers uint8 samples and weighs them into the smaller result."""
    h, w = t.shape[1:]
    if h % out_h == 0 and w % out_w == 0:  # OpenCV's path for whole factors: block sums, then a scale
        ky, kx = h // out_h, w // out_w
        s = t.reshape(t.shape[0], out_h, ky, out_w, kx).sum((2, 4), dtype=torch.int32)
        if ky == kx == 2:  # its 2x2 vector loop: (sum + 2) >> 2
            return ((s + 2) >> 2).float()
        return (s.float() * np.float32(1.0 / (ky * kx))).round_()  # float32 scale, ties to even

    def along(x: torch.Tensor, dim: int, n_out: int) -> torch.Tensor:
        idx, wt = (torch.from_numpy(a).to(x.device) for a in _area_table(x.shape[dim], n_out))
        shape = [1] * x.dim()
        shape[dim] = n_out
        out = None
        for j in range(idx.shape[1]):
            term = x.index_select(dim, idx[:, j]).float().mul_(wt[:, j].view(shape))
            out = term if out is None else out.add_(term)
        return out

    x = along(t, 2, out_w) if out_w != w else t.float()  # rows first, as OpenCV sums them
    x = along(x, 1, out_h) if out_h != h else x
    return x.round_().clamp_(0, 255)  # OpenCV rounds ties to even


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
    return torch.stack(out).permute(0, 2, 3, 1).contiguous()


# Masters decoded at once, at most (besides detect.gpu_batch), in pixels: eight 12 MP scans. A master takes
# 3 bytes a pixel on the device while its detection copy and crops are made.
CHUNK_PIXELS = 96_000_000
# The network sees few distinct input shapes: cuDNN picks its kernels for each new one, which cost an H200
# ~1.5 s per shape (1,776 ms cold, 16.6 ms warm for a 12 MP master's copy: BENCHMARKS.md), and an archive's
# masters come in many sizes. So a detection copy goes at the top left of a canvas whose sides are multiples
# of CANVAS_STEP (and of the network's largest stride, 32): a 1,600 px copy of a 4:3 or 3:2 photograph on
# 1,600 x 1,280, at most five sides each way. Batches are filled with blank canvases to a power of two (or
# to detect.gpu_batch, which bounds them). The network's deeper layers see the canvas's fill where the CPU
# path's see their own zero padding: faces move by rounding, but a face near the copy's right or bottom edge
# by up to a few pixels, and one whose anchors score alike may flip (README; tested).
CANVAS_STEP = 320


def canvas_side(n: int) -> int:
    """The side of the canvas that holds ``n`` pixels of a detection copy."""
    return -(-n // CANVAS_STEP) * CANVAS_STEP


def batch_size(n: int) -> int:
    """The batch that ``n`` copies of one canvas size are run in: the next power of two."""
    return 1 << (n - 1).bit_length()


class DeviceFaces:
    """Decode, detect and align JPEG masters on the detector's device, ``batch`` masters at a time."""

    def __init__(self, detector: FaceDetector, batch: int):
        self.detector, self.batch = detector, batch
        self.device = detector.net.mean_tensor.device
        self.lock = threading.Lock()
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if int(cv2.__version__.split(".")[0]) < 5:  # pyproject asks for 5; an environment may hold 4.x anyway
            log.warning("OpenCV %s: crops aligned on the device follow OpenCV 5's warpAffine, and differ from "
                        "those aligned on the CPU here by up to 4 levels (OpenCV 4's fixed-point warp). Both "
                        "opencv-python and opencv-python-headless install cv2 (see `pip list | grep opencv`): "
                        "upgrade both to >=5 for the two paths to agree", cv2.__version__)
        try:
            from torchvision.io import ImageReadMode, decode_jpeg  # deprecated since 0.29 (TorchCodec's successor)

            self._decoder = (decode_jpeg, ImageReadMode.RGB)
        except ImportError:
            self._decoder = None
            log.warning("torchvision has no decode_jpeg: JPEG masters are decoded on the host (CPU) before "
                        "detection on the device")

    def _decode(self, data: list[bytes], orientations: list[int]) -> list[torch.Tensor | Exception]:
        """(3, H, W) uint8 BGR upright masters on the device. A master the device's decoder refuses
        (progressive on some nvJPEG versions, odd sampling) is decoded by ``imageio.decode`` on the host,
        whose DecodeError then says why it is broken."""
        decoded: list = [None] * len(data)
        if self._decoder is not None:
            decode_jpeg, rgb = self._decoder
            raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]  # (writable: no warning)
            cuda = self.device.type == "cuda"
            try:
                decoded = decode_jpeg(raw, mode=rgb, device=self.device)
            except Exception:  # one bad master fails the whole list: decode them one by one
                decoded = []
                for r in raw:
                    try:
                        decoded.append(decode_jpeg(r, mode=rgb, device=self.device))
                    except Exception as e:
                        decoded.append(e)
            if cuda:  # nvJPEG wrote on a stream of its own: done before anything reads its output
                torch.cuda.synchronize(self.device)
            del raw
        out = []
        for k, (d, o) in enumerate(zip(data, orientations)):
            t, decoded[k] = decoded[k], None  # one master's pixels at a time besides the outputs
            if isinstance(t, torch.Tensor):
                out.append(_orient(t.flip(0), o))
                del t
                continue
            try:  # the host's decoder: the same pixels, or the reason they cannot be had
                bgr = imageio.to_bgr8(imageio.decode(bytes(d), max_pixels=1 << 62).pixels)
            except imageio.DecodeError as e:
                out.append(e)
                continue
            except Exception as e:  # a decoder's own failure on odd bytes, as DecodeDetect reports it
                out.append(imageio.DecodeError(f"cannot decode: {type(e).__name__}: {e}"))
                continue
            try:  # the device failing is not the master's fault: a retryable detect_error, not a decode_error
                out.append(torch.from_numpy(np.ascontiguousarray(bgr)).permute(2, 0, 1).to(self.device))
            except Exception as e:
                out.append(RuntimeError(f"the device took no pixels: {type(e).__name__}: {e}"))
        return out

    def __call__(self, data: list, orientations: list[int], pixels: list[int] | None = None,
                 keep: list[bool] | None = None) -> list[Found | Exception]:
        """``data``: the masters' bytes (any bytes-like); ``pixels``: their sizes from the header, which bound
        how many are decoded at once (``CHUNK_PIXELS``); ``keep``: whose decoded pixels to hand back
        (``Found.master``: their derivatives are made on the device, devicepaste.py)."""
        keep = keep or [False] * len(data)
        pixels = pixels or [0] * len(data)
        out: list[Found | Exception] = []
        with self.using():
            a = 0
            while a < len(data):
                b, total = a + 1, pixels[a]
                while b < len(data) and b - a < self.batch and total + pixels[b] <= CHUNK_PIXELS:
                    total += pixels[b]
                    b += 1
                out += self._chunk(data[a:b], orientations[a:b], keep[a:b])
                a = b
        return out

    @contextlib.contextmanager
    def using(self):
        """What work on the device's masters runs under (here, and devicepaste on the masters kept): one caller
        at a time, as the Restore calls in flight share the decoder and the device; on CUDA a stream of our
        own, waited for before each chunk (``_chunk``) and at the end, so that the allocator hands nvJPEG
        (which writes on its own stream, pytorch/vision#9606) no block that kernels queued by the restoring
        thread on the default stream, or by earlier work here, may still read or write."""
        with self.lock:
            with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
                try:
                    yield
                finally:
                    if self._stream is not None:
                        self._stream.synchronize()

    def _on_canvas(self, copy: torch.Tensor | None, hh: int, ww: int) -> torch.Tensor:
        """A (3, h, w) float detection copy at the top left of an (hh, ww) canvas of the network's mean colour
        (zeros to the network, as its own padding is); ``None``: a blank canvas that fills a batch."""
        if copy is not None and copy.shape[1:] == (hh, ww):
            return copy
        out = self.detector.net.mean_tensor.reshape(3, 1, 1).expand(3, hh, ww).clone()
        if copy is not None:
            out[:, :copy.shape[1], :copy.shape[2]] = copy
        return out

    def _chunk(self, data: list[bytes], orientations: list[int], keep: list[bool]) -> list[Found | Exception]:
        if self._stream is not None:  # nothing of a failed chunk's work still pending on blocks nvJPEG may get
            self._stream.synchronize()
        t0 = time.perf_counter()
        masters = self._decode(data, orientations)
        t1 = time.perf_counter()
        results: list[Found | Exception | None] = [m if isinstance(m, Exception) else None for m in masters]
        todo = [i for i, m in enumerate(masters) if not isinstance(m, Exception)]
        by_canvas: dict[tuple, list[int]] = {}
        scales, sizes = {}, {}
        for i in todo:
            scale, ch, cw = self.detector.copy_size(*masters[i].shape[1:])
            scales[i], sizes[i] = scale, (ch, cw)
            by_canvas.setdefault((canvas_side(ch), canvas_side(cw)), []).append(i)
        dets = {}
        for (hh, ww), members in by_canvas.items():
            try:
                copies = [self._on_canvas(area_resize(masters[i], *sizes[i]) if scales[i] != 1.0
                                          else masters[i].float(), hh, ww) for i in members]
                copies += [self._on_canvas(None, hh, ww)] * (min(batch_size(len(copies)), self.batch) - len(copies))
                copies = torch.stack(copies).contiguous(memory_format=torch.channels_last)
                dets.update(zip(members, self.detector.detect_batch(copies)))  # (the blanks' found nothing)
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
                                   0.0, 0.0, masters[i] if keep[i] else None)
            except Exception as e:
                results[i] = e
        t2 = time.perf_counter()
        for r in results:  # the chunk's device time, shared out (its steps run for all masters at once)
            if isinstance(r, Found):
                r.decode_s, r.detect_s = (t1 - t0) / len(data), (t2 - t1) / len(data)
        return results
