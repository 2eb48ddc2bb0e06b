"""output.jpeg_mode = blocks: a JPEG master's derivative keeps the master's quantised DCT coefficients in every
MCU that no pasted face touches (read back with jpeglib and compared block by block), decodes in OpenCV,
Pillow and jpeginfo, and masters that cannot keep their blocks fall back to a re-encode with a note."""

import io
import os
import shutil
import subprocess

import cv2
import jpeglib
import numpy as np
import pytest
from PIL import Image

from pipeline import jpegblocks, metadata
from pipeline.config import load_config
from pipeline.faces import align_matrix, paste_face, paste_mask
from pipeline.stages import Compose, DecodeDetect, Restore

from conftest import IMAGES, need, test_overrides


def _save(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", **kw)
    return b.getvalue()


def _dct(data: bytes, tmp_path, name: str):
    p = tmp_path / name
    p.write_bytes(data)
    m = jpeglib.read_dct(str(p))
    return m, [m.Y] + ([m.Cb, m.Cr] if m.Cb is not None else [])


def _changed_mcus(shape, faces, sampling) -> np.ndarray:
    """The MCUs a restored face's paste mask reaches, from the whole-image mask (the test's own reduction)."""
    mh, mw = 8 * max(v for v, _ in sampling), 8 * max(h for _, h in sampling)
    full = np.zeros(shape[:2], bool)
    for f in faces:
        if f["action"] == "restored":
            ys, xs, mask, _ = paste_mask(shape, align_matrix(np.asarray(f["landmarks"], np.float32).reshape(5, 2)))
            full[ys, xs] |= mask > 0
    gh, gw = -(-shape[0] // mh), -(-shape[1] // mw)
    padded = np.zeros((gh * mh, gw * mw), bool)
    padded[:shape[0], :shape[1]] = full
    return padded.reshape(gh, mh, gw, mw).any(axis=(1, 3))


def _component_mask(mcus: np.ndarray, v: int, h: int, shape) -> np.ndarray:
    return np.kron(mcus, np.ones((v, h), bool))[:shape[0], :shape[1]]


def _jpeginfo() -> str:
    exe = shutil.which("jpeginfo")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("jpeginfo is not installed (.ci/run installs Debian's jpeginfo)")
        pytest.skip("jpeginfo is not installed (apt-get install jpeginfo)")
    return exe


SUPPORTED = {"s420.jpg": dict(quality=90, subsampling=2), "s422.jpg": dict(quality=80, subsampling=1),
             "s444.jpg": dict(quality=95, subsampling=0), "grey.jpg": dict(quality=90)}


@pytest.fixture(scope="module")
def processed(weights_dir, tmp_path_factory):
    src = tmp_path_factory.mktemp("blocks")
    rgb = cv2.cvtColor(cv2.imread(str(need(IMAGES / "whole/gfpgan_Blake_Lively.jpg"))), cv2.COLOR_BGR2RGB)
    rgb = rgb[:rgb.shape[0] - 5, :rgb.shape[1] - 11]  # sides that are not whole MCUs
    im = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6
    variants = {name: _save(im.convert("L") if name == "grey.jpg" else im, **kw) for name, kw in SUPPORTED.items()}
    variants.update({
        "progressive.jpg": _save(im, quality=90, progressive=True),
        "cmyk.jpg": _save(im.convert("CMYK"), quality=90),
        "rotated.jpg": _save(Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1))), quality=90, exif=exif),
    })
    for name, data in variants.items():
        (src / name).write_bytes(data)
    cfg = load_config(None, test_overrides(weights_dir, tmp_path_factory.mktemp("out"),
                                           **{"output.jpeg_mode": "blocks"}), environ={})
    batch = {"image_id": np.array(list(variants), object), "uri": np.array([str(src / n) for n in variants], object)}
    rows = Compose(cfg, "r", "fp", True)(Restore(cfg)(DecodeDetect(cfg, root=str(src) + "/")(batch))).to_pylist()
    return {r["image_id"]: r for r in rows}, variants


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_blocks_outside_faces_are_the_masters(processed, name, tmp_path):
    rows, variants = processed
    r = rows[name]
    assert r["status"] == "ok", r["error"]
    assert "re-encoded" not in (r["notes"] or ""), r["notes"]
    faces = r["faces"]
    assert sum(f["action"] == "restored" for f in faces) == 2
    out = open(r["output_uri"], "rb").read()
    m, mc = _dct(variants[name], tmp_path, "m.jpg")
    d, dc = _dct(out, tmp_path, "d.jpg")
    assert np.array_equal(m.qt, d.qt) and np.array_equal(m.samp_factor, d.samp_factor)
    assert [c.shape for c in mc] == [c.shape for c in dc]
    sampling = [tuple(s) for s in m.samp_factor]
    mcus = _changed_mcus((m.height, m.width), faces, sampling)
    assert 0 < mcus.mean() < 0.8  # two large faces; the rest of the photograph is what is checked
    for a, b, (v, h) in zip(mc, dc, sampling):
        touched = _component_mask(mcus, v, h, a.shape)
        assert np.array_equal(a[~touched], b[~touched]), "a block outside the faces changed"
        assert not np.array_equal(a[touched], b[touched]), "the faces' blocks were not encoded again"
    # Pixels: the master's wherever no restored MCU is within one MCU (chroma is interpolated across MCU
    # borders when subsampled); exactly the master's outside the restored MCUs with full-resolution chroma.
    master_px = cv2.imdecode(np.frombuffer(variants[name], np.uint8), cv2.IMREAD_UNCHANGED)
    deriv_px = cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_UNCHANGED)
    mh, mw = 8 * max(v for v, _ in sampling), 8 * max(h for _, h in sampling)
    near = cv2.dilate(mcus.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0 if sampling[0] != (1, 1) else mcus
    far = ~np.kron(near, np.ones((mh, mw), bool))[:m.height, :m.width]
    assert np.array_equal(master_px[far], deriv_px[far])
    assert deriv_px.shape == master_px.shape
    # Decodes elsewhere, and carries the master's metadata and the AI-edit label as a re-encoded one does.
    with Image.open(io.BytesIO(out)) as im:
        im.load()
        assert im.size == (m.width, m.height)
    check = subprocess.run([_jpeginfo(), "-c", r["output_uri"]], capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.split()[-1] == "OK", check.stdout + check.stderr
    assert metadata.read(out)["xmp"]["Xmp.iptcExt.DigitalSourceType"] == metadata.AI_SOURCE_TYPE


@pytest.mark.parametrize("name,reason", [("progressive.jpg", "progressive JPEG master"),
                                         ("cmyk.jpg", "CMYK JPEG master"),
                                         ("rotated.jpg", "EXIF orientation 6")])
def test_masters_that_cannot_keep_their_blocks_are_reencoded_with_a_note(processed, name, reason):
    rows, _ = processed
    r = rows[name]
    assert r["status"] == "ok", r["error"]
    assert "jpeg_mode=blocks not possible" in r["notes"] and reason in r["notes"], r["notes"]
    assert cv2.imdecode(np.fromfile(r["output_uri"], np.uint8), cv2.IMREAD_COLOR) is not None


def _real_master(subsampling: int = 2) -> tuple[bytes, np.ndarray]:
    bgr = cv2.imread(str(need(IMAGES / "whole/facexlib_test.jpg")))
    data = _save(Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)), quality=85, subsampling=subsampling)
    return data, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def test_nothing_pasted_is_the_masters_data(tmp_path):
    data, px = _real_master()
    out, share = jpegblocks.splice(data, px, [])
    assert share == 0
    _, mc = _dct(data, tmp_path, "m.jpg")
    _, dc = _dct(out, tmp_path, "d.jpg")
    assert all(np.array_equal(a, b) for a, b in zip(mc, dc))
    assert np.array_equal(cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_COLOR), px)


