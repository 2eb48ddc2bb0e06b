import cv2
import numpy as np
import pytest
import torch

from pipeline import imageio, weights
from pipeline.config import DetectConfig, RunConfig
from pipeline.faces import FFHQ_TEMPLATE_512, FaceDetector, align_matrix, paste_face, warp_face

from conftest import IMAGES, need

# Faces per image found by the official facexlib code path (mobile0.25, threshold 0.97, native size),
# from ../shared/models/README.md.
EXPECTED = {"whole/codeformer_00.jpg": 4, "whole/codeformer_01.jpg": 4, "whole/codeformer_02.png": 4,
            "whole/codeformer_03.jpg": 1, "whole/codeformer_04.jpg": 1, "whole/codeformer_05.jpg": 1,
            "whole/codeformer_06.png": 2, "whole/facexlib_test.jpg": 1, "whole/facexlib_test2.jpg": 1,
            "whole/gfpgan_00.jpg": 2, "whole/gfpgan_10045.png": 3, "whole/gfpgan_Blake_Lively.jpg": 2,
            "old/old_a.png": 1, "old/old_b.png": 1, "old/old_c.png": 1, "old/old_d.png": 0}


@pytest.fixture(scope="module")
def detector(weights_dir):
    def make(**kw):
        cfg = RunConfig(weights_dir=str(weights_dir), allow_download=False,
                        detect=DetectConfig(model="retinaface_mobile0.25", **kw))
        return FaceDetector(cfg.detect, weights.resolve(cfg.detect.model, cfg))
    return make


def _load(rel):
    return imageio.to_bgr8(imageio.decode(need(IMAGES / rel).read_bytes(), 10**9).pixels)


@pytest.mark.parametrize("long_side", [None, 1600])
def test_detects_the_faces_a_person_sees(detector, long_side):
    det = detector(long_side=long_side)
    for rel, n in EXPECTED.items():
        img = _load(rel)
        faces, _ = det.detect(img)
        assert len(faces) == n, rel
        for f in faces:
            x1, y1, x2, y2 = f.bbox
            lm = f.landmarks
            assert f.score >= 0.97
            assert (lm[:, 0] > x1 - 5).all() and (lm[:, 0] < x2 + 5).all(), rel
            assert (lm[:, 1] > y1 - 5).all() and (lm[:, 1] < y2 + 5).all(), rel
            eyes_y, mouth_y = lm[:2, 1].mean(), lm[3:, 1].mean()
            assert eyes_y < lm[2, 1] < mouth_y, f"{rel}: eyes, nose, mouth out of order"


def test_crowd_is_capped_and_small_faces_counted(detector):
    img = _load("whole/crowd_sample.jpg")
    faces, _ = detector(max_faces=10).detect(img)
    assert len(faces) == 10
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    big, too_small = detector(min_eye_dist=12).detect(img)
    assert too_small > 0 and all(f.eye_dist >= 12 for f in big)


def test_alignment_puts_landmarks_on_the_ffhq_template(detector):
    img = _load("whole/facexlib_test.jpg")
    (face,), _ = detector().detect(img)
    m = align_matrix(face.landmarks)
    mapped = np.c_[face.landmarks, np.ones(5)] @ m.T
    err = np.linalg.norm(mapped - FFHQ_TEMPLATE_512, axis=1)
    # LMEDS (as facexlib) fits the robust majority: eyes and mouth corners land on the template; the
    # nose of a turned head may be left as an outlier.
    assert err[[0, 1, 3, 4]].max() < 4 and err[2] < 25
    crop = warp_face(img, m)
    assert crop.shape == (512, 512, 3) and crop.dtype == np.uint8


