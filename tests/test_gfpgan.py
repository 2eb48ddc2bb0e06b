import json

import pytest
import torch

from pipeline.models.gfpgan import (ModulatedConv2d, checkpoint_filter_fn, gfpgan_v1_clean,
                                    load_state_dict_strict, to_channels_last)

from conftest import FIXTURES, need


def test_production_config_has_exactly_the_official_keys_and_shapes():
    shapes = json.loads(need(FIXTURES / "gfpganv1.4_state_dict_shapes.json").read_text())
    sd = gfpgan_v1_clean().state_dict()
    assert sorted(sd) == sorted(shapes)
    assert {k: list(v.shape) for k, v in sd.items()} == shapes


@pytest.fixture(scope="module")
def tiny():
    cfg = json.loads(need(FIXTURES / "gfpgan_tiny_a_config.json").read_text())
    model = gfpgan_v1_clean(num_style_feat=cfg["num_style_feat"], narrow=cfg["narrow"]).eval()
    ckpt = torch.load(FIXTURES / "gfpgan_tiny_a_checkpoint.pth", weights_only=True)
    load_state_dict_strict(model, checkpoint_filter_fn(ckpt), "tiny")
    io = torch.load(FIXTURES / "gfpgan_tiny_a_io.pth", weights_only=True)
    return model, io


@pytest.mark.parametrize("upstream", [False, True], ids=["ours", "upstream-ops"])
@pytest.mark.parametrize("impl", ["auto", "batched", "grouped"])
def test_reproduces_the_official_golden_output(tiny, impl, upstream):
    model, io = tiny
    model.set_modconv_impl(impl).set_upstream_ops(upstream)
    with torch.inference_mode():
        out = model(io["input"])
        single = model(io["input"][1:])
    assert (out - io["output"]).abs().max().item() < 1e-3
    assert (single - io["output"][1:]).abs().max().item() < 1e-3  # batch composition does not change a face


@pytest.mark.parametrize("impl", ["batched", "grouped"])
def test_channels_last_layout_reproduces_the_golden_output(impl):
    """The GPU's NHWC layout, checked on CPU (``Module.to(memory_format=...)`` refuses the 5-D weights)."""
    cfg = json.loads(need(FIXTURES / "gfpgan_tiny_a_config.json").read_text())
    model = to_channels_last(gfpgan_v1_clean(num_style_feat=cfg["num_style_feat"], narrow=cfg["narrow"]).eval())
    ckpt = torch.load(FIXTURES / "gfpgan_tiny_a_checkpoint.pth", weights_only=True)
    load_state_dict_strict(model, checkpoint_filter_fn(ckpt), "tiny")
    io = torch.load(FIXTURES / "gfpgan_tiny_a_io.pth", weights_only=True)
    conv = model.stylegan_decoder.style_convs[0].modulated_conv
    assert conv.weight[0].is_contiguous(memory_format=torch.channels_last)
    assert model.conv_body_first.weight.is_contiguous(memory_format=torch.channels_last)
    x = io["input"].contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = model.set_modconv_impl(impl)(x)
        single = model(x[:1])
    assert (out - io["output"]).abs().max().item() < 1e-3
    assert (single - io["output"][:1]).abs().max().item() < 1e-3