def test_a_region_is_encoded_with_the_masters_tables(tmp_path):
    """The touched MCUs hold what libjpeg makes of the derivative's pixels with the master's tables: decoding
    them gives the pasted pixels back within JPEG's error, where a foreign table (or channels in the wrong
    order) would not."""
    data, px = _real_master(subsampling=0)
    pasted = px.copy()
    face = cv2.resize(px[40:240, 60:260], (512, 512))[:, ::-1]  # something else than what was there
    face[..., 2] = 230  # and red: a swap of red and blue would show
    affine = np.array([[1.0, 0, -100], [0, 1.0, -80]])  # the crop lands at (100, 80) in the photo
    changed = [paste_face(pasted, face, affine)]
    out, share = jpegblocks.splice(data, pasted, changed)
    assert 0 < share < 1
    back = cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_COLOR).astype(int)
    ys, xs, touched = changed[0]
    err = np.abs(back[ys, xs][touched] - pasted[ys, xs][touched].astype(int))
    assert err.mean() < 3 and np.abs(px[ys, xs][touched].astype(int) - pasted[ys, xs][touched]).mean() > 20


def test_frame_checks_say_why():
    data, px = _real_master()
    with pytest.raises(jpegblocks.Unsupported, match="not the master's stored size"):
        jpegblocks.check(data, (px.shape[1], px.shape[0], 3))
    with pytest.raises(jpegblocks.Unsupported, match="channels"):
        jpegblocks.check(data, px.shape[:2])
    with pytest.raises(jpegblocks.Unsupported, match="not a JPEG"):
        jpegblocks.check(cv2.imencode(".png", px)[1].tobytes(), px.shape)
    f = jpegblocks.check(data, px.shape)
    assert (f.height, f.width, f.precision, f.sampling) == (px.shape[0], px.shape[1], 8, ((2, 2), (1, 1), (1, 1)))