def _round_trip(master, bgr, faces):
    """Paste each face's own crop back (an identity "restoration"); return the result and changed pixels."""
    out = master.copy()
    changed = np.zeros(master.shape[:2], bool)
    footprints = np.zeros(master.shape[:2], bool)
    for f in faces:
        m = align_matrix(f.landmarks)
        ys, xs, touched = paste_face(out, warp_face(bgr, m), m)
        changed[ys, xs] |= touched
        footprints |= cv2.warpAffine(np.ones((512, 512), np.float32), cv2.invertAffineTransform(m),
                                     master.shape[1::-1]) > 0
    footprints = cv2.dilate(footprints.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert not (changed & ~footprints).any(), "paste touched pixels outside the crop's footprint"
    return out, changed


@pytest.mark.parametrize("rel", ["whole/gfpgan_Blake_Lively.jpg", "old/old_b.png", "whole/codeformer_02.png"])
def test_paste_back_of_an_identity_restoration_returns_the_input(detector, rel):
    master = imageio.decode(need(IMAGES / rel).read_bytes(), 10**9).pixels
    bgr = imageio.to_bgr8(master)
    faces, _ = detector().detect(bgr)
    assert faces
    out, touched = _round_trip(master, bgr, faces)
    assert np.array_equal(out[~touched], master[~touched]), "pixels outside the face masks changed"
    interior = cv2.erode(touched.astype(np.uint8), np.ones((25, 25), np.uint8)).astype(bool)
    diff = np.abs(out[..., :3].astype(int) - master[..., :3].astype(int))[interior]
    assert diff.mean() < 3.0 and np.percentile(diff, 99) < 30
    if master.ndim == 3 and master.shape[2] == 4:
        assert np.array_equal(out[..., 3], master[..., 3]), "alpha must be untouched"


def test_paste_keeps_grey_and_16_bit_masters(detector):
    bgr = _load("whole/gfpgan_Blake_Lively.jpg")
    faces, _ = detector().detect(bgr)
    grey16 = (cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257)
    out, touched = _round_trip(grey16, bgr, faces)
    assert out.dtype == np.uint16 and out.ndim == 2
    assert np.array_equal(out[~touched], grey16[~touched])
    interior = cv2.erode(touched.astype(np.uint8), np.ones((25, 25), np.uint8)).astype(bool)
    assert np.abs(out.astype(int) - grey16.astype(int))[interior].mean() < 3 * 257


@pytest.mark.parametrize("name", ["mobile0.25", "resnet50"])
def test_cached_prior_boxes_equal_facexlibs(name):
    from facexlib.detection.retinaface import generate_config
    from facexlib.detection.retinaface_utils import PriorBox

    from pipeline.faces import prior_boxes

    cfg = generate_config(name)
    for h, w in [(500, 375), (1600, 1067), (1067, 1600), (1201, 799), (7, 9), (33, 1)]:
        assert torch.equal(prior_boxes(cfg, h, w), PriorBox(cfg, image_size=(h, w)).forward()), (h, w)


def _shared_photos():
    """Every photo of ../shared/images whole/, old/, gray/ and identity/ as 8-bit BGR (halved when over 1,600
    px, as a detection copy would be), with its path."""
    paths = sorted(p for sub in ("whole", "old", "gray", "identity") for p in (IMAGES / sub).glob("*.*")
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    assert len(paths) >= 20
    for p in paths:
        bgr = imageio.to_bgr8(imageio.decode(p.read_bytes(), 10**9).pixels)
        if max(bgr.shape[:2]) > 1600:
            bgr = cv2.resize(bgr, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
        yield p, bgr


def test_our_detection_equals_facexlibs_detect_faces(detector):
    """The wrapper (cached priors, our post-processing) gives facexlib's ``detect_faces`` on the same network
    to the bit, on every photo."""
    detector = detector()
    found = 0
    for p, bgr in _shared_photos():
        ours = detector._detect_faces(bgr)
        with torch.inference_mode():
            theirs = detector.net.detect_faces(bgr, conf_threshold=detector.cfg.threshold,
                                               nms_threshold=detector.cfg.nms_threshold)
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), p.name
        found += len(ours)
    assert found >= 30  # real faces were compared, not empty arrays


def _official_retinaface(weights_dir):
    """facexlib's RetinaFace with the real weights, as the official code builds it (batch norms unfolded)."""
    from facexlib.detection.retinaface import RetinaFace

    net = RetinaFace(network_name="mobile0.25", half=False, device=torch.device("cpu"))
    sd = torch.load(need(weights_dir / "detection_mobilenet0.25_Final.pth"), map_location="cpu", weights_only=True)
    net.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()}, strict=True)
    return net.eval()


def test_folded_detector_finds_what_the_official_network_finds(detector, weights_dir):
    """Batch norms folded into the convs and channels_last change only float rounding: on every photo the same
    faces, boxes and landmarks within 1e-3 px (measured: 1.8e-4), scores within 1e-5 (measured: 1.2e-7)."""
    ours_det, official = detector(), _official_retinaface(weights_dir)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ours_det.net.modules())
    found = 0
    for p, bgr in _shared_photos():
        ours = ours_det._detect_faces(bgr)
        with torch.inference_mode():
            theirs = official.detect_faces(bgr, conf_threshold=ours_det.cfg.threshold,
                                           nms_threshold=ours_det.cfg.nms_threshold)
        assert ours.shape == theirs.shape, p.name
        np.testing.assert_allclose(ours[:, :4], theirs[:, :4], rtol=0, atol=1e-3, err_msg=p.name)
        np.testing.assert_allclose(ours[:, 5:], theirs[:, 5:], rtol=0, atol=1e-3, err_msg=p.name)
        np.testing.assert_allclose(ours[:, 4], theirs[:, 4], rtol=0, atol=1e-5, err_msg=p.name)
        found += len(ours)
    assert found >= 30


