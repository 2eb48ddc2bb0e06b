"""Archive formats and variants, generated here from a real photograph, through the three stages (no Ray):
the right status, the same faces as the 8-bit original, and a derivative that keeps the master's depth,
channels, monochrome and alpha, with untouched pixels bit-identical outside the faces (lossless formats)."""

import io
import json

import cv2
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline import imageio
from pipeline.config import load_config
from pipeline.stages import Compose, DecodeDetect, Restore

from conftest import IMAGES, need, test_overrides


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def _variants(rgb: np.ndarray) -> dict[str, tuple[str, bytes]]:
    im = Image.fromarray(rgb)
    grey = np.asarray(im.convert("L"))
    bgr16 = rgb[:, :, ::-1].astype(np.uint16) * 257
    rotated = Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1)))  # stored sideways, EXIF says turn it
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "progressive.jpg": _save(im, "JPEG", quality=95, progressive=True),
        "cmyk.jpg": _save(im.convert("CMYK"), "JPEG", quality=95),
        "exif_rotated.jpg": _save(rotated, "JPEG", quality=95, exif=exif),
        "palette.png": _save(im.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "grey.png": _save(im.convert("L"), "PNG"),
        "grey_alpha.png": _save(im.convert("LA"), "PNG"),
        "rgba.png": _save(im.convert("RGBA"), "PNG"),
        "grey16.png": cv2.imencode(".png", grey.astype(np.uint16) * 257)[1].tobytes(),
        "rgb16.tif": cv2.imencode(".tif", bgr16)[1].tobytes(),
        "grey16.tif": cv2.imencode(".tif", grey.astype(np.uint16) * 257)[1].tobytes(),
        "lzw.tif": _save(im, "TIFF", compression="tiff_lzw"),
        "deflate.tif": _save(im, "TIFF", compression="tiff_adobe_deflate"),
        "packbits.tif": _save(im, "TIFF", compression="packbits"),
        "cmyk.tif": _save(im.convert("CMYK"), "TIFF"),
        "multipage.tif": _save(im, "TIFF", save_all=True, append_images=[im.convert("L")] * 2),
        "lossless.webp": _save(im, "WEBP", lossless=True),
        "photo.bmp": _save(im, "BMP"),
    }


LOSSLESS = {"palette.png", "grey.png", "grey_alpha.png", "rgba.png", "grey16.png", "rgb16.tif", "grey16.tif", "lzw.tif",
            "deflate.tif", "packbits.tif", "multipage.tif", "lossless.webp", "photo.bmp"}


@pytest.fixture(scope="module")
def processed(weights_dir, tmp_path_factory):
    src = tmp_path_factory.mktemp("formats")
    rgb = cv2.cvtColor(cv2.imread(str(need(IMAGES / "whole/gfpgan_Blake_Lively.jpg"))), cv2.COLOR_BGR2RGB)
    variants = _variants(rgb)
    for name, data in variants.items():
        (src / name).write_bytes(data)
    cfg = load_config(None, test_overrides(weights_dir, tmp_path_factory.mktemp("out")), environ={})
    batch = {"image_id": np.array(list(variants), object), "uri": np.array([str(src / n) for n in variants], object)}
    detected = DecodeDetect(cfg, root=str(src) + "/")(batch)
    restored = Restore(cfg)(detected)
    rows = Compose(cfg, "r", "fp", True)(restored).to_pylist()
    return {r["image_id"]: r for r in rows}, variants


def test_every_variant_is_restored_with_the_originals_faces(processed):
    rows, variants = processed
    for name in variants:
        r = rows[name]
        assert r["status"] == "ok", (name, r["error"])
        assert r["n_faces"] == 2, name  # the 8-bit original has two faces
    assert "3 pages" in rows["multipage.tif"]["notes"]
    assert "CMYK" in rows["cmyk.tif"]["notes"] and "CMYK" in rows["cmyk.jpg"]["notes"]


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_derivative_keeps_the_masters_properties(processed, name):
    rows, variants = processed
    r = rows[name]
    master = imageio.decode(variants[name], 10**9)
    out = imageio.decode(open(r["output_uri"], "rb").read(), 10**9)
    assert r["output_uri"].endswith(name)
    assert out.pixels.dtype == master.pixels.dtype and out.pixels.shape == master.pixels.shape, name
    if master.grey:
        assert out.grey, f"{name}: a monochrome master must not get colour"
    if master.channels == 4:
        assert np.array_equal(out.pixels[..., 3], master.pixels[..., 3]), f"{name}: alpha changed"
    changed = out.pixels != master.pixels
    changed = changed if changed.ndim == 2 else changed.any(axis=2)
    assert changed.any(), f"{name}: no face was pasted"
    for f in r["faces"]:  # every changed pixel lies near a detected face
        x1, y1, x2, y2 = f["bbox"]
        w, h = x2 - x1, y2 - y1
        changed[int(max(0, y1 - h)):int(y2 + h), int(max(0, x1 - w)):int(x2 + w)] = False
    assert not changed.any(), f"{name}: pixels far from the faces changed"


