"""The GPU side of Restore, on CPU: precision, micro-batching, the fp32 fallback guard, extreme inputs."""

import numpy as np
import pytest
import torch

from pipeline import restorer
from pipeline.config import load_config

from conftest import test_overrides


def _cfg(weights_dir, tmp_path, **kw):
    return load_config(None, test_overrides(weights_dir, tmp_path, **kw), environ={})


def _faces(n, seed=0):
    rng = np.random.default_rng(seed)
    crops = rng.integers(0, 256, (n, 512, 512, 3), dtype=np.uint8)
    mats = np.tile(np.array([[0.25, 0, -8], [0, 0.25, -8]], np.float32), (n, 1, 1))
    return crops, mats


@pytest.fixture(scope="module")
def fr(weights_dir, tmp_path_factory):
    return restorer.FaceRestorer(_cfg(weights_dir, tmp_path_factory.mktemp("o"), **{"restore.micro_batch": 3}))


def test_extreme_inputs_give_finite_outputs(fr):
    black, white = np.zeros((1, 512, 512, 3), np.uint8), np.full((1, 512, 512, 3), 255, np.uint8)
    noise = np.where(np.random.default_rng(1).random((1, 512, 512, 3)) > 0.5, 255, 0).astype(np.uint8)
    crops = np.concatenate([black, white, noise])
    out = fr.restore(crops, _faces(3)[1])
    assert out.faces.shape == (3, 512, 512, 3) and out.faces.dtype == np.uint8
    assert np.isfinite(out.similarity).all() and not out.fp32_fallback.any()


def test_any_number_of_faces_and_micro_batch_independence(fr, weights_dir, tmp_path):
    empty = fr.restore(*_faces(0))
    assert empty.faces.shape == (0, 512, 512, 3) and empty.similarity.shape == (0,)
    crops, mats = _faces(7)
    split = fr.restore(crops, mats)  # micro-batches of 3, 3, 1
    whole = restorer.FaceRestorer(_cfg(weights_dir, tmp_path, **{"restore.micro_batch": 16})).restore(crops, mats)
    assert np.abs(split.faces.astype(int) - whole.faces.astype(int)).max() <= 1
    assert np.allclose(split.similarity, whole.similarity, atol=1e-4)


def test_half_precision_outputs_out_of_range_are_recomputed_in_fp32(weights_dir, tmp_path, monkeypatch):
    crops, mats = _faces(4, seed=3)
    ref = restorer.FaceRestorer(_cfg(weights_dir, tmp_path)).restore(crops, mats)
    bf16 = restorer.FaceRestorer(_cfg(weights_dir, tmp_path, **{"restore.precision": "bf16"}))
    plain = bf16.restore(crops, mats)
    assert not plain.fp32_fallback.any()
    assert np.abs(plain.faces.astype(int) - ref.faces.astype(int)).mean() < 3  # bf16 is close to fp32
    monkeypatch.setattr(restorer, "_MAX_ABS_VALID", 0.0)  # every half-precision output now "out of range"
    guarded = bf16.restore(crops, mats)
    assert guarded.fp32_fallback.all()
    assert np.abs(guarded.faces.astype(int) - ref.faces.astype(int)).max() <= 1


def test_fp16_on_cpu_is_refused(weights_dir, tmp_path):
    with pytest.raises(ValueError, match="needs CUDA"):
        restorer.FaceRestorer(_cfg(weights_dir, tmp_path, **{"restore.precision": "fp16"}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_restorer_on_cuda_matches_fp32_and_stays_finite(weights_dir, tmp_path):
    crops, mats = _faces(37, seed=5)  # not a multiple of the micro-batch: exercises the prefetch tail
    crops[0], crops[1] = 0, 255       # all-black, all-white
    half = restorer.FaceRestorer(_cfg(weights_dir, tmp_path, **{"restore.micro_batch": 8}), device="cuda")
    full = restorer.FaceRestorer(_cfg(weights_dir, tmp_path, **{"restore.precision": "fp32"}), device="cuda")
    a, b = half.restore(crops, mats), full.restore(crops, mats)
    assert half.dtype == torch.float16 and np.isfinite(a.similarity).all()
    assert np.abs(a.faces.astype(int) - b.faces.astype(int)).mean() < 2
    assert np.allclose(a.similarity, b.similarity, atol=0.02)
