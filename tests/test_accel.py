"""torch.compile / CUDA graphs wrappers: fallbacks on CPU, equality with eager where they run."""

import logging

import pytest
import torch

from pipeline.accel import CudaGraphed, WithFallback, accelerate
from pipeline.models.gfpgan import gfpgan_v1_clean


def test_a_failing_method_falls_back_to_eager_for_good(caplog):
    calls = {"fast": 0}

    def fast(x):
        calls["fast"] += 1
        raise RuntimeError("no compiler here")

    f = WithFallback(fast, lambda x: x + 1, "torch.compile")
    with caplog.at_level(logging.WARNING):
        assert f(torch.zeros(2)).tolist() == [1, 1]
        assert f(torch.zeros(2)).tolist() == [1, 1]
    assert calls["fast"] == 1 and not f.active
    assert "torch.compile failed (RuntimeError: no compiler here)" in caplog.text


def test_out_of_memory_is_not_a_reason_to_fall_back():
    def fast(x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    f = WithFallback(fast, lambda x: x, "CUDA graphs")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        f(torch.zeros(1))
    assert f.active  # the caller shrinks its batch and tries the fast path again


def test_eager_errors_still_surface():
    def broken(x):
        raise ValueError("bad shape")

    with pytest.raises(ValueError, match="bad shape"):
        WithFallback(broken, broken, "torch.compile")(torch.zeros(1))


def test_cuda_graphs_off_cuda_run_eagerly():
    model = torch.nn.Conv2d(3, 3, 1)
    forward, fixed = accelerate(model, compile=False, cuda_graphs=True)
    x = torch.randn(2, 3, 4, 4)
    with torch.inference_mode():
        assert torch.equal(forward(x), model(x))
    assert fixed and not forward.active
    assert accelerate(model, compile=False, cuda_graphs=False) == (model, False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_match_eager_for_new_inputs():
    torch.manual_seed(0)
    model = gfpgan_v1_clean(num_style_feat=64, narrow=0.125).eval().cuda().half()
    graphed = CudaGraphed(model)
    with torch.inference_mode():
        for seed in range(3):  # capture once, then replays on fresh inputs must not return stale outputs
            x = torch.rand(4, 3, 512, 512, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            x = x.mul(2).sub(1).half()
            assert (graphed(x).float() - model(x).float()).abs().max().item() < 1e-2
        other = graphed(x[:2])  # a second shape gets its own graph from the shared pool
        assert (other.float() - model(x[:2]).float()).abs().max().item() < 1e-2
    assert len(graphed.graphs) == 2
