import itertools

import cv2
import numpy as np
import pytest
import torch

from pipeline import identity, weights
from pipeline.config import DetectConfig, QAConfig, RunConfig
from pipeline.faces import FaceDetector, align_matrix, warp_face

from conftest import IMAGES, need


@pytest.fixture(scope="module")
def aligned(weights_dir):
    """ArcFace-ready inputs for every photo in images/identity: (names, 512 crops in [0,1] RGB, matrices)."""
    cfg = RunConfig(weights_dir=str(weights_dir), allow_download=False,
                    detect=DetectConfig(model="retinaface_mobile0.25"),
                    qa=QAConfig(identity_backend="onnx"))
    det = FaceDetector(cfg.detect, weights.resolve(cfg.detect.model, cfg))
    names, crops, mats = [], [], []
    for p in sorted(need(IMAGES / "identity").glob("*.jpg")):
        img = cv2.imread(str(p))
        faces, _ = det.detect(img)
        f = faces[0]
        m = align_matrix(f.landmarks)
        crop = warp_face(img, m)
        names.append(p.stem)
        crops.append(torch.from_numpy(crop[:, :, ::-1].copy()).permute(2, 0, 1).float() / 255)
        mats.append(identity.arcface_matrix(np.c_[f.landmarks, np.ones(5)] @ m.T))
    scorer = identity.build_scorer(cfg.qa, weights.resolve(cfg.qa.onnx_model, cfg), torch.device("cpu"))
    return names, torch.stack(crops), np.stack(mats), scorer


def _person(name):
    return "brad" if "brad" in name.lower() else "nicole"


def test_align_112_puts_eyes_on_the_arcface_template(aligned):
    names, crops, mats, _ = aligned
    faces = identity.align_112(crops, torch.from_numpy(identity.arcface_theta(mats)))
    assert faces.shape == (len(names), 3, 112, 112)
    # the warp maps the 512 crop's landmarks onto the template: check with cv2 on one face
    m = mats[0]
    small = cv2.resize((crops[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8), (128, 128),
                       interpolation=cv2.INTER_AREA)
    ref = cv2.warpAffine(small, m, (112, 112), borderMode=cv2.BORDER_REPLICATE).astype(np.float32) / 255
    got = faces[0].permute(1, 2, 0).numpy()
    assert np.abs(got - ref)[8:-8, 8:-8].mean() < 0.02


def test_onnx_identity_separates_people(aligned):
    names, crops, mats, scorer = aligned
    emb = scorer.embed(identity.align_112(crops, torch.from_numpy(identity.arcface_theta(mats))))
    same, diff = [], []
    for i, j in itertools.combinations(range(len(names)), 2):
        s = identity.cosine(emb[i:i + 1], emb[j:j + 1]).item()
        (same if _person(names[i]) == _person(names[j]) else diff).append(s)
    assert min(same) > 0.5, same
    assert max(diff) < 0.3, diff
    assert min(same) - max(diff) > 0.3


def test_similarity_drops_when_the_face_is_replaced_by_another_persons(aligned):
    names, crops, mats, scorer = aligned
    i = next(k for k, n in enumerate(names) if _person(n) == "brad")
    j = next(k for k, n in enumerate(names) if _person(n) == "nicole")
    theta = torch.from_numpy(identity.arcface_theta(mats[[i, i]]))
    inp = identity.align_112(crops[[i, i]], theta)
    # "restorations": the same crop (a faithful restoration) and the other person's crop pasted in its place
    out = identity.align_112(torch.stack([crops[i], crops[j]]), theta)
    sim = identity.cosine(scorer.embed(inp), scorer.embed(out))
    assert sim[0] > 0.99
    assert sim[1] < 0.3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_arcface_ir_se50_in_channels_last_and_half_precision_matches_fp32(dtype):
    """The layouts and dtypes the GPU uses, checked on CPU: NHWC must not change what the network reads."""
    cfg = RunConfig(untrained=True, allow_download=False)
    w = weights.resolve(weights.identity_model(cfg.qa), cfg)
    ref = identity.build_scorer(cfg.qa, w, torch.device("cpu"))
    fast = identity.build_scorer(cfg.qa, w, torch.device("cpu"), dtype, channels_last=True)
    faces = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    a, b = ref.embed(faces), fast.embed(faces)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert identity.cosine(a, b).min().item() > (0.9999 if dtype == torch.float32 else 0.99)