@pytest.mark.parametrize("name", ["mobile0.25", "resnet50"])
def test_folding_batch_norms_keeps_the_networks_outputs(name):
    """Both architectures, random weights and batch-norm statistics (so a fold that dropped the BN's shift or
    scale would show), on an odd-sized input."""
    import copy

    from facexlib.detection.retinaface import RetinaFace

    from pipeline.faces import fold_batch_norms

    torch.manual_seed(0)
    net = RetinaFace(network_name=name, half=False, device=torch.device("cpu"))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.5, 0.5)
    net.eval()
    folded = fold_batch_norms(copy.deepcopy(net)).to(memory_format=torch.channels_last)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert n_bn > 20 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(1, 3, 97, 131) * 50
    with torch.inference_mode():
        for a, b in zip(net(x), folded(x.contiguous(memory_format=torch.channels_last))):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)  # a lost shift or scale: >> 1e-2



def _paste_reference(master, face_bgr, affine, luminance_only=False):
    """paste_face's blend as the plain expression, in float64 and in one piece (no bands, no OpenCV)."""
    from pipeline.faces import _luminance_only, _warped_face, paste_mask

    ys, xs, mask, roi_inv = paste_mask(master.shape, affine)
    face = _warped_face(face_bgr, master, roi_inv, mask.shape[::-1]).astype(np.float32)
    region = master[ys, xs]
    colour = region if region.ndim == 2 else region[:, :, :3]
    m = mask if colour.ndim == 2 else mask[:, :, None]
    hi = 65535 if master.dtype == np.uint16 else 255
    if luminance_only and colour.ndim == 3:
        face = _luminance_only(face, colour, float(hi))
    c, face = colour.astype(np.float64), face.astype(np.float64)
    out = np.clip(np.rint(c + m * (face - c)), 0, hi).astype(master.dtype)
    touched = m > 0
    if colour.ndim == 2:
        region[touched] = out[touched]
    else:
        sel = np.broadcast_to(touched, colour.shape)
        colour[sel] = out[sel]


@pytest.mark.parametrize("layout", ["bgr", "bgra", "grey", "bgr16", "luminance"])
def test_paste_in_place_is_the_plain_blend(layout):
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, (900, 1200, 3), dtype=np.uint8)
    master = {"bgr": base, "luminance": base, "bgra": np.dstack([base, base[:, :, 0]]),
              "grey": base[:, :, 0].copy(), "bgr16": base.astype(np.uint16) * 257 + 3}[layout]
    face = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    for angle, scale, at in [(0.0, 0.7, (600, 450)), (0.4, 0.25, (300, 200)), (-0.2, 1.3, (1150, 880))]:
        a = np.array([[scale * np.cos(angle), -scale * np.sin(angle), 0], [scale * np.sin(angle), scale * np.cos(angle), 0]])
        a[:, 2] = [256, 256] - a[:, :2] @ np.asarray(at, np.float64)
        ours, ref = master.copy(), master.copy()
        paste_face(ours, face, a, luminance_only=layout == "luminance")
        _paste_reference(ref, face, a, luminance_only=layout == "luminance")
        diff = np.abs(ours.astype(np.int64) - ref)
        # float32 rounding: one level where the exact value is near a tie (8 bits: a few pixels in 100,000;
        # 16 bits, whose levels float32 resolves to ~1/256: a few in 10,000)
        share = 1e-3 if layout == "bgr16" else 1e-4
        assert diff.max() <= 1 and (diff > 0).mean() < share, (layout, angle, diff.max(), (diff > 0).mean())
        assert not np.array_equal(ours, master)  # something was pasted
        if layout == "bgra":
            assert np.array_equal(ours[..., 3], master[..., 3])


def _float_erode(mask, k):
    return cv2.erode(mask, np.ones((k, k), np.uint8))