def _tiff_compression(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as im:
        return im.info["compression"]


def test_a_tiff_derivative_is_compressed_as_its_master(processed):
    """output.tiff_compression=master (the default): uncompressed, LZW and Deflate masters keep their codec;
    another (PackBits) becomes LZW."""
    rows, variants = processed
    tiffs = sorted(n for n in variants if n.endswith(".tif"))
    masters = {n: _tiff_compression(variants[n]) for n in tiffs}
    assert {"raw", "tiff_lzw", "tiff_adobe_deflate", "packbits"} <= set(masters.values()), masters
    for name in tiffs:
        out = _tiff_compression(open(rows[name]["output_uri"], "rb").read())
        assert out == (masters[name] if masters[name] != "packbits" else "tiff_lzw"), (name, masters[name], out)


def test_exif_orientation_is_normalised(processed):
    rows, variants = processed
    r = rows["exif_rotated.jpg"]
    up = imageio.decode(variants["progressive.jpg"], 10**9)
    assert (r["width"], r["height"]) == (up.width, up.height)
    out = imageio.decode(open(r["output_uri"], "rb").read(), 10**9)
    assert out.orientation == 1 and (out.width, out.height) == (up.width, up.height)


@pytest.mark.parametrize("rel,mono", [("gray/Einstein01.png", True), ("cropped/Julia_Roberts_crop.png", True),
                                      ("whole/gfpgan_00.jpg", False), ("cropped/Adele_crop.png", False),
                                      ("identity/brad_1.jpg", False), ("old/old_a.png", False)])
def test_monochrome_detection_on_real_photos(rel, mono):
    # Julia_Roberts_crop is a black-and-white photo stored as RGB (its chroma is exactly neutral)
    assert imageio.decode(need(IMAGES / rel).read_bytes(), 10**9).grey is mono


def test_tinted_monochrome_keeps_its_tone_and_gets_no_colour(weights_dir, tmp_path):
    bgr = cv2.imread(str(need(IMAGES / "old/old_b.png")))
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    sepia = np.clip(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR).astype(np.float32) * np.array([0.8, 0.95, 1.1]),
                    0, 255).astype(np.uint8)
    assert imageio.decode(cv2.imencode(".png", sepia)[1].tobytes(), 10**9).grey, "sepia is found monochrome"
    assert not imageio.decode(cv2.imencode(".png", bgr)[1].tobytes(), 10**9).grey, "a faded colour photo is colour"
    (tmp_path / "s.png").write_bytes(cv2.imencode(".png", sepia)[1].tobytes())
    chroma = {}
    for policy in ("auto", "keep"):
        cfg = load_config(None, test_overrides(weights_dir, tmp_path / policy, **{"output.colour_policy": policy}),
                          environ={})
        batch = {"image_id": np.array(["s"], object), "uri": np.array([str(tmp_path / "s.png")], object)}
        row = Compose(cfg, "r", "f", True)(Restore(cfg)(DecodeDetect(cfg, root=str(tmp_path) + "/")(batch)))
        out = cv2.imread(row.to_pylist()[0]["output_uri"])
        changed = (out != sepia).any(axis=2)
        assert changed.sum() > 1000
        diff = cv2.cvtColor(out, cv2.COLOR_BGR2YCrCb).astype(int) - cv2.cvtColor(sepia, cv2.COLOR_BGR2YCrCb).astype(int)
        chroma[policy] = np.abs(diff[changed][:, 1:]).mean()
        luma = np.abs(diff[changed][:, 0]).mean()
        assert luma > 1, "the face was restored"
    assert chroma["auto"] < 1.5, "auto: the master's tone is kept inside the face"
    assert chroma["keep"] > 3 * chroma["auto"], "keep: the restored colour is pasted as is"


