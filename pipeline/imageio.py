"""Bytes <-> pixels. Decoding reads the header first (pixel-count guard, EXIF orientation) with Pillow,
then the pixels with OpenCV at their native depth and channels; encoding writes the derivative.

Pixels are OpenCV-ordered: (H, W) grey, (H, W, 3) BGR or (H, W, 4) BGRA, uint8 or uint16.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

# We check the pixel count from the header ourselves (input.max_pixels) before any pixel is decoded;
# Pillow's own limit would otherwise override that setting for images between the two.
Image.MAX_IMAGE_PIXELS = None

# Formats we decode, by Pillow's format name, and the extension used for "same format" output.
FORMATS = {"JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif", "WEBP": ".webp", "BMP": ".bmp"}
EXTENSIONS = {".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF",
              ".webp": "WEBP", ".bmp": "BMP"}


class DecodeError(ValueError):
    """The bytes are not an image we can decode; the message says why, for the result row."""


class TooLargeError(DecodeError):
    pass


@dataclass
class Decoded:
    pixels: np.ndarray
    format: str                 # Pillow format name: JPEG, PNG, ...
    orientation: int            # EXIF orientation that was applied (1 = none)
    grey: bool = False          # a monochrome master: grey, sepia or toned (see _is_grey)
    cmyk: bool = False          # converted from CMYK: the master's (CMYK) ICC profile no longer applies
    notes: str | None = None    # what a person should know: pages dropped, colour space converted
    tiff_compression: str | None = None  # a TIFF master's compression (TIFF_KEPT's terms); None: not a TIFF

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def channels(self) -> int:
        return 1 if self.pixels.ndim == 2 else self.pixels.shape[2]


def _apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation 1-8 -> upright pixels (the transforms of Pillow's ImageOps.exif_transpose)."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: a.swapaxes(0, 1)[:, ::-1],
        7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
        8: lambda a: a.swapaxes(0, 1)[::-1],
    }
    return np.ascontiguousarray(ops[orientation](img)) if orientation in ops else img


_MAGIC = [(b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
          (b"BM", "BMP"), (b"GIF8", "GIF")]


def _sniff(data: bytes) -> str | None:
    """The format a file's first bytes claim, to tell a corrupt image from something that is no image."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)


def _orientation(im: Image.Image) -> int:
    """EXIF orientation from the header. Pillow's PNG getexif() would decode the whole image to look for
    an eXIf chunk after the pixels, so for PNG only the chunks read with the header count."""
    if im.format == "PNG":
        raw = im.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
    else:
        exif = im.getexif()
    return int(exif.get(0x0112, 1) or 1)


def _jpeg_truncated(data: bytes) -> bool:
    # libjpeg fills a truncated scan with grey and only warns; a complete JPEG ends with EOI (FF D9), maybe
    # followed by zeros. (Any bytes-like: the Restore actor reads masters where Arrow holds them.)
    a = np.frombuffer(memoryview(data).cast("B"), np.uint8)
    end = len(a)
    while end:  # the last non-zero byte, a block at a time from the end (a padded file: a few blocks)
        nz = np.flatnonzero(a[max(0, end - 65536):end])
        if nz.size:
            end = max(0, end - 65536) + int(nz[-1]) + 1
            break
        end = max(0, end - 65536)
    return a[max(0, end - 2):end].tobytes() != b"\xff\xd9"