def _segments(data: bytes):
    i, out = 2, []
    while data[i + 1] != 0xDA:
        (length,) = __import__("struct").unpack(">H", data[i + 2:i + 4])
        out.append((data[i + 1], i, length))
        i += 2 + length
    return out


@pytest.mark.parametrize("where", ["no Adobe marker", "Adobe marker after the frame header"])
def test_an_rgb_coded_master_is_not_spliced(where):
    """An RGB-coded JPEG that the marker walk alone would take for YCbCr (component ids 'R','G','B' and no
    Adobe marker, or one placed after SOF): libjpeg reads it as RGB, so its blocks under a JFIF header
    would decode with every colour wrong. Found by review."""
    bgr = cv2.imread(str(need(IMAGES / "whole/facexlib_test.jpg")))
    data = _save(Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)), quality=90, keep_rgb=True, subsampling=0)
    adobe = next((m, i, n) for m, i, n in _segments(data) if m == 0xEE)
    segment = data[adobe[1]:adobe[1] + 2 + adobe[2]]
    data = data[:adobe[1]] + data[adobe[1] + 2 + adobe[2]:]
    if where != "no Adobe marker":
        sof = next((m, i, n) for m, i, n in _segments(data) if m == 0xC0)
        end = sof[1] + 2 + sof[2]
        data = data[:end] + segment + data[end:]
    px = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert np.abs(px.astype(int) - bgr.astype(int)).mean() < 3  # OpenCV reads it right: the master is fine
    with pytest.raises(jpegblocks.Unsupported, match="JCS_RGB"):
        jpegblocks.splice(data, px, [])


def _master_440(rgb: np.ndarray, tmp_path) -> bytes:
    """A 4:4:0 master (chroma halved vertically), which Pillow cannot write: jpeglib's encoder writes it."""
    s = jpeglib.from_spatial(np.ascontiguousarray(rgb), jpeglib.JCS_RGB)
    s.samp_factor = np.array([[2, 1], [1, 1], [1, 1]], np.int32)
    s.write_spatial(str(tmp_path / "m440.jpg"), qt=88)
    return (tmp_path / "m440.jpg").read_bytes()


@pytest.mark.parametrize("sampling", ["s420", "s422", "s444", "grey", "s440"])
def test_the_faces_blocks_are_encoded_as_jpeglibs_encoder_encodes_them(sampling, tmp_path, monkeypatch):
    """The faces' MCUs are encoded by Pillow where it writes the master's sampling: the coefficients are those
    jpeglib's encoder (the reference, and the way for the other samplings) makes of the same pixels with the
    master's tables, to the last one; on crops whose sides are not whole MCUs."""
    rgb = cv2.cvtColor(cv2.imread(str(need(IMAGES / "whole/gfpgan_Blake_Lively.jpg"))), cv2.COLOR_BGR2RGB)
    if sampling == "s440":
        data = _master_440(rgb, tmp_path)
    else:
        kw = {"s420": dict(quality=90, subsampling=2), "s422": dict(quality=80, subsampling=1),
              "s444": dict(quality=95, subsampling=0), "grey": dict(quality=90)}[sampling]
        data = _save(Image.fromarray(rgb).convert("L") if sampling == "grey" else Image.fromarray(rgb), **kw)
    f = jpegblocks.frame(data)
    (tmp_path / "m.jpg").write_bytes(data)
    m = jpeglib.read_dct(str(tmp_path / "m.jpg"))
    crop = cv2.resize(cv2.imread(str(need(IMAGES / "whole/codeformer_00.jpg"))), (333, 219))  # other pixels
    if f.sampling == ((1, 1),):
        crop = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    coefficients, by_pillow = {}, []
    spy = lambda *a, f=Image.frombuffer: by_pillow.append(1) or f(*a)  # noqa: E731
    monkeypatch.setattr(jpegblocks.Image, "frombuffer", spy)
    for pillow in (True, False):
        path = str(tmp_path / f"crop-{pillow}.jpg")
        jpegblocks._encode_crop(jpegblocks._jpeglib(), m, f, crop, path, pillow=pillow)
        c = jpeglib.read_dct(path)
        coefficients[pillow] = [c.Y] + ([c.Cb, c.Cr] if c.Cb is not None else [])
    assert len(by_pillow) == (0 if sampling == "s440" else 1)  # Pillow wrote the first, where it can
    assert len(coefficients[True]) == len(f.sampling)
    for a, b in zip(coefficients[True], coefficients[False]):
        assert a.shape == b.shape and np.array_equal(a, b), sampling


