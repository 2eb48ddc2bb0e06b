"""output.device=gpu: derivatives made on the restoring device (devicepaste.py), run here on CPU (the same
code; the tests' logical GPU has no CUDA), against the CPU's paste-back and Compose they replace."""

import json
import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import devicepaste, imageio
from pipeline.config import load_config
from pipeline.faces import paste_face, paste_mask
from pipeline.stages import Compose, DecodeDetect, Restore

from conftest import IMAGES, jpeg_of, need, test_overrides


def _affine(scale, angle, at):
    a = np.array([[scale * np.cos(angle), -scale * np.sin(angle), 0], [scale * np.sin(angle), scale * np.cos(angle), 0]])
    a[:, 2] = [256, 256] - a[:, :2] @ np.asarray(at, np.float64)
    return a


def _facexlib_mask(shape, affine):
    """facexlib's paste mask (FaceRestoreHelper.paste_faces_to_input_image), over the whole image."""
    h, w = shape[:2]
    m = cv2.warpAffine(np.ones((512, 512), np.float32), cv2.invertAffineTransform(affine), (w, h))
    m = cv2.erode(m, np.ones((2, 2), np.uint8))
    w_edge = int(float(m.sum()) ** 0.5) // 20
    if w_edge == 0:
        return m
    m = cv2.erode(m, np.ones((2 * w_edge, 2 * w_edge), np.uint8))
    return cv2.GaussianBlur(m, (2 * w_edge + 1, 2 * w_edge + 1), 0)


# faces from 1,400 px wide (square to the axes, turned, cut off by an edge and a corner) down to a few pixels
# (feathers of 0-3 px, where OpenCV's Gaussian kernels are tabulated)
CASES = [(0.3, 0.0, (900, 800)), (0.35, 0.3, (900, 800)), (0.45, -0.5, (60, 900)), (0.4, 0.2, (1590, 1190)),
         (1.3, 0.1, (700, 500)), (6.0, 0.2, (300, 300)), (12.0, 0.0, (1000, 400)), (40.0, 0.5, (500, 500))]


@pytest.mark.parametrize("scale,angle,at", CASES)
def test_the_devices_mask_is_facexlibs(scale, angle, at):
    shape = (1200, 1600)
    a = _affine(scale, angle, at)
    ys, xs, _, roi_inv = paste_mask(shape, a)
    ours = np.zeros(shape, np.float32)
    ours[ys, xs] = devicepaste.paste_mask(roi_inv, (xs.stop - xs.start, ys.stop - ys.start), torch.device("cpu")).numpy()
    ref = _facexlib_mask(shape, a)
    assert ref.max() > 0.5
    # float32 coordinates, summed and rounded in another order: ~1e-3 where a tiny face's rim is steep
    assert np.abs(ours - ref).max() < 2e-3, (scale, angle, at)


@pytest.mark.parametrize("scale,angle,at", CASES)
def test_the_devices_paste_is_the_cpus_within_a_level(scale, angle, at):
    rng = np.random.default_rng(5)
    master = rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8)
    face = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    a = _affine(scale, angle, at)
    ref = master.copy()
    paste_face(ref, face, a)
    t = torch.from_numpy(master.copy()).permute(2, 0, 1)
    devicepaste.paste_face(t, torch.from_numpy(face).permute(2, 0, 1), a)
    ours = t.permute(1, 2, 0).numpy()
    diff = np.abs(ours.astype(int) - ref)
    assert not np.array_equal(ours, master)
    # the warp's rounding (OpenCV's fixed point against float bilinear) and the CPU's reduced-resolution feather
    assert diff.max() <= 2 and (diff > 1).mean() < 1e-4 and (diff > 0).mean() < 0.03, (diff.max(), (diff > 0).mean())
    ys, xs, mask, _ = paste_mask(master.shape, a)
    outside = np.ones(master.shape[:2], bool)
    outside[ys, xs] = mask == 0
    assert np.array_equal(ours[outside], master[outside])  # nothing outside the CPU's mask moves


