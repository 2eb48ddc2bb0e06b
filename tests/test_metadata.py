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
        return m.get_bytes()


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