def test_the_wide_erosion_at_the_windows_corners_is_opencvs_erosion():
    from pipeline.faces import _erode_wide

    # footprints whole and cut off by the region's edges (OpenCV clips the window there), even and odd squares
    for scale, angle, at in [(0.2, 0.3, (900, 800)), (0.3, 0.0, (900, 800)), (0.45, -0.5, (900, 800)),
                             (1.3, 0.2, (900, 800)), (0.225, 0.0, (900, 800)), (2.5, 0.05, (900, 800)),
                             (0.4, 0.7, (60, 1580))]:
        a = np.array([[scale * np.cos(angle), -scale * np.sin(angle), 0], [scale * np.sin(angle), scale * np.cos(angle), 0]])
        a[:, 2] = [256, 256] - a[:, :2] @ np.asarray(at, np.float64)
        inv = cv2.invertAffineTransform(a)
        mask = cv2.erode(cv2.warpAffine(np.ones((512, 512), np.float32), inv, (1800, 1600)), np.ones((2, 2), np.uint8))
        for k in (2, 3, 17, 64, 204, 227):
            exact, ours = _float_erode(mask, k), _erode_wide(mask, k)
            assert ours.dtype == np.float32 and ours.shape == exact.shape
            assert np.array_equal(ours, exact), (scale, angle, at, k)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_a_wide_feather_blurred_at_reduced_resolution_stays_close_to_facexlibs_mask(monkeypatch, dtype):
    import pipeline.faces as faces

    rng = np.random.default_rng(3)
    hi = np.iinfo(dtype).max
    master = rng.integers(0, hi + 1, (2600, 2600, 3)).astype(dtype)
    face = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    # faces 1,100-2,600 px (feathers 40-90 px), centred and cut off by the image's edges and corners
    for scale, angle, at in [(0.2, 0.3, (1300, 1300)), (0.3, 0.0, (1300, 1300)), (0.45, -0.5, (1300, 1300)),
                             (0.45, 0.3, (100, 120)), (0.3, -0.4, (2550, 1300)), (0.2, 0.2, (2590, 2590))]:
        a = np.array([[scale * np.cos(angle), -scale * np.sin(angle), 0], [scale * np.sin(angle), scale * np.cos(angle), 0]])
        a[:, 2] = [256, 256] - a[:, :2] @ np.asarray(at, np.float64)
        ours = master.copy()
        _, _, mask, _ = faces.paste_mask(master.shape, a)
        paste_face(ours, face, a)
        monkeypatch.setattr(faces, "_FEATHER_STEP", 10**9)  # facexlib's full-resolution blur
        monkeypatch.setattr(faces, "_erode_wide", _float_erode)  # and OpenCV's erosion
        _, _, full, _ = faces.paste_mask(master.shape, a)
        ref = master.copy()
        paste_face(ref, face, a)
        monkeypatch.undo()
        assert full.shape == mask.shape and mask.max() > 0.99
        assert np.abs(full - mask).max() < 0.003, (scale, angle, at)
        # pasted values differ by at most 0.3% of full scale: one level in 8 bits
        assert np.abs(ours.astype(np.int64) - ref).max() <= (1 if dtype == np.uint8 else 0.003 * hi + 1)


def _facexlib_mask(shape, affine):
    """facexlib's paste mask (FaceRestoreHelper.paste_faces_to_input_image), over the whole image."""
    h, w = shape[:2]
    m = cv2.warpAffine(np.ones((512, 512), np.float32), cv2.invertAffineTransform(affine), (w, h))
    m = cv2.erode(m, np.ones((2, 2), np.uint8))
    w_edge = int(float(m.sum()) ** 0.5) // 20
    m = cv2.erode(m, np.ones((2 * w_edge, 2 * w_edge), np.uint8))
    return cv2.GaussianBlur(m, (2 * w_edge + 1, 2 * w_edge + 1), 0)


def test_the_paste_region_holds_the_whole_footprint_of_an_enlarged_face():
    """A face enlarged more than 2x square to the image's axes: its footprint's bilinear rim (one crop pixel,
    several image pixels) lies beyond the crop's corners. Cut off by the region, the erosions saw no zeros
    there and the mask came out up to 0.5 wider than facexlib's along two sides."""
    from pipeline.faces import paste_mask

    shape = (2600, 2600)
    for scale, angle, at in [(0.225, 0.0, (1300, 1300)), (0.225, 0.004, (1300, 1300)), (0.3, np.pi / 2, (1250, 1350)),
                             (0.3, 0.0, (150, 1300)), (0.6, 0.0, (1300, 1300))]:
        a = np.array([[scale * np.cos(angle), -scale * np.sin(angle), 0], [scale * np.sin(angle), scale * np.cos(angle), 0]])
        a[:, 2] = [256, 256] - a[:, :2] @ np.asarray(at, np.float64)
        ys, xs, mask, _ = paste_mask(shape, a)
        ours = np.zeros(shape, np.float32)
        ours[ys, xs] = mask
        ref = _facexlib_mask(shape, a)
        # the reduced-resolution feather (< 0.002) and the 8-bit erosion (1/510, blurred); the old region: 0.5
        assert np.abs(ours - ref).max() < 0.0035, (scale, angle, at)