# ---- the stages -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    src = tmp_path_factory.mktemp("in")
    shutil.copy(need(IMAGES / "whole/gfpgan_Blake_Lively.jpg"), src / "blake.jpg")
    bgr = imageio.to_bgr8(imageio.decode((IMAGES / "whole/codeformer_00.jpg").read_bytes(), 10**9).pixels)
    (src / "rotated.jpg").write_bytes(jpeg_of(np.ascontiguousarray(np.rot90(bgr, -1)), orientation=8))
    (src / "grey.jpg").write_bytes(jpeg_of(bgr, grey=True))  # a grey JPEG: Compose's
    toned = imageio.to_bgr8(imageio.decode(need(IMAGES / "gray/Hepburn01.png").read_bytes(), 10**9).pixels)
    (src / "toned.jpg").write_bytes(jpeg_of(toned))  # an RGB JPEG of a monochrome print: Compose's (luminance)
    shutil.copy(need(IMAGES / "whole/codeformer_02.png"), src / "four faces.png")  # detected on CPU
    names = ["blake.jpg", "rotated.jpg", "grey.jpg", "toned.jpg", "four faces.png"]
    return src, {"image_id": np.array([f"id{i}" for i in range(len(names))], object),
                 "uri": np.array([str(src / n) for n in names], object)}


def _run(weights_dir, out, src, batch, **settings):
    cfg = load_config(None, test_overrides(weights_dir, out, **{"detect.device": "gpu", **settings}), environ={})
    work = Restore(cfg)(DecodeDetect(cfg, root=str(src) + "/")(dict(batch)))
    rows = Compose(cfg, run_id="r1", fingerprint="fp", untrained=True)(work).to_pylist()
    return work.to_pylist(), rows


def _pixels(uri):
    return imageio.decode(open(uri, "rb").read(), 10**9)


def test_derivatives_made_on_the_device_are_the_cpus(weights_dir, sources, tmp_path):
    src, batch = sources
    extra = {"output.access_copy": True, "output.access_long_side": 640}
    work_cpu, cpu = _run(weights_dir, tmp_path / "cpu", src, batch, **extra)
    work, dev = _run(weights_dir, tmp_path / "gpu", src, batch, **{"output.device": "gpu", **extra})
    # made on the device: the colour JPEGs; the grey and toned ones (luminance only) and the PNG by Compose
    assert [r["_made"] is not None for r in work] == [True, True, False, False, False]
    assert all(r["_made"] is None for r in work_cpu)
    assert [r["status"] for r in dev] == [r["status"] for r in cpu] == ["ok"] * 5
    for c, d in zip(cpu, dev):
        a, b = _pixels(c["output_uri"]), _pixels(d["output_uri"])
        assert a.pixels.shape == b.pixels.shape and b.orientation == 1  # upright, written without a rotation
        diff = np.abs(a.pixels.astype(int) - b.pixels)
        assert diff.mean() < 0.5 and np.percentile(diff, 99.9) <= 6, (c["uri"], diff.mean())
        # the master's metadata carried and the edit said, as on the CPU
        made_on, by_compose = Image.open(d["output_uri"]), Image.open(c["output_uri"])
        assert made_on.info.get("icc_profile") == by_compose.info.get("icc_profile")
        assert made_on.getexif().get(0x0131) and made_on.getexif().get(0x0131) == by_compose.getexif().get(0x0131)
        ac, ad = _pixels(c["access_uri"]), _pixels(d["access_uri"])
        assert ac.pixels.shape == ad.pixels.shape and max(ad.pixels.shape[:2]) <= 640
        assert np.abs(ac.pixels.astype(int) - ad.pixels).mean() < 1.0
        for fc, fd in zip(c["faces"], d["faces"]):
            assert fd["review_before"] and fd["review_after"]
            for k in ("review_before", "review_after"):
                pc, pd = _pixels(fc[k]), _pixels(fd[k])
                assert pc.pixels.shape == pd.pixels.shape
                assert np.abs(pc.pixels.astype(int) - pd.pixels).mean() < 2.0  # the CPU's preview samples
    # a face a curator rejected, or QA kept original, is not pasted on the device either
    blake = json.loads(work[0]["faces_json"])["faces"]
    assert all(f["action"] == "restored" for f in blake)


def test_a_derivative_the_device_cannot_make_is_composeds(weights_dir, sources, tmp_path, monkeypatch):
    src, batch = sources
    batch = {k: v[:2] for k, v in batch.items()}  # the two colour JPEGs the device makes otherwise
    # blocks mode and other output formats are the CPU's
    for settings in ({"output.jpeg_mode": "blocks"}, {"output.format": "png"}, {"output.colour_policy": "force_grey"}):
        work, rows = _run(weights_dir, tmp_path / next(iter(settings.values())), src, batch,
                          **{"output.device": "gpu", **settings})
        assert all(r["_made"] is None for r in work), settings
        assert [r["status"] for r in rows] == ["ok"] * 2
    # a failure on the device: Compose makes it, from the restored faces, as without output.device

    def broken(*a, **k):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(devicepaste, "make_derivative", broken)
    work, rows = _run(weights_dir, tmp_path / "failed", src, batch, **{"output.device": "gpu"})
    assert all(r["_made"] is None for r in work)
    assert [r["status"] for r in rows] == ["ok"] * 2 and all(r["out_sha256"] for r in rows)


