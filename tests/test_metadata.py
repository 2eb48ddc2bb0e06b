"""metadata.carry: the master's EXIF, IPTC, XMP and ICC profile carried into the derivative, the orientation
reset and the restoration labelled, in one exiv2 session per derivative; a master whose metadata exiv2
rejects still gets a labelled derivative, with a note."""

import io
import struct

import cv2
import numpy as np
import pyexiv2
import pytest
from PIL import Image, ImageCms

from pipeline import imageio, metadata

from conftest import IMAGES, need

ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _master(fmt: str) -> bytes:
    im = Image.open(need(IMAGES / "whole/facexlib_test.jpg")).convert("RGB")
    exif = Image.Exif()
    exif[0x010F] = "Hasselblad"
    exif[0x0112] = 6
    b = io.BytesIO()
    im.save(b, fmt, exif=exif, icc_profile=ICC)
    with pyexiv2.ImageData(b.getvalue()) as m:
        m.modify_iptc({"Iptc.Application2.Caption": "Wedding, 1952"})
        m.modify_xmp({"Xmp.dc.creator": ["Studio Weiss"]})
        if fmt == "JPEG":
            m.modify_comment("Scanned by the archive, box 12")
        return m.get_bytes()


def _comment(data: bytes) -> str:
    with pyexiv2.ImageData(data) as m:
        return m.read_comment()


def _reference(master: bytes, derivative: bytes, fmt: str, restored: bool, software: str) -> bytes:
    """The carry as it was done before (a session for the copy, another for each label), step by step."""
    with pyexiv2.ImageData(master) as src, pyexiv2.ImageData(derivative) as dst:
        src.copy_to_another_image(dst, exif=True, iptc=True, xmp=True, comment=fmt == "JPEG",
                                  icc=bool(src.read_icc()), thumbnail=False)
        derivative = dst.get_bytes()
    with pyexiv2.ImageData(derivative) as dst:
        dst.modify_exif({"Exif.Image.Orientation": "1"})
        if restored:
            dst.modify_xmp({"Xmp.iptcExt.DigitalSourceType": metadata.AI_SOURCE_TYPE, "Xmp.xmp.CreatorTool": software})
            dst.modify_exif({"Exif.Image.Software": software})
        return dst.get_bytes()


@pytest.mark.parametrize("fmt,ext", [("JPEG", ".jpg"), ("TIFF", ".tif"), ("PNG", ".png")])
@pytest.mark.parametrize("restored", [True, False])
def test_carried_metadata_is_the_step_by_step_carry(fmt, ext, restored):
    master = _master(fmt)
    px = imageio.decode(master, 10**8).pixels
    derivative = imageio.encode(px, ext)
    ours, note = metadata.carry(master, derivative, fmt, restored=restored, software="archive-restore t; m")
    assert note is None
    md, ref = metadata.read(ours), metadata.read(_reference(master, derivative, fmt, restored, "archive-restore t; m"))
    assert md == ref
    assert md["exif"]["Exif.Image.Make"] == "Hasselblad" and md["exif"]["Exif.Image.Orientation"] == "1"
    assert md["iptc"]["Iptc.Application2.Caption"] == "Wedding, 1952" and md["icc"] == ICC
    assert (md["xmp"].get("Xmp.iptcExt.DigitalSourceType") == metadata.AI_SOURCE_TYPE) is restored
    assert ("Exif.Image.Software" in md["exif"]) is restored
    assert np.array_equal(imageio.decode(ours, 10**8).pixels, imageio.decode(derivative, 10**8).pixels)
    if fmt == "JPEG":  # a JPEG comment is carried too (metadata.read does not show it)
        assert _comment(ours) == "Scanned by the archive, box 12"


def test_without_the_icc_profile_the_rest_is_carried():
    master = _master("JPEG")
    derivative = imageio.encode(imageio.decode(master, 10**8).pixels, ".jpg")
    md = metadata.read(metadata.carry(master, derivative, "JPEG", restored=True, software="s", copy_icc=False)[0])
    assert not md["icc"] and md["exif"]["Exif.Image.Make"] == "Hasselblad"
    assert md["iptc"]["Iptc.Application2.Caption"] == "Wedding, 1952"


def test_a_label_that_cannot_be_written_fails_the_derivative_instead_of_dropping_the_masters_metadata(monkeypatch):
    master = _master("TIFF")
    derivative = imageio.encode(imageio.decode(master, 10**8).pixels, ".tif")

    calls, real = [], metadata._label

    def broken(*a):  # fails where the master's metadata was copied (the first call), would work on a bare file
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("exiv2 cannot write the label")
        return real(*a)

    monkeypatch.setattr(metadata, "_label", broken)
    with pytest.raises(RuntimeError, match="cannot write the label"):
        metadata.carry(master, derivative, "TIFF", restored=True, software="s")


def test_a_master_whose_metadata_exiv2_rejects_gets_a_labelled_derivative_and_a_note():
    jpg = cv2.imencode(".jpg", np.full((32, 48, 3), 128, np.uint8))[1].tobytes()
    payload = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta><rdf:RDF><broken"
    master = jpg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpg[2:]
    out, note = metadata.carry(master, jpg, "JPEG", restored=True, software="archive-restore t; m")
    assert note and note.startswith("metadata not carried")
    md = metadata.read(out)
    assert md["xmp"]["Xmp.iptcExt.DigitalSourceType"] == metadata.AI_SOURCE_TYPE
    assert md["exif"]["Exif.Image.Orientation"] == "1" and md["exif"]["Exif.Image.Software"] == "archive-restore t; m"
    assert imageio.decode(out, 10**8).pixels.shape == (32, 48, 3)