@dataclass
class Header:
    format: str                 # Pillow format name
    mode: str                   # Pillow mode: RGB, L, CMYK, I;16, ...
    stored_size: tuple[int, int]  # (width, height) as stored, before the EXIF orientation
    n_frames: int
    orientation: int            # EXIF orientation, 1-8 (1 = none)
    tiff_compression: str | None = None  # a TIFF's compression (TIFF_KEPT's terms); None: not a TIFF

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) upright, as ``decode`` returns the pixels."""
        w, h = self.stored_size
        return (h, w) if self.orientation in (5, 6, 7, 8) else (w, h)


def probe(data: bytes, max_pixels: int) -> Header:
    """What ``decode`` checks before any pixel is decoded (format, size against ``max_pixels``, EXIF
    orientation, a JPEG cut short); the same DecodeError (or TooLargeError) it would raise."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            fmt, (w, h), mode = im.format, im.size, im.mode
            if w * h > max_pixels:
                raise TooLargeError(f"{w}x{h} = {w * h / 1e6:.0f} MP exceeds input.max_pixels = "
                                    f"{max_pixels / 1e6:.0f} MP")
            n_frames = getattr(im, "n_frames", 1)
            orientation = _orientation(im)
            compression = TIFF_KEPT.get(im.info.get("compression"), "lzw") if fmt == "TIFF" else None
    except TooLargeError:
        raise
    except Exception as e:
        if "truncated" in str(e).lower():
            raise DecodeError("truncated file (cut short inside its header): re-copy it from the source") from None
        sniffed = _sniff(data)
        if sniffed:
            raise DecodeError(f"corrupt {sniffed} file ({type(e).__name__}: {e}): re-copy it from the source") from None
        raise DecodeError(f"not a recognised image ({type(e).__name__}: {e})") from None
    if fmt not in FORMATS:
        raise DecodeError(f"unsupported format {fmt}; supported: {', '.join(FORMATS)}")
    if fmt == "JPEG" and _jpeg_truncated(data):
        raise DecodeError("truncated JPEG (no end-of-image marker): the file was cut short; re-copy it")
    if n_frames > 1 and fmt != "TIFF":
        raise DecodeError(f"animated {fmt} with {n_frames} frames is not a photograph")
    return Header(fmt, mode, (w, h), n_frames, orientation if orientation in range(1, 9) else 1, compression)


def decode(data: bytes, max_pixels: int) -> Decoded:
    """Decode ``data``; raise DecodeError (or TooLargeError) with a message a person can act on."""
    head = probe(data, max_pixels)
    fmt, mode, n_frames, orientation = head.format, head.mode, head.n_frames, head.orientation
    notes = []
    if fmt == "TIFF" and n_frames > 1:
        notes.append(f"multi-page TIFF with {n_frames} pages: the first page was processed")
    if mode == "CMYK" and fmt == "TIFF":
        # OpenCV hands CMYK TIFF samples back as if they were BGRA; Pillow converts them.
        with Image.open(io.BytesIO(data)) as im:
            pixels = np.ascontiguousarray(np.asarray(im.convert("RGB"))[:, :, ::-1])
        notes.append("CMYK master: converted to RGB")
    else:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if pixels is None:
            raise DecodeError(f"{fmt} data is corrupt (OpenCV could not decode it)")
        if mode == "CMYK":
            notes.append("CMYK master: converted to RGB")
    if pixels.dtype not in (np.uint8, np.uint16):
        raise DecodeError(f"unsupported sample type {pixels.dtype} (8- and 16-bit integers are supported)")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    pixels = _apply_orientation(pixels, orientation)
    return Decoded(pixels, fmt, orientation, grey=_is_grey(pixels, mode), cmyk=mode == "CMYK",
                   notes="; ".join(notes) or None, tiff_compression=head.tiff_compression)


def _is_grey(pixels: np.ndarray, mode: str) -> bool:
    """Monochrome: by mode, or by chroma statistics (``chroma_is_grey`` of ``grey_step``'s sample)."""
    if pixels.ndim == 2 or mode in ("L", "LA", "1", "I", "I;16", "I;16B", "I;16L"):
        return True
    step = grey_step(*pixels.shape[:2])
    return chroma_is_grey(to_bgr8(pixels[::step, ::step]))


def grey_step(height: int, width: int) -> int:
    """The stride of the ~250,000 samples whose chroma decides whether a master is monochrome."""
    return max(1, int((height * width / 250_000) ** 0.5))


