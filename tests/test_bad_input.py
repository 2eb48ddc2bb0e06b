"""A corpus of broken and awkward inputs, generated here, through the whole job on a local Ray: the job
completes, every row has the expected status and a message a person can act on, nothing else is lost."""

import io
import struct
import zlib

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from PIL import Image

from pipeline import job, resume
from pipeline.config import StorageConfig, load_config

from conftest import IMAGES, need, test_overrides

pytestmark = pytest.mark.slow


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _corpus(d):
    good = need(IMAGES / "whole/facexlib_test.jpg").read_bytes()
    png = cv2.imencode(".png", cv2.imread(str(IMAGES / "whole/facexlib_test.jpg")))[1].tobytes()
    bad_crc = bytearray(png)
    idat = png.index(b"IDAT")
    bad_crc[idat + 200] ^= 0xFF  # corrupt compressed data: the chunk's CRC no longer matches
    frame = Image.open(io.BytesIO(good)).convert("P")
    gif = io.BytesIO()
    frame.save(gif, "GIF", save_all=True, append_images=[frame.rotate(5)])
    files = {
        "zero.jpg": (b"", "decode_error", "empty file"),
        "truncated.jpg": (good[: len(good) // 2], "decode_error", "truncated JPEG"),
        "notes.png": (b"meeting notes, not a photo\n" * 20, "decode_error", "not a recognised image"),
        "bad_crc.png": (bytes(bad_crc), "decode_error", "corrupt"),
        "bomb.png": (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
                     + _png_chunk(b"IEND", b""), "too_large", "60000x60000"),
        "animated.gif": (gif.getvalue(), "decode_error", "GIF"),
        "one_pixel.png": (cv2.imencode(".png", np.zeros((1, 1, 3), np.uint8))[1].tobytes(), "no_face", None),
        "Ölgemälde von Anna/Foto 1.JPG": (good, "ok", None),
        "UPPER.JPEG": (good, "ok", None),
    }
    for name, (data, _, _) in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    files["gone.jpg"] = (None, "read_error", "not found")
    return files


def test_bad_inputs_are_recorded_and_lose_nothing(ray_local, weights_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    files = _corpus(src)
    uris = [str(src / n) for n in files] + [str(src / "UPPER.JPEG")]  # a duplicate manifest row
    m = tmp_path / "m.csv"
    pacsv.write_csv(pa.table({"uri": uris}), m)
    out = tmp_path / "out"
    record = job.run(load_config(None, test_overrides(weights_dir, out, m), environ={}))
    assert record["state"] == "finished" and record["duplicate_rows"] == 1
    rows = {r["uri"][len(str(src)) + 1:]: r for r in resume.load_results(str(out), StorageConfig()).to_pylist()}
    assert len(rows) == len(files)
    for name, (_, status, words) in files.items():
        r = rows[name]
        assert r["status"] == status, (name, r["status"], r["error"])
        if words:
            assert words in r["error"], (name, r["error"])
        if status == "ok":
            assert r["n_faces"] == 1 and (out / "images" / name).is_file()
    assert (out / "images" / "Ölgemälde von Anna" / "Foto 1.JPG").is_file()