def test_metadata_is_carried_and_restorations_are_labelled(weights_dir, tmp_path):
    import pyexiv2
    from PIL import ImageCms

    from pipeline import metadata

    im = Image.open(need(IMAGES / "whole/gfpgan_Blake_Lively.jpg")).convert("RGB")
    exif = Image.Exif()
    exif[0x010F] = "Hasselblad"
    exif[0x0112] = 1
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for name, fmt in (("m.jpg", "JPEG"), ("m.tif", "TIFF")):
        b = io.BytesIO()
        im.save(b, fmt, exif=exif, icc_profile=icc)
        with pyexiv2.ImageData(b.getvalue()) as m:
            m.modify_iptc({"Iptc.Application2.Caption": "Wedding, 1952"})
            m.modify_xmp({"Xmp.dc.creator": ["Studio Weiss"]})
            (tmp_path / name).write_bytes(m.get_bytes())
    for policy in ("flag", "keep_original"):
        cfg = load_config(None, test_overrides(weights_dir, tmp_path / policy), environ={})
        batch = {"image_id": np.array(["j", "t"], object),
                 "uri": np.array([str(tmp_path / "m.jpg"), str(tmp_path / "m.tif")], object)}
        restored = Restore(cfg)(DecodeDetect(cfg, root=str(tmp_path) + "/")(batch)).to_pylist()
        if policy == "keep_original":  # QA kept every original face: nothing changed, nothing labelled
            for r in restored:
                faces = json.loads(r["faces_json"])
                for f in faces["faces"]:
                    f["action"] = "kept_original"
                r["faces_json"] = json.dumps(faces)
        rows = Compose(cfg, "r", "f", True, software="archive-restore test; GFPGAN-tiny")(
            pa.Table.from_pylist(restored)).to_pylist()
        for r in rows:
            md = metadata.read(open(r["output_uri"], "rb").read())
            assert md["exif"]["Exif.Image.Make"] == "Hasselblad" and md["exif"]["Exif.Image.Orientation"] == "1"
            assert md["iptc"]["Iptc.Application2.Caption"] == "Wedding, 1952"
            assert md["xmp"]["Xmp.dc.creator"] == ["Studio Weiss"]
            assert md["icc"] == icc
            labelled = md["xmp"].get("Xmp.iptcExt.DigitalSourceType") == metadata.AI_SOURCE_TYPE
            assert labelled is (policy == "flag"), (policy, r["uri"])
            if labelled:
                assert "GFPGAN-tiny" in md["exif"]["Exif.Image.Software"]


def test_fixed_output_format_and_access_copy(weights_dir, tmp_path):
    from pipeline import metadata

    bgr = cv2.imread(str(need(IMAGES / "whole/gfpgan_Blake_Lively.jpg")))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "scan.jpg").write_bytes(cv2.imencode(".jpg", bgr)[1].tobytes())
    cfg = load_config(None, test_overrides(weights_dir, tmp_path / "out", **{
        "output.format": "tiff", "output.access_copy": True, "output.access_long_side": 300,
        "output.access_quality": 70}), environ={})
    batch = {"image_id": np.array(["s"], object), "uri": np.array([str(tmp_path / "in" / "scan.jpg")], object)}
    row = Compose(cfg, "r", "f", True)(Restore(cfg)(DecodeDetect(cfg, root=str(tmp_path / "in") + "/")(batch)))
    r = row.to_pylist()[0]
    assert r["output_uri"].endswith("/images/scan.tif")
    assert imageio.decode(open(r["output_uri"], "rb").read(), 10**9).format == "TIFF"
    assert _tiff_compression(open(r["output_uri"], "rb").read()) == "tiff_lzw"  # a JPEG master: lzw
    assert r["access_uri"].endswith("/access/scan.jpg")
    access = open(r["access_uri"], "rb").read()
    a = imageio.decode(access, 10**9)
    assert a.format == "JPEG" and max(a.width, a.height) == 300
    assert metadata.read(access)["xmp"]["Xmp.iptcExt.DigitalSourceType"] == metadata.AI_SOURCE_TYPE


def test_a_set_tiff_compression_applies_to_every_tiff_derivative(weights_dir, tmp_path):
    rgb = cv2.cvtColor(cv2.imread(str(need(IMAGES / "whole/gfpgan_Blake_Lively.jpg"))), cv2.COLOR_BGR2RGB)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "raw.tif").write_bytes(_save(Image.fromarray(rgb), "TIFF"))
    cfg = load_config(None, test_overrides(weights_dir, tmp_path / "out", **{"output.tiff_compression": "deflate"}),
                      environ={})
    batch = {"image_id": np.array(["r"], object), "uri": np.array([str(tmp_path / "in" / "raw.tif")], object)}
    detected = DecodeDetect(cfg, root=str(tmp_path / "in") + "/")(batch)
    r = Compose(cfg, "r", "f", True)(Restore(cfg)(detected)).to_pylist()[0]
    assert r["status"] == "ok", r["error"]
    assert _tiff_compression(open(r["output_uri"], "rb").read()) == "tiff_adobe_deflate"