def _face_records(shape, at_list, scale=1.5):
    out = []
    for at in at_list:
        a = _affine(scale, 0.1, at)
        x, y = at
        out.append({"bbox": [x - 100, y - 100, x + 100, y + 100], "affine": a.ravel().tolist(), "action": "restored"})
    return out


def test_only_faces_whose_action_is_restored_are_pasted():
    rng = np.random.default_rng(2)
    master = rng.integers(0, 256, (900, 1400, 3), dtype=np.uint8)
    faces = _face_records(master.shape, [(250, 300), (700, 450), (1150, 600)])
    faces[1]["action"], faces[2]["action"] = "kept_original", "reverted"
    restored = rng.integers(0, 256, (3, 512, 512, 3), dtype=np.uint8)
    t = torch.from_numpy(master.copy()).permute(2, 0, 1)
    made = devicepaste.make_derivative(t, faces, restored, 95, None, (128, 90))
    ours = t.permute(1, 2, 0).numpy()
    changed = (ours != master).any(2)
    assert changed[:, :480].any() and not changed[:, 480:].any()  # the first face only
    # the "before" crops are the master's, the "after" ones the derivative's: the pasted face's differ
    before, after = (_pixels_of(b) for b in made.review[0])
    assert np.abs(before.astype(int) - after).mean() > 10
    for b, a in made.review[1:]:
        assert np.abs(_pixels_of(b).astype(int) - _pixels_of(a)).mean() < 1.0


def _pixels_of(jpeg: bytes) -> np.ndarray:
    return imageio.decode(jpeg, 10**9).pixels


@pytest.mark.parametrize("shape,ksize", [((40, 30), 13), ((301, 203), 31), ((29, 700), 57), ((160, 1400), 141)])
def test_the_feather_is_opencvs_gaussian_blur(shape, ksize):
    """The FFT's correlation (5-smooth lengths, valid part, REFLECT_101 borders) against OpenCV."""
    m = np.random.default_rng(ksize).random(shape).astype(np.float32)
    ours = devicepaste._blur(torch.from_numpy(m), ksize).numpy()
    assert np.abs(ours - cv2.GaussianBlur(m, (ksize, ksize), 0)).max() < 2e-6


def test_a_region_narrower_than_its_feather_is_composes():
    # OpenCV reflects a border again past a mirrored copy; torch's reflect pad refuses: such a sliver of a huge
    # face (a region of a few pixels, a feather wider) goes to Compose
    assert devicepaste._blur(torch.ones(40, 30), 13).shape == (40, 30)
    with pytest.raises(devicepaste.Unsupported):
        devicepaste._blur(torch.ones(4000, 5), 13)


