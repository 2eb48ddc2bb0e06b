"""JPEG derivatives without generation loss (``output.jpeg_mode = blocks``).

A JPEG master's derivative keeps the master's quantisation tables, sampling and quantised DCT coefficients
in every MCU (minimum coded unit: 8x8 pixels, 16x16 with 4:2:0 chroma) that no pasted face touches; only
the MCUs a face's paste mask reaches are encoded again, from the derivative's pixels, with the master's own
tables. So the rest of the photograph is the master's data, not a re-encoding of it: no second
generation of JPEG loss, whatever the quality setting, and the quantisation DCT and colour conversion cost
scales with the faces' area. The entropy coding of the whole file is still redone (lossless).

Pixels outside the re-encoded MCUs decode bit-identically to the master's, except within one chroma
sample of a re-encoded MCU in subsampled (4:2:0, 4:2:2) files: decoders interpolate chroma across MCU
borders ("fancy upsampling"), so their colour follows the restored neighbour by a few levels.

The DCT coefficients are read and written with ``jpeglib`` (libjpeg-turbo through ctypes; it works on file
paths, hence the temporary files); the faces' MCUs are encoded by Pillow's libjpeg-turbo where it writes the
master's sampling (the same coefficients, faster), by jpeglib's otherwise. Masters that cannot be spliced
(progressive, arithmetic-coded, lossless or 12-bit, CMYK/YCCK/RGB colour, not the derivative's size) raise
``Unsupported``: Compose then re-encodes the whole image and says so in the row's notes. They are told apart
by the file's own SOF marker before libjpeg sees the file, so an unsupported file never reaches a library
call that could abort the process.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import tempfile
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

_LIBJPEG = "turbo210"  # the libjpeg-turbo build jpeglib ships; also what OpenCV decodes with


class Unsupported(ValueError):
    """This master cannot keep its blocks; the message says why (for the row's notes)."""


@dataclass(frozen=True)
class Frame:
    """What the master's SOF marker says."""

    sof: int                            # 0xC0 baseline, 0xC1 extended sequential, 0xC2 progressive, ...
    precision: int                      # bits per sample
    height: int
    width: int
    sampling: tuple[tuple[int, int], ...]  # per component: (vertical, horizontal)
    adobe_transform: int | None         # APP14 "Adobe" colour transform (0: none, i.e. RGB or CMYK)


_SOF_NAMES = {0xC2: "progressive", 0xC3: "lossless", 0xC6: "progressive", 0xC7: "lossless",
              0xC9: "arithmetic-coded", 0xCA: "progressive arithmetic-coded", 0xCB: "lossless arithmetic-coded",
              0xCD: "arithmetic-coded", 0xCE: "progressive arithmetic-coded", 0xCF: "lossless arithmetic-coded",
              0xC5: "hierarchical"}


def _segments(data: bytes):
    """(marker, body) of each marker segment after SOI, up to the first scan (SOS, not yielded). Raises
    ``Unsupported`` where the segments cannot be walked."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise Unsupported("malformed JPEG marker segments")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:
            return
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        yield marker, data[i + 4:i + 2 + length]
        i += 2 + length


def _is_sof(marker: int) -> bool:
    """A frame header (SOF0-SOF15; not DHT, JPG or DAC, which share the range)."""
    return 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)


def frame(data: bytes) -> Frame:
    """Walk the marker segments up to the frame header (no pixels read)."""
    if data[:2] != b"\xff\xd8":
        raise Unsupported("not a JPEG file")
    adobe = None
    for marker, body in _segments(data):
        if marker == 0xEE and body[:5] == b"Adobe" and len(body) >= 12:
            adobe = body[11]
        if _is_sof(marker):
            if len(body) < 6:
                raise Unsupported("truncated JPEG frame header")
            precision, height, width, n = body[0], *struct.unpack(">HH", body[1:5]), body[5]
            comps = body[6:6 + 3 * n]
            sampling = tuple((comps[3 * k + 1] & 0x0F, comps[3 * k + 1] >> 4) for k in range(len(comps) // 3))
            return Frame(marker, precision, height, width, sampling, adobe)
    raise Unsupported("no JPEG frame header")


def check(data: bytes, shape: tuple[int, ...]) -> Frame:
    """The master's frame, or ``Unsupported`` saying why its blocks cannot be kept for pixels of ``shape``."""
    f = frame(data)
    if f.sof not in (0xC0, 0xC1):
        raise Unsupported(f"{_SOF_NAMES.get(f.sof, f'SOF{f.sof - 0xC0}')} JPEG master")
    if f.precision != 8:
        raise Unsupported(f"{f.precision}-bit JPEG master")
    n = len(f.sampling)
    if n == 4:
        raise Unsupported("CMYK JPEG master")
    if n not in (1, 3) or (n == 3 and f.adobe_transform == 0):
        raise Unsupported("JPEG master not in YCbCr or grey" if n != 3 else "RGB JPEG master (no YCbCr)")
    if any(v not in (1, 2) or h not in (1, 2) for v, h in f.sampling) or (
            n == 3 and any(s != (1, 1) for s in f.sampling[1:])):
        raise Unsupported(f"JPEG sampling {f.sampling} (vertical, horizontal per component; supported: 4:4:4, "
                          "4:2:2, 4:4:0 and 4:2:0)")
    channels = 1 if len(shape) == 2 else shape[2]
    if (f.height, f.width) != tuple(shape[:2]):
        raise Unsupported(f"the derivative ({shape[1]}x{shape[0]}) is not the master's stored size "
                          f"({f.width}x{f.height}), e.g. after EXIF rotation")
    if channels != n:
        raise Unsupported(f"the derivative has {channels} channels, the master {n}")
    return f


@functools.cache
def _jpeglib():
    import jpeglib

    jpeglib.version.set(_LIBJPEG)
    return jpeglib


def _touched_mcus(changed, grid: tuple[int, int], mcu: tuple[int, int]) -> np.ndarray:
    """The MCUs (grid rows x cols) that any changed pixel lies in; ``changed``: (ys, xs, mask) regions."""
    mh, mw = mcu
    out = np.zeros(grid, bool)
    for ys, xs, mask in changed:
        if not mask.size or not mask.any():
            continue
        y0, x0 = ys.start, xs.start
        top, left = y0 % mh, x0 % mw
        h, w = mask.shape
        padded = np.zeros((-(-(top + h) // mh) * mh, -(-(left + w) // mw) * mw), bool)
        padded[top:top + h, left:left + w] = mask
        cells = padded.reshape(padded.shape[0] // mh, mh, padded.shape[1] // mw, mw).any(axis=(1, 3))
        r0, c0 = y0 // mh, x0 // mw
        out[r0:r0 + cells.shape[0], c0:c0 + cells.shape[1]] |= cells[:grid[0] - r0, :grid[1] - c0]
    return out


def splice(master: bytes, pixels: np.ndarray, changed) -> tuple[bytes, float]:
    """The derivative as a JPEG with ``master``'s blocks wherever ``pixels`` are the master's.

    ``pixels``: the derivative, 8-bit BGR (H, W, 3) or grey (H, W), in the master's stored orientation.
    ``changed``: the regions whose pixels may differ from the master's, as (ys, xs, bool mask) — what
    ``faces.paste_face`` returns. Returns the file and the fraction of MCUs encoded again.
    Raises ``Unsupported`` when the master cannot keep its blocks.
    """
    f = check(master, pixels.shape)
    if pixels.dtype != np.uint8:
        raise Unsupported(f"{pixels.dtype} pixels for an 8-bit JPEG")
    jpeglib = _jpeglib()
    vmax, hmax = max(v for v, _ in f.sampling), max(h for _, h in f.sampling)
    mh, mw = 8 * vmax, 8 * hmax
    grid = (-(-f.height // mh), -(-f.width // mw))
    touched = _touched_mcus(changed, grid, (mh, mw))
    with tempfile.TemporaryDirectory(prefix="jpegblocks-") as tmp:
        src, out = os.path.join(tmp, "master.jpg"), os.path.join(tmp, "out.jpg")
        with open(src, "wb") as fh:
            fh.write(master)
        try:
            m = jpeglib.read_dct(src)
            comps = _components(m, len(f.sampling))
        except Exception as e:  # what the marker walk could not see (a damaged table, ...)
            raise Unsupported(f"its coefficients could not be read ({type(e).__name__}: {e})") from None
        # libjpeg's own reading of the colour space (component ids 'R','G','B', an Adobe marker after the
        # frame header, ...): blocks of an RGB-coded file written back under a JFIF header would decode as
        # YCbCr, every colour wrong.
        # (By name: jpeglib's Colorspace compares equal by channel count, JCS_RGB == JCS_YCbCr.)
        expected = "JCS_YCbCr" if len(f.sampling) == 3 else "JCS_GRAYSCALE"
        if m.jpeg_color_space.name != expected:
            raise Unsupported(f"{m.jpeg_color_space.name} JPEG master (not YCbCr or grey)")
        for rows, cols in _boxes(touched):
            _encode_into(jpeglib, m, comps, f, pixels, touched, rows, cols, (mh, mw), tmp)
        # Written from the tables and coefficients alone: with its source attached jpeglib decodes the whole
        # master again (30% slower), and the master's own markers would repeat the JFIF header libjpeg
        # writes. Metadata is carried afterwards by metadata.carry, as for a re-encoded derivative.
        m.content, m.markers = None, []
        m.write_dct(out)
        with open(out, "rb") as fh:
            data = fh.read()
    # jpeglib writes some table layouts back wrongly (tables in slots 0 and 2, or Cb and Cr crossed: every
    # block then decodes with another table); the file's own markers must give each component the master's.
    if _component_tables(data) != _component_tables(master):
        raise Unsupported("its quantisation tables could not be written back to their components as they are")
    return data, float(touched.mean()) if touched.size else 0.0


def _component_tables(data: bytes) -> list[tuple[int, ...]]:
    """Each frame component's quantisation table (its values, however wide the file stores them) as the
    markers define it up to the first scan (DQT definitions, the last one of an id winning; SOF's selectors).
    Raises ``Unsupported`` on marker segments that cannot be walked."""
    tables: dict[int, tuple[int, ...]] = {}
    selectors: list[int] = []
    for marker, body in _segments(data):
        if marker == 0xDB:
            j = 0
            while j < len(body):
                wide = body[j] >> 4  # 16-bit values; libjpeg writes a table whose values fit in 8 bits as 8-bit
                raw = body[j + 1:j + 1 + 64 * (wide + 1)]
                if len(raw) < 64 * (wide + 1):
                    raise Unsupported("truncated JPEG quantisation table")
                tables[body[j] & 0x0F] = struct.unpack(">64H" if wide else "64B", raw)
                j += 1 + len(raw)
        elif _is_sof(marker):
            if len(body) < 6 or len(body) < 6 + 3 * body[5]:
                raise Unsupported("truncated JPEG frame header")
            selectors = [body[6 + 3 * k + 2] for k in range(body[5])]
    return [tables.get(t, ()) for t in selectors]


def _components(dct, n: int) -> list[np.ndarray]:
    """A jpeglib DCT object's coefficient arrays, Y first (Cb, Cr when ``n`` is 3)."""
    return [dct.Y] + ([dct.Cb, dct.Cr] if n == 3 else [])


def _boxes(touched: np.ndarray):
    """Bounding boxes (MCU row and column slices) of the touched MCUs' connected groups: each is encoded as
    one crop, so MCUs between two far-apart faces are not encoded for nothing."""
    n, _, stats, _ = cv2.connectedComponentsWithStats(touched.astype(np.uint8), connectivity=8)
    for k in range(1, n):
        x, y, w, h = stats[k, :4]
        yield slice(y, y + h), slice(x, x + w)


def _encode_into(jpeglib, m, comps, f: Frame, pixels: np.ndarray, touched: np.ndarray, rows: slice, cols: slice,
                 mcu: tuple[int, int], tmp: str) -> None:
    """Encode the MCU box ``rows`` x ``cols`` of ``pixels`` with the master's tables and sampling, and copy
    the coefficients of its touched MCUs into the master's (``comps``, in place)."""
    mh, mw = mcu
    y0, x0 = rows.start * mh, cols.start * mw
    y1, x1 = min(rows.stop * mh, f.height), min(cols.stop * mw, f.width)
    path = os.path.join(tmp, "crop.jpg")
    try:
        _encode_crop(jpeglib, m, f, pixels[y0:y1, x0:x1], path)
        c = jpeglib.read_dct(path)
        new = _components(c, len(comps))
    except Exception as e:  # an encoder's failure: the derivative is re-encoded instead, with a note
        raise Unsupported(f"its faces' blocks could not be encoded ({type(e).__name__}: {e})") from None
    if not all(np.array_equal(a, b) for a, b in zip(_tables(c, len(comps)), _tables(m, len(comps)))):
        # an encoder that would not take a table as it is (scaled or clamped): then nothing would match
        raise Unsupported("the master's quantisation tables cannot be written back as they are")
    sel = touched[rows, cols]
    for comp, fresh, (v, h) in zip(comps, new, f.sampling):
        # Each MCU holds v x h blocks of this component; a component's arrays stop at the image's last block.
        r0, c0 = rows.start * v, cols.start * h
        mask = np.repeat(np.repeat(sel, v, 0), h, 1)[:fresh.shape[0], :fresh.shape[1]]
        target = comp[r0:r0 + fresh.shape[0], c0:c0 + fresh.shape[1]]
        target[mask] = fresh[mask]


# The samplings (vertical, horizontal per component) Pillow writes, as its ``subsampling`` codes; grey is
# written as one 1x1 component.
_PILLOW_SUBSAMPLING = {((1, 1), (1, 1), (1, 1)): 0, ((1, 2), (1, 1), (1, 1)): 1, ((2, 2), (1, 1), (1, 1)): 2,
                       ((1, 1),): None}


def _encode_crop(jpeglib, m, f: Frame, crop: np.ndarray, path: str, pillow: bool = True) -> None:
    """Encode ``crop`` (8-bit BGR or grey) to ``path`` with the master ``m``'s tables and ``f``'s sampling.

    Through Pillow where it writes the sampling and is built on libjpeg-turbo (SIMD): it makes the coefficients
    jpeglib's build makes (integer DCT, the same colour conversion and downsampling: tested) 4x faster (a 12 MP
    master's two faces: 131 -> 30 ms); through jpeglib's encoder otherwise (4:4:0, grey declared at 2x2, ...).
    """
    n = len(f.sampling)
    if pillow and f.sampling in _PILLOW_SUBSAMPLING and _pillow_on_turbo():
        # Pillow holds RGB as RGBX: OpenCV's swap writes that layout and Pillow takes it without a copy (a
        # 12 MP master's faces: 29 -> 3 ms for the swap and the image, against 72 ms for numpy's reversed axis)
        if n == 3:
            rgbx = cv2.cvtColor(crop, cv2.COLOR_BGR2RGBA)
            img = Image.frombuffer("RGBX", rgbx.shape[1::-1], rgbx, "raw", "RGBX", 0, 1)
        else:
            grey = np.ascontiguousarray(crop)
            img = Image.frombuffer("L", grey.shape[::-1], grey, "raw", "L", 0, 1)
        extra = {} if n == 1 else {"subsampling": _PILLOW_SUBSAMPLING[f.sampling]}
        # a table per component, in component order: Pillow gives component i table i
        img.save(path, "JPEG", qtables=[t.ravel().tolist() for t in _tables(m, n)], **extra)
        return
    spatial = cv2.cvtColor(crop, cv2.COLOR_BGR2RGB) if n == 3 else np.ascontiguousarray(crop)
    s = jpeglib.from_spatial(spatial if n == 3 else spatial[:, :, None],
                             jpeglib.JCS_RGB if n == 3 else jpeglib.JCS_GRAYSCALE)
    s.samp_factor = np.array(f.sampling, np.int32)
    s.write_spatial(path, qt=m.qt, quant_tbl_no=m.quant_tbl_no, dct_method=jpeglib.JDCT_ISLOW)


@functools.cache
def _pillow_on_turbo() -> bool:
    """Pillow's JPEG codec is libjpeg-turbo, whose integer DCT the equality with jpeglib's build rests on (a
    Pillow built on IJG's libjpeg 9 could round differently)."""
    from PIL import features

    return bool(features.check_feature("libjpeg_turbo"))


def _tables(dct, n: int) -> list[np.ndarray]:
    """A jpeglib DCT object's quantisation table of each of its first ``n`` components."""
    return [dct.qt[k] for k in np.asarray(dct.quant_tbl_no)[:n]]
