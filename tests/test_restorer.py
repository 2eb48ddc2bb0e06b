"""The GPU side of Restore, on CPU: precision, micro-batching, the fp32 fallback guard, extreme inputs."""

import numpy as np
import pytest
import torch

from pipeline import restorer
from pipeline.config import load_config

from conftest import test_overrides


def _cfg(weights_dir, tmp_path, **kw):
    """NHWC on CPU too, so that these tests run the layout the GPU runs."""
    return load_config(None, test_overrides(weights_dir, tmp_path, **{"restore.channels_last": True, **kw}),
                       environ={})


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


def test_bad_identity_scores_in_half_precision_are_recomputed_in_fp32(weights_dir, tmp_path):
    crops, mats = _faces(5, seed=4)
    bf16 = restorer.FaceRestorer(_cfg(weights_dir, tmp_path, **{"restore.precision": "bf16",
                                                                "restore.micro_batch": 2}))
    embed, calls = bf16.scorer.embed, []

    def nan_for_the_second_face(faces112):  # input embeddings come first, then the restorations
        e = embed(faces112).clone()
        calls.append(len(e))
        if len(calls) == 1:  # the first micro-batch of 2 faces
            e[3] = float("nan")
        return e

    bf16.scorer.embed = nan_for_the_second_face
    out = bf16.restore(crops, mats)
    assert out.fp32_fallback.tolist() == [False, True, False, False, False]
    assert np.isfinite(out.similarity).all()
    assert calls == [4, 4, 2]  # the fp32 rerun has its own scorer


def test_out_of_memory_halves_the_micro_batch_and_loses_no_face(weights_dir, tmp_path, caplog):
    crops, mats = _faces(5, seed=6)
    ref = restorer.FaceRestorer(_cfg(weights_dir, tmp_path, **{"restore.micro_batch": 5})).restore(crops, mats)
    fr = restorer.FaceRestorer(_cfg(weights_dir, tmp_path, **{"restore.micro_batch": 8}))
    forward, sizes = fr.forward, []

    def small_memory(x):
        sizes.append(len(x))
        if len(x) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(x)

    fr.forward = small_memory
    out = fr.restore(crops, mats)
    assert sizes == [5, 4, 2, 2, 1] and fr.micro_batch == 2  # the lowered size is kept for the next batch
    assert np.abs(out.faces.astype(int) - ref.faces.astype(int)).max() <= 1
    assert np.allclose(out.similarity, ref.similarity, atol=1e-4)
    assert "micro-batch lowered to 2" in caplog.text


def test_fixed_shape_forwards_get_the_tail_padded_and_results_unchanged(weights_dir, tmp_path):
    crops, mats = _faces(5, seed=7)
    ref = restorer.FaceRestorer(_cfg(weights_dir, tmp_path, **{"restore.micro_batch": 5})).restore(crops, mats)
    fr = restorer.FaceRestorer(_cfg(weights_dir, tmp_path, **{"restore.micro_batch": 3,
                                                              "restore.cuda_graphs": True}))
    assert fr.fixed_shape  # off CUDA the graphs fall back to eager, but the shape contract stays
    forward, sizes = fr.forward, []
    fr.forward = lambda x: sizes.append(len(x)) or forward(x)
    out = fr.restore(crops, mats)
    assert sizes == [3, 3]
    assert np.abs(out.faces.astype(int) - ref.faces.astype(int)).max() <= 1
    assert np.allclose(out.similarity, ref.similarity, atol=1e-4)


@pytest.mark.slow
def test_torch_compile_restores_like_eager(weights_dir, tmp_path):
    """Compiles the tiny model with the CPU compiler (about a minute): the compiled path must really run."""
    crops, mats = _faces(3, seed=8)
    ref = restorer.FaceRestorer(_cfg(weights_dir, tmp_path)).restore(crops, mats)
    fr = restorer.FaceRestorer(_cfg(weights_dir, tmp_path, **{"restore.micro_batch": 2, "restore.compile": True}))
    out = fr.restore(crops, mats)
    assert fr.forward.active, "torch.compile fell back to eager"
    assert np.abs(out.faces.astype(int) - ref.faces.astype(int)).max() <= 1
    assert np.allclose(out.similarity, ref.similarity, atol=1e-4)


def test_channels_last_is_cuda_only_unless_asked(fr, weights_dir, tmp_path):
    assert fr.channels_last and fr.model.conv_body_first.weight.is_contiguous(memory_format=torch.channels_last)
    plain = restorer.FaceRestorer(load_config(None, test_overrides(weights_dir, tmp_path), environ={}))
    assert not plain.channels_last and plain.model.conv_body_first.weight.is_contiguous()


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_restorer_matches_eager(weights_dir, tmp_path):
    crops, mats = _faces(11, seed=9)
    eager = restorer.FaceRestorer(_cfg(weights_dir, tmp_path, **{"restore.micro_batch": 4}), device="cuda")
    graphed = restorer.FaceRestorer(_cfg(weights_dir, tmp_path, **{"restore.micro_batch": 4,
                                                                   "restore.cuda_graphs": True}), device="cuda")
    a, b = graphed.restore(crops, mats), eager.restore(crops, mats)
    assert graphed.forward.active, "CUDA graph capture fell back to eager"
    assert np.abs(a.faces.astype(int) - b.faces.astype(int)).max() <= 1
    assert np.allclose(a.similarity, b.similarity, atol=1e-3)