GREY_SPREAD = 2.5  # chroma_spread's bound for a monochrome master; measured: toned prints <= 1, colour >= 3.4


def chroma_spread(sample_bgr8: np.ndarray) -> float:
    """In a grey, sepia or otherwise toned print every pixel's chroma (Cr, Cb around neutral) lies on one
    line through neutral — one hue, stronger in the highlights — while a colour photo's chroma spreads
    across hues. So: the principal direction of the chroma vectors, and the spread perpendicular to it
    (98th percentile, 8-bit levels)."""
    s = np.ascontiguousarray(sample_bgr8)
    c = cv2.cvtColor(s, cv2.COLOR_BGR2YCrCb)[..., 1:].reshape(-1, 2).astype(np.float64) - 128.0
    _, vecs = np.linalg.eigh(c.T @ c)
    direction = vecs[:, -1]                                  # the dominant hue line through neutral
    perpendicular = np.abs(c @ np.array([-direction[1], direction[0]]))
    return float(np.percentile(perpendicular, 98))


def chroma_is_grey(sample_bgr8: np.ndarray) -> bool:
    """A monochrome master's sample (``chroma_spread``)."""
    return chroma_spread(sample_bgr8) <= GREY_SPREAD


def to8(pixels: np.ndarray) -> np.ndarray:
    """16-bit -> 8-bit, rounded (OpenCV's saturating conversion: 100x faster than numpy on a 40 MP scan)."""
    return cv2.convertScaleAbs(pixels, alpha=255 / 65535) if pixels.dtype == np.uint16 else pixels


def to_bgr8(pixels: np.ndarray) -> np.ndarray:
    """The 8-bit BGR view that detection and restoration work on."""
    pixels = to8(pixels)
    if pixels.ndim == 2:
        return cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
    if pixels.shape[2] == 4:
        return np.ascontiguousarray(pixels[:, :, :3])
    return pixels


def output_format(src_format: str, policy: str) -> str:
    """Pillow format name of the derivative under ``output.format``."""
    return src_format if policy == "same" else {"jpeg": "JPEG", "png": "PNG", "tiff": "TIFF", "webp": "WEBP"}[policy]


_TIFF_COMPRESSION = {"lzw": 5, "deflate": 8, "none": 1}  # libtiff codes (8: Adobe Deflate, read everywhere)
# A TIFF master's compression (Pillow's name) as output.tiff_compression names it: what its derivative gets under
# "master". Others (PackBits, JPEG-in-TIFF, CCITT, ZSTD, ...) are written as LZW, which every reader reads.
TIFF_KEPT = {"raw": "none", "tiff_lzw": "lzw", "tiff_adobe_deflate": "deflate", "tiff_deflate": "deflate"}


def encode(pixels: np.ndarray, ext: str, jpeg_quality: int = 95, webp_quality: int = 95,
           png_level: int | None = None, tiff_compression: str = "lzw") -> bytes:
    """Encode for ``ext``; formats without 16-bit or alpha support get 8-bit / no alpha. ``png_level`` None:
    OpenCV's fastest PNG (zlib level 1 with the RLE strategy)."""
    ext = ext.lower()
    params: list[int] = []
    if ext in (".jpg", ".jpeg", ".webp", ".bmp"):
        pixels = to8(pixels)
        if ext in (".jpg", ".jpeg") and pixels.ndim == 3 and pixels.shape[2] == 4:
            pixels = pixels[:, :, :3]
    if ext in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
    elif ext == ".webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, webp_quality]
    elif ext == ".png" and png_level is not None:
        params = [cv2.IMWRITE_PNG_COMPRESSION, png_level]
    elif ext in (".tif", ".tiff"):
        params = [cv2.IMWRITE_TIFF_COMPRESSION, _TIFF_COMPRESSION[tiff_compression]]
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(pixels), params)
    if not ok:
        raise ValueError(f"OpenCV could not encode {pixels.shape} {pixels.dtype} as {ext}")
    return buf.tobytes()