def test_a_440_master_keeps_its_blocks_through_jpeglibs_encoder(tmp_path):
    rgb = cv2.cvtColor(cv2.imread(str(need(IMAGES / "whole/facexlib_test.jpg"))), cv2.COLOR_BGR2RGB)
    data = _master_440(rgb, tmp_path)
    assert jpegblocks.frame(data).sampling == ((2, 1), (1, 1), (1, 1))
    px = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    pasted = px.copy()
    face = cv2.resize(px[40:240, 60:260], (512, 512))[:, ::-1].copy()
    face[..., 2] = 230
    changed = [paste_face(pasted, face, np.array([[1.0, 0, -100], [0, 1.0, -80]]))]
    out, share = jpegblocks.splice(data, pasted, changed)
    assert 0 < share < 1
    _, mc = _dct(data, tmp_path, "m.jpg")
    _, dc = _dct(out, tmp_path, "d.jpg")
    touched = jpegblocks._touched_mcus(changed, (-(-mc[0].shape[0] // 2), mc[0].shape[1]), (16, 8))
    blocks = np.repeat(touched, 2, 0)[:mc[0].shape[0]]
    assert np.array_equal(mc[0][~blocks], dc[0][~blocks]) and not np.array_equal(mc[0][blocks], dc[0][blocks])
    back = cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_COLOR).astype(int)
    ys, xs, inside = changed[0]
    assert np.abs(back[ys, xs][inside] - pasted[ys, xs][inside]).mean() < 3


def _with_table_layout(data: bytes, dqt_ids: dict[int, int], selectors: list[int]) -> bytes:
    """``data`` with its DQT table ids renamed and its frame components pointed at ``selectors``."""
    b, i = bytearray(data), 2
    while i + 4 <= len(b):
        marker, length = b[i + 1], int.from_bytes(b[i + 2:i + 4], "big")
        if marker == 0xDB:
            j = i + 4
            while j < i + 2 + length:
                pq, tq = b[j] >> 4, b[j] & 0x0F
                b[j] = (pq << 4) | dqt_ids.get(tq, tq)
                j += 1 + 64 * (pq + 1)
        elif marker in (0xC0, 0xC1):
            for k, t in enumerate(selectors):
                b[i + 4 + 6 + 3 * k + 2] = t
        elif marker == 0xDA:
            break
        i += 2 + length
    return bytes(b)


@pytest.mark.parametrize("layout", ["standard", "luma_on_1", "gapped", "crossed"])
def test_every_component_keeps_its_own_table_or_the_master_is_reencoded(layout, tmp_path):
    """Masters whose components use tables in other slots than 0, 1, 1: the derivative gives each component
    the master's table (checked on the file's own markers, and by decoding), or splice refuses it
    (Unsupported: Compose re-encodes with a note). jpeglib wrote gapped slots (0, 2, 2) and crossed chroma
    tables (0, 2, 1) back wrongly, shifting colours by up to 22 levels inside faces and 11 outside."""
    rgb = cv2.cvtColor(cv2.imread(str(need(IMAGES / "whole/facexlib_test.jpg"))), cv2.COLOR_BGR2RGB)
    rng = np.random.default_rng(5)
    tables = [list(rng.integers(2, 12, 64)), list(rng.integers(12, 24, 64)), list(rng.integers(24, 40, 64))]
    three = _save(Image.fromarray(rgb), qtables=tables, subsampling=0)  # components on tables 0, 1, 2
    two = _save(Image.fromarray(rgb), qtables=tables[:2], subsampling=0)  # 0, 1, 1
    data = {"standard": two, "luma_on_1": _with_table_layout(two, {0: 1, 1: 0}, [1, 0, 0]),
            "gapped": _with_table_layout(two, {1: 2}, [0, 2, 2]),
            "crossed": _with_table_layout(three, {}, [0, 2, 1])}[layout]
    px = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert px is not None and jpegblocks._component_tables(data)[1] != jpegblocks._component_tables(data)[0]
    pasted = px.copy()
    face = cv2.resize(px[40:240, 60:260], (512, 512))[:, ::-1].copy()
    face[..., 2] = 230
    changed = [paste_face(pasted, face, np.array([[1.0, 0, -100], [0, 1.0, -80]]))]
    for regions, target in (([], px), (changed, pasted)):
        try:
            out, _ = jpegblocks.splice(data, target, regions)
        except jpegblocks.Unsupported as e:
            assert layout in ("gapped", "crossed") and "quantisation tables" in str(e), (layout, e)
            continue
        assert jpegblocks._component_tables(out) == jpegblocks._component_tables(data)
        back = cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_COLOR)
        touched = np.zeros(px.shape[:2], bool)
        for ys, xs, inside in regions:
            t = touched[ys, xs]
            t[inside] = True
        mcu = jpegblocks._touched_mcus(regions, (-(-px.shape[0] // 8), -(-px.shape[1] // 8)), (8, 8))
        far = ~np.repeat(np.repeat(mcu, 8, 0), 8, 1)[:px.shape[0], :px.shape[1]]
        assert np.array_equal(back[far], px[far]), layout  # 4:4:4: outside the faces' MCUs, the master's pixels
        if regions:
            assert np.abs(back[touched].astype(int) - pasted[touched]).mean() < 3, layout
    if layout in ("standard", "luma_on_1"):  # these are spliced, not refused
        assert jpegblocks.splice(data, pasted, changed)[1] > 0


def test_an_encoder_that_fails_leaves_a_reencode_and_a_pillow_without_turbo_is_not_used(monkeypatch):
    data, px = _real_master()
    pasted = px.copy()
    changed = [paste_face(pasted, cv2.resize(px[40:240, 60:260], (512, 512)), np.array([[1.0, 0, -100],
                                                                                         [0, 1.0, -80]]))]

    def broken(*a, **k):
        raise OSError("encoder exploded")

    monkeypatch.setattr(jpegblocks.Image, "frombuffer", broken)
    with pytest.raises(jpegblocks.Unsupported, match="could not be encoded.*encoder exploded"):
        jpegblocks.splice(data, pasted, changed)
    # Pillow on IJG's libjpeg: jpeglib's encoder, whose coefficients are the reference
    monkeypatch.setattr(jpegblocks, "_pillow_on_turbo", lambda: False)
    out, share = jpegblocks.splice(data, pasted, changed)
    assert share > 0 and cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_COLOR) is not None


def _with_16_bit_tables(data: bytes) -> bytes:
    """``data`` with every quantisation table stored with 16-bit values (Pq = 1), the same values."""
    out, i = bytearray(data[:2]), 2
    while True:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:
            return bytes(out) + data[i:]
        body = data[i + 4:i + 2 + length]
        if marker == 0xDB:
            wide, j = bytearray(), 0
            while j < len(body):
                wide += bytes([0x10 | (body[j] & 0x0F)]) + b"".join(v.to_bytes(2, "big") for v in body[j + 1:j + 65])
                j += 65
            body = bytes(wide)
        out += bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body
        i += 2 + length


def test_tables_stored_16_bits_wide_with_8_bit_values_are_the_same_tables(tmp_path):
    """libjpeg writes such tables back 8 bits wide: the same values, so the derivative keeps its blocks."""
    data, px = _real_master()
    wide = _with_16_bit_tables(data)
    assert len(wide) > len(data) and np.array_equal(cv2.imdecode(np.frombuffer(wide, np.uint8), cv2.IMREAD_COLOR), px)
    assert jpegblocks._component_tables(wide) == jpegblocks._component_tables(data)
    pasted = px.copy()
    changed = [paste_face(pasted, cv2.resize(px[40:240, 60:260], (512, 512)), np.array([[1.0, 0, -100],
                                                                                         [0, 1.0, -80]]))]
    out, share = jpegblocks.splice(wide, pasted, changed)
    assert share > 0 and jpegblocks._component_tables(out) == jpegblocks._component_tables(wide)


@pytest.mark.parametrize("cut", [20, 60, 158, 163])
def test_marker_segments_that_cannot_be_walked_say_so(cut):
    data, _ = _real_master()
    with pytest.raises(jpegblocks.Unsupported):
        jpegblocks._component_tables(data[:cut] + b"\x00" * 8 + data[cut:])
