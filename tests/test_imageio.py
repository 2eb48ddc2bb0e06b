import io

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline import imageio


def _jpeg_with_orientation(arr_rgb: np.ndarray, orientation: int) -> bytes:
    im = Image.fromarray(arr_rgb)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pillow(orientation):
    rng = np.random.default_rng(orientation)
    rgb = np.kron(rng.integers(0, 255, (6, 4, 3), dtype=np.uint8), np.ones((16, 16, 1), np.uint8))
    data = _jpeg_with_orientation(rgb, orientation)
    dec = imageio.decode(data, 10**8)
    from PIL import ImageOps
    ref = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))[:, :, ::-1]
    assert dec.orientation == orientation
    assert dec.pixels.shape == ref.shape
    assert np.abs(dec.pixels.astype(int) - ref.astype(int)).mean() < 2


def test_decodes_grey_16bit_and_alpha_at_native_depth():
    g16 = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 20).astype(np.uint16)
    d = imageio.decode(cv2.imencode(".png", g16)[1].tobytes(), 10**8)
    assert d.pixels.dtype == np.uint16 and d.pixels.ndim == 2 and np.array_equal(d.pixels, g16)
    rgba = np.random.default_rng(0).integers(0, 255, (20, 30, 4), dtype=np.uint8)
    d = imageio.decode(cv2.imencode(".png", rgba)[1].tobytes(), 10**8)
    assert d.channels == 4 and np.array_equal(d.pixels, rgba)
    t16 = np.random.default_rng(1).integers(0, 65535, (20, 30, 3), dtype=np.uint16)
    d = imageio.decode(cv2.imencode(".tif", t16)[1].tobytes(), 10**8)
    assert d.format == "TIFF" and np.array_equal(d.pixels, t16)
    bgr8 = imageio.to_bgr8(t16)
    assert bgr8.dtype == np.uint8 and np.abs(bgr8.astype(int) - t16 // 257).max() <= 1


_NOISE_JPEG = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))[1].tobytes()


@pytest.mark.parametrize("data,status,words", [
    (b"", imageio.DecodeError, "empty"),
    (b"hello, I am a text file", imageio.DecodeError, "not a recognised image"),
    (_NOISE_JPEG[: len(_NOISE_JPEG) // 2], imageio.DecodeError, "truncated JPEG"),
    (_NOISE_JPEG[:300], imageio.DecodeError, "truncated file"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, imageio.DecodeError, "corrupt PNG file"),
    (b"GIF89a" + b"\x00" * 40, imageio.DecodeError, "corrupt GIF file"),
])
def test_bad_bytes_give_a_message_a_person_can_act_on(data, status, words):
    with pytest.raises(status, match=words):
        imageio.decode(data, 10**8)


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    data = cv2.imencode(".png", np.zeros((300, 400), np.uint8))[1].tobytes()
    with pytest.raises(imageio.TooLargeError, match="400x300"):
        imageio.decode(data, max_pixels=100_000)


@pytest.mark.parametrize("ext", [".png", ".tif", ".jpg", ".webp", ".bmp"])
def test_encode_round_trips(ext):
    y, x = np.mgrid[0:32, 0:48]
    img = np.stack([x * 5, y * 7, (x + y) * 3], axis=2).astype(np.uint8)  # smooth: lossy codecs keep it close
    back = imageio.decode(imageio.encode(img, ext, jpeg_quality=95, webp_quality=95), 10**8).pixels
    tol = 0 if ext in (".png", ".tif", ".bmp") else 3
    assert back.shape == img.shape and np.abs(back.astype(int) - img.astype(int)).mean() <= tol


@pytest.mark.parametrize("setting,tag", [("lzw", "tiff_lzw"), ("deflate", "tiff_adobe_deflate"), ("none", "raw")])
def test_tiff_compression_is_lossless_and_as_configured(setting, tag):
    from PIL import Image

    img = (np.random.default_rng(1).integers(0, 65535, (40, 56, 3))).astype(np.uint16)
    data = imageio.encode(img, ".tif", tiff_compression=setting)
    assert np.array_equal(imageio.decode(data, 10**8).pixels, img)
    with Image.open(io.BytesIO(data)) as im:
        assert im.info["compression"] == tag


@pytest.mark.parametrize("code,pillow,kept", [(1, "raw", "none"), (5, "tiff_lzw", "lzw"),
                                              (8, "tiff_adobe_deflate", "deflate"), (32946, "tiff_deflate", "deflate"),
                                              (32773, "packbits", "lzw")])
def test_a_tiff_masters_compression_is_read_from_its_header(code, pillow, kept):
    from PIL import Image

    data = cv2.imencode(".tif", np.zeros((16, 24, 3), np.uint8), [cv2.IMWRITE_TIFF_COMPRESSION, code])[1].tobytes()
    with Image.open(io.BytesIO(data)) as im:
        assert im.info["compression"] == pillow  # the file has the codec asked for
    assert imageio.probe(data, 10**8).tiff_compression == kept
    assert imageio.decode(data, 10**8).tiff_compression == kept
    png = imageio.encode(np.zeros((16, 24, 3), np.uint8), ".png")
    assert imageio.decode(png, 10**8).tiff_compression is None


def test_png_level_is_lossless_and_trades_size():
    y, x = np.mgrid[0:200, 0:300]
    img = np.stack([x % 256, y % 256, (x * y) % 256], axis=2).astype(np.uint8)
    sizes = {}
    for level in (None, 0, 9):
        data = imageio.encode(img, ".png", png_level=level)
        assert np.array_equal(imageio.decode(data, 10**8).pixels, img)
        sizes[level] = len(data)
    assert sizes[0] > sizes[None] and sizes[0] > sizes[9]  # level 0 stores; the others compress


def test_a_jpeg_padded_with_zeros_is_whole_and_one_cut_short_is_not():
    from pipeline.imageio import _jpeg_truncated

    whole = b"\xff\xd8" + b"x" * 100 + b"\xff\xd9"
    assert not _jpeg_truncated(whole) and not _jpeg_truncated(memoryview(whole + b"\x00" * 200_000))
    assert _jpeg_truncated(whole[:-1] + b"\x00" * 70_000) and _jpeg_truncated(b"") and _jpeg_truncated(b"\x00" * 10)