def test_a_batch_past_the_resize_kernels_index_limit_is_resized_in_slices(tiny, monkeypatch):
    """CUDA's channels_last bilinear kernel refuses outputs of 2**31 elements (an H100 at fp16 micro-batch 64):
    with the limit lowered so that the large resizes of the batch are sliced, the output is the golden one, in
    the input's layout, and the slicing really happened."""
    from pipeline.models import gfpgan

    model, io = tiny
    model.set_modconv_impl("batched").set_upstream_ops(False)
    x = io["input"].contiguous(memory_format=torch.channels_last)
    sliced = []
    real = gfpgan.F.interpolate

    def counting(t, **kw):
        sliced.append(t.shape[0])
        return real(t, **kw)

    monkeypatch.setattr(gfpgan, "_RESIZE_MAX", x[:1].numel())  # one face's input: every 2x resize slices
    monkeypatch.setattr(gfpgan.F, "interpolate", counting)
    with torch.inference_mode():
        out = model(x)
    assert x.shape[0] > 1 and min(sliced) < x.shape[0]  # the large resizes went one face at a time
    assert (out - io["output"]).abs().max().item() < 1e-3
    x = torch.rand(3, 4, 8, 8).contiguous(memory_format=torch.channels_last)  # 256 elements a face
    monkeypatch.setattr(gfpgan, "_RESIZE_MAX", 300)  # under one face's output going up, its input going down
    for scale, shape in ((2, (3, 4, 16, 16)), (0.5, (3, 4, 4, 4))):
        ref = real(x, scale_factor=scale, mode="bilinear", align_corners=False)
        sliced.clear()
        got = gfpgan._resize(x, scale)
        assert sliced == [1, 1, 1], scale  # one face at a time: the input's size bounds a downscale too
        assert got.shape == shape and got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, ref)
    assert gfpgan._resize(torch.rand(0, 4, 8, 8), 2).shape == (0, 4, 16, 16)  # an empty batch, as F.interpolate


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("kind", ["conv3x3", "upsample", "to_rgb"])
def test_batched_modulated_conv_equals_grouped(kind, batch):
    torch.manual_seed(batch)
    cin, cout, k, demod, up = {"conv3x3": (24, 16, 3, True, False), "upsample": (24, 16, 3, True, True),
                               "to_rgb": (24, 3, 1, False, False)}[kind]
    layer = ModulatedConv2d(cin, cout, k, num_style_feat=32, demodulate=demod, upsample=up)
    with torch.no_grad():
        layer.modulation.bias.uniform_(0.5, 1.5)
    x, style = torch.randn(batch, cin, 8, 8), torch.randn(batch, 32)
    layer.impl = "grouped"
    ref = layer(x, style)
    layer.impl = "batched"
    got = layer(x, style)
    assert got.shape == ref.shape == (batch, cout, 16 if up else 8, 16 if up else 8)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4)
    # a gain and a bias folded into either formulation equal them applied afterwards
    bias = torch.randn(1, cout, 1, 1)
    for impl in ("grouped", "batched"):
        layer.impl = impl
        assert torch.allclose(layer(x, style, gain=2**0.5, bias=bias), ref * 2**0.5 + bias, atol=1e-5, rtol=1e-4)


def test_strict_load_names_the_offending_keys():
    model = gfpgan_v1_clean(num_style_feat=128, narrow=0.125)
    sd = dict(model.state_dict())
    sd.pop("final_conv.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["final_linear.bias"] = torch.zeros(3)
    with pytest.raises(ValueError) as e:
        load_state_dict_strict(model, sd, "ckpt.pth")
    msg = str(e.value)
    assert "missing: final_conv.weight" in msg and "unexpected: extra.weight" in msg
    assert "final_linear.bias: file (3,)" in msg


def test_checkpoint_filter_prefers_params_ema_and_strips_module():
    a, b = torch.ones(1), torch.zeros(1)
    assert checkpoint_filter_fn({"params_ema": {"module.x": a}, "params": {"x": b}}) == {"x": a}
    assert checkpoint_filter_fn({"params": {"module.x": b}}) == {"x": b}
    assert checkpoint_filter_fn({"x": a}) == {"x": a}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_matches_fp32_on_cuda(tiny):
    model, io = tiny
    model = model.cuda().set_modconv_impl("batched").set_upstream_ops(False)  # the fixture is shared
    x = io["input"].cuda()
    with torch.inference_mode():
        ref = model(x)
        half = model.half()(x.half()).float()
    model.float()
    assert torch.isfinite(half).all()
    assert (half - ref).abs().max().item() < 0.05