def test_a_broken_jpeg_from_the_encoder_is_refused(monkeypatch):
    real = devicepaste.encode_jpeg
    monkeypatch.setattr(devicepaste, "encode_jpeg", lambda imgs, quality: [e[: len(e) // 2] for e in real(imgs, quality=quality)])
    master = torch.zeros((3, 200, 300), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="broken"):
        devicepaste.make_derivative(master, [], np.zeros((0, 512, 512, 3), np.uint8), 90, None, None)


def test_a_monochrome_test_near_its_bound_is_left_to_the_host(monkeypatch):
    master = torch.zeros((3, 100, 100), dtype=torch.uint8)
    for spread, expect in ((0.8, True), (4.0, False)):
        monkeypatch.setattr(imageio, "chroma_spread", lambda s, v=spread: v)
        assert devicepaste.is_grey(master) is expect
    monkeypatch.setattr(imageio, "chroma_spread", lambda s: imageio.GREY_SPREAD + 0.2)
    with pytest.raises(devicepaste.Unsupported):
        devicepaste.is_grey(master)


def test_kept_masters_are_bounded_and_given_back(weights_dir, sources, tmp_path, monkeypatch):
    from pipeline import stages

    src, batch = sources
    cfg = load_config(None, test_overrides(weights_dir, tmp_path, **{"detect.device": "gpu", "output.device": "gpu",
                                                                     "review.crops": False,
                                                                     "output.access_copy": True}), environ={})
    stage = Restore(cfg)
    work = DecodeDetect(cfg, root=str(src) + "/")(dict(batch))
    rows = stage(work).to_pylist()
    # access copy without review crops: both as asked
    assert rows[0]["_made"] and rows[0]["_made_access"] and rows[0]["_made_review"] is None
    assert stage._kept_pixels == 0
    blake = Image.open(src / "blake.jpg").size
    monkeypatch.setattr(stages, "KEEP_PIXELS", blake[0] * blake[1])  # room for the first master only
    rows = stage(work).to_pylist()
    assert [r["_made"] is not None for r in rows] == [True, False, False, False, False]
    assert stage._kept_pixels == 0
    out = Compose(cfg, run_id="r1", fingerprint="fp", untrained=True)(stage(work)).to_pylist()
    assert [r["status"] for r in out] == ["ok"] * 5 and all(r["access_uri"] for r in out)
    # only the masters kept hold their share once their faces are found, and a call that fails gives it back
    monkeypatch.setattr(stages, "KEEP_PIXELS", 10**9)
    held = {}
    table, _, kept = stage._detect_deferred(work.select(stage.schema.names).cast(stage.schema), held)
    # the colour JPEGs with faces (the toned print's monochrome test comes after restoring), not the grey one
    assert set(held) == set(kept) == {0, 1, 3} and stage._kept_pixels == sum(held.values()) > 0
    stage._release(held, list(held))
    assert stage._kept_pixels == 0 and not held

    def fails(*a, **k):
        raise RuntimeError("the device thread died")

    monkeypatch.setattr(stage, "_call", fails)
    with pytest.raises(RuntimeError, match="died"):
        stage(work)
    assert stage._kept_pixels == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_paste_and_the_encoder_are_the_cpus_within_rounding():
    """The FFT blur, grid_sample and nvJPEG's encoder on a real GPU: the mask within 2e-3 of facexlib's, the
    paste within 2 levels of the CPU's, and the JPEG whole, at its size, close to libjpeg's (nvJPEG writes
    4:4:4 chroma through torchvision: README)."""
    shape = (1200, 1600)
    rng = np.random.default_rng(5)
    master = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    face = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    for _ in range(2):  # the second time through: nothing left over from the first (streams, buffers)
        for scale, angle, at in CASES:
            a = _affine(scale, angle, at)
            ys, xs, _, roi_inv = paste_mask(shape, a)
            size = (xs.stop - xs.start, ys.stop - ys.start)
            m = np.zeros(shape, np.float32)
            m[ys, xs] = devicepaste.paste_mask(roi_inv, size, torch.device("cuda")).cpu().numpy()
            assert np.abs(m - _facexlib_mask(shape, a)).max() < 2e-3, (scale, angle, at)
            # the same code on the CPU: no TF32 (~5e-4) or other shortcut of the GPU's
            assert np.abs(m[ys, xs] - devicepaste.paste_mask(roi_inv, size, torch.device("cpu")).numpy()).max() < 1e-4
            ref = master.copy()
            paste_face(ref, face, a)
            t = torch.from_numpy(master.copy()).permute(2, 0, 1).cuda()
            devicepaste.paste_face(t, torch.from_numpy(face).permute(2, 0, 1).cuda(), a)
            diff = np.abs(t.permute(1, 2, 0).cpu().numpy().astype(int) - ref)
            assert diff.max() <= 2 and (diff > 1).mean() < 1e-4, (scale, angle, at)
        photo = cv2.resize(imageio.to_bgr8(imageio.decode(need(IMAGES / "whole/gfpgan_00.jpg").read_bytes(),
                                                          10**9).pixels), (1297, 1920))
        t = torch.from_numpy(photo).permute(2, 0, 1).contiguous().cuda()
        smooth = cv2.resize(photo[300:1100, 200:1000], (512, 512), interpolation=cv2.INTER_AREA)
        made = devicepaste.make_derivative(t, _face_records(photo.shape, [(600, 700)]), smooth[None], 95, (640, 85),
                                           (256, 88))
        ours = _pixels_of(made.derivative)
        expected = t.permute(1, 2, 0).cpu().numpy()
        assert ours.shape == expected.shape and np.abs(ours.astype(int) - expected).mean() < 3  # q95 (libjpeg 4:2:0: 2.3)
        assert max(_pixels_of(made.access).shape[:2]) == 640 and len(made.review) == 1
