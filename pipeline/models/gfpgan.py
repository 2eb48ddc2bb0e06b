"""GFP-GAN (GFPGANv1Clean-compatible): U-Net encoder + StyleGAN2 decoder with channel-split SFT.

Paper: Wang et al., "Towards Real-World Blind Face Restoration with Generative Facial Prior", CVPR 2021.
Upstream: https://github.com/TencentARC/GFPGAN (``gfpgan/archs/gfpganv1_clean_arch.py``), Apache-2.0.
Weights: GFPGANv1.3.pth / GFPGANv1.4.pth (``params_ema``) load into ``gfpgan_v1_clean()`` with strict=True.

This is an independent implementation with the upstream parameter names and shapes. What differs is
how the modulated convolution runs: upstream builds a per-sample weight and a grouped convolution
(``groups=batch``), which defeats cuDNN's batched kernels. Here (``impl="batched"``) the style scales the
input activations, one shared-weight convolution runs over the whole batch, and the demodulation
coefficients scale its output; ``impl="auto"`` (default) picks per layer and call by measurement
(``ModulatedConv2d._pick``). The two are algebraically identical::

    conv(x, w * s) * d  ==  conv(x * s, w) * d,   d = rsqrt(sum_{i,k} (w * s)^2 + eps)

Demodulation is computed in fp32 whatever the activation dtype: the upstream epsilon (1e-8) is 0 in
fp16 and the sum over in_channels*k*k squared weights can overflow it. 1x1 to-RGB layers (no
demodulation) use one batched matmul with per-sample weights, cheaper than scaling every input pixel.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

ModConvImpl = Literal["auto", "batched", "grouped"]

# The production configuration of GFPGANv1.2/1.3/1.4 (same architecture and constructor).
GFPGAN_V1_CLEAN_512 = dict(
    out_size=512, num_style_feat=512, channel_multiplier=2, num_mlp=8, narrow=1.0, sft_half=True, different_w=True
)


# CUDA's channels_last bilinear kernel indexes with 32 bits: an input or output of INT_MAX elements or more
# is refused (seen on an H100: fp16 micro-batch 64 at 512 px, 64 x 128 x 512 x 512). Such batches are resized
# in slices, each written into the one output.
_RESIZE_MAX = 2**31 - 2


def _resize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Bilinear resize by ``scale`` (align_corners=False), in batch slices whose input and output both stay
    under the kernel's limit."""
    n = max(1, int(_RESIZE_MAX // (x[:1].numel() * max(1.0, scale * scale)))) if x.numel() else 1
    if x.shape[0] <= n:
        return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    first = F.interpolate(x[:n], scale_factor=scale, mode="bilinear", align_corners=False)
    out = torch.empty((x.shape[0], *first.shape[1:]), dtype=first.dtype, device=first.device,
                      memory_format=_layout(x))
    out[:n] = first
    for i in range(n, x.shape[0], n):
        out[i:i + n] = F.interpolate(x[i:i + n], scale_factor=scale, mode="bilinear", align_corners=False)
    return out


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


def _channels(narrow: float, channel_multiplier: int) -> dict[int, int]:
    return {
        4: int(512 * narrow), 8: int(512 * narrow), 16: int(512 * narrow), 32: int(512 * narrow),
        64: int(256 * channel_multiplier * narrow), 128: int(128 * channel_multiplier * narrow),
        256: int(64 * channel_multiplier * narrow), 512: int(32 * channel_multiplier * narrow),
        1024: int(16 * channel_multiplier * narrow),
    }


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    """In place, on the fresh output of a convolution (as upstream does)."""
    return F.leaky_relu_(x, 0.2)


# ---------------------------------------------------------------------------------------------- blocks


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution (no bias). ``impl`` picks the formulation; results are equal."""

    def __init__(self, in_channels, out_channels, kernel_size, num_style_feat, demodulate=True, upsample=False,
                 eps=1e-8):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.demodulate, self.upsample, self.eps = demodulate, upsample, eps
        self.modulation = nn.Linear(num_style_feat, in_channels, bias=True)
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, kernel_size, kernel_size)
                                   / math.sqrt(in_channels * kernel_size**2))
        self.padding = kernel_size // 2
        self.impl: ModConvImpl = "auto"

    def _pick(self, x: torch.Tensor) -> str:
        """Formulation for this call. Measured on CPU (2 threads, fp32; see BENCHMARKS.md): the shared-weight
        form is 22x faster than grouped at 4x4 with 4 samples but ~25% slower from 64x64 up, where its two
        extra elementwise passes over large tensors cost more than the per-sample weights. One sample
        needs neither: modulating its weight is a plain convolution. cuDNN's grouped convolutions are
        slow, so on CUDA batches always use the shared-weight form."""
        if self.impl != "auto":
            return self.impl
        if x.shape[0] == 1:
            return "grouped"
        if x.is_cuda:
            return "batched"
        return "batched" if x.shape[-1] <= 32 else "grouped"

    def _demod(self, style: torch.Tensor) -> torch.Tensor:
        """(b, out) demodulation coefficients, accumulated in fp32."""
        w2 = self.weight[0].float().pow(2).sum(dim=(2, 3))          # (out, in)
        return torch.rsqrt(style.float().pow(2) @ w2.t() + self.eps)

    def forward(self, x: torch.Tensor, style: torch.Tensor, gain: float = 1.0,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """``gain * modulated_conv(x) + bias``; the gain and bias go into the (small) weights or the
        convolution itself rather than into extra passes over the (large) output."""
        b, c = x.shape[:2]
        style = self.modulation(style)                              # (b, in)
        if self._pick(x) == "grouped":
            return self._forward_grouped(x, style, gain, bias)
        if self.kernel_size == 1 and not self.demodulate and not self.upsample:
            w = (self.weight[0, :, :, 0, 0].unsqueeze(0) * (style.unsqueeze(1) * gain)).to(x.dtype)  # (b, out, in)
            flat = x.reshape(b, c, -1)
            out = torch.bmm(w, flat) if bias is None else torch.baddbmm(bias.view(1, -1, 1).to(x.dtype), w, flat)
            return out.view(b, self.out_channels, *x.shape[2:])
        x = x * style.view(b, c, 1, 1).to(x.dtype)
        if self.upsample:  # bilinear upsampling is per channel, so it commutes with the channel scaling
            x = _resize(x, 2)
        out = F.conv2d(x, self.weight[0].to(x.dtype), padding=self.padding)
        if self.demodulate:
            out = out.mul_((self._demod(style) * gain).to(out.dtype).view(b, self.out_channels, 1, 1))
        elif gain != 1.0:
            out = out.mul_(gain)
        return out if bias is None else out.add_(bias.view(1, -1, 1, 1).to(out.dtype))

    def _forward_grouped(self, x: torch.Tensor, style: torch.Tensor, gain: float = 1.0,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
        """The upstream formulation: one weight per sample, grouped convolution."""
        b, c = x.shape[:2]
        weight = self.weight * style.view(b, 1, c, 1, 1)
        if self.demodulate:
            demod = torch.rsqrt(weight.float().pow(2).sum([2, 3, 4]) + self.eps).to(weight.dtype)
            weight = weight * (demod * gain).view(b, self.out_channels, 1, 1, 1)
        elif gain != 1.0:
            weight = weight * gain
        weight = weight.reshape(b * self.out_channels, c, self.kernel_size, self.kernel_size)  # any layout
        if self.upsample:
            x = _resize(x, 2)
        h, w = x.shape[2:]
        bias = None if bias is None else bias.reshape(-1).repeat(b).to(x.dtype)
        out = F.conv2d(x.reshape(1, b * c, h, w), weight.to(x.dtype), bias, padding=self.padding, groups=b)
        return out.view(b, self.out_channels, *out.shape[2:])


class StyleConv(nn.Module):
    def __init__(self, in_channels, out_channels, num_style_feat, upsample=False):
        super().__init__()
        self.modulated_conv = ModulatedConv2d(in_channels, out_channels, 3, num_style_feat, upsample=upsample)
        self.weight = nn.Parameter(torch.zeros(1))  # noise strength
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.upstream_ops = False

    def forward(self, x, style, noise):
        if self.upstream_ops:  # upstream's sequence of passes (the benchmark's official-style baseline)
            out = self.modulated_conv(x, style) * 2**0.5
            if noise is None:
                noise = out.new_empty(out.shape[0], 1, *out.shape[2:]).normal_()
            out = out + self.weight * noise.to(out.dtype)
            return F.leaky_relu_(out + self.bias, 0.2)
        # The gain and bias inside the convolution, the rest in place: two passes over the output, not five.
        out = self.modulated_conv(x, style, gain=2**0.5, bias=self.bias)
        if noise is None:
            noise = out.new_empty(out.shape[0], 1, *out.shape[2:]).normal_()
        return F.leaky_relu_(out.add_(self.weight * noise.to(out.dtype)), 0.2)


class ToRGB(nn.Module):
    def __init__(self, in_channels, num_style_feat, upsample=True):
        super().__init__()
        self.upsample = upsample
        self.modulated_conv = ModulatedConv2d(in_channels, 3, 1, num_style_feat, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.upstream_ops = False

    def forward(self, x, style, skip=None):
        if self.upstream_ops:
            out = self.modulated_conv(x, style) + self.bias
        else:
            out = self.modulated_conv(x, style, bias=self.bias)
        if skip is not None:
            if self.upsample:
                skip = _resize(skip, 2)
            out = out + skip if self.upstream_ops else out.add_(skip)
        return out


class ConstantInput(nn.Module):
    def __init__(self, num_channel, size):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, num_channel, size, size))

    def forward(self, batch):
        return self.weight.expand(batch, -1, -1, -1)


class NormStyleCode(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


class StyleGAN2GeneratorCSFT(nn.Module):
    """StyleGAN2 generator whose features are modulated by spatial (scale, shift) conditions."""

    def __init__(self, out_size, num_style_feat=512, num_mlp=8, channel_multiplier=2, narrow=1.0, sft_half=False):
        super().__init__()
        self.num_style_feat, self.sft_half = num_style_feat, sft_half
        self.upstream_ops = False
        mlp: list[nn.Module] = [NormStyleCode()]
        for _ in range(num_mlp):  # unused when the encoder gives latents directly; kept for weight loading
            mlp += [nn.Linear(num_style_feat, num_style_feat), nn.LeakyReLU(0.2)]
        self.style_mlp = nn.Sequential(*mlp)
        ch = _channels(narrow, channel_multiplier)
        self.constant_input = ConstantInput(ch[4], 4)
        self.style_conv1 = StyleConv(ch[4], ch[4], num_style_feat)
        self.to_rgb1 = ToRGB(ch[4], num_style_feat, upsample=False)
        self.log_size = int(math.log2(out_size))
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.style_convs, self.to_rgbs, self.noises = nn.ModuleList(), nn.ModuleList(), nn.Module()
        for idx in range(self.num_layers):
            res = 2 ** ((idx + 5) // 2)
            self.noises.register_buffer(f"noise{idx}", torch.randn(1, 1, res, res))
        in_ch = ch[4]
        for i in range(3, self.log_size + 1):
            out_ch = ch[2**i]
            self.style_convs.append(StyleConv(in_ch, out_ch, num_style_feat, upsample=True))
            self.style_convs.append(StyleConv(out_ch, out_ch, num_style_feat))
            self.to_rgbs.append(ToRGB(out_ch, num_style_feat))
            in_ch = out_ch

    def forward(self, latent: torch.Tensor, conditions: list[torch.Tensor], randomize_noise: bool = False):
        """``latent``: (b, num_latent, num_style_feat); ``conditions``: [scale, shift] per resolution."""
        noise = [None if randomize_noise else getattr(self.noises, f"noise{i}") for i in range(self.num_layers)]
        out = self.constant_input(latent.shape[0])
        out = self.style_conv1(out, latent[:, 0], noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for conv1, conv2, n1, n2, to_rgb in zip(self.style_convs[::2], self.style_convs[1::2], noise[1::2],
                                                noise[2::2], self.to_rgbs):
            out = conv1(out, latent[:, i], n1)
            if i < len(conditions):
                scale, shift = conditions[i - 1], conditions[i]
                if self.upstream_ops and self.sft_half:  # SFT on the second half of the channels only
                    same, sft = torch.split(out, out.size(1) // 2, dim=1)
                    out = torch.cat([same, sft * scale + shift], dim=1)
                elif self.upstream_ops:
                    out = out * scale + shift
                else:  # in place on the fresh conv output: no copy of the whole tensor
                    sft = out[:, out.size(1) // 2:] if self.sft_half else out
                    sft.mul_(scale).add_(shift)
            out = conv2(out, latent[:, i + 1], n2)
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        return skip


class ResBlock(nn.Module):
    """Residual block with bilinear down- (x0.5) or up-sampling (x2)."""

    def __init__(self, in_channels, out_channels, mode):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.scale_factor = 0.5 if mode == "down" else 2.0

    def forward(self, x):
        out = _lrelu(self.conv1(x))
        out = _resize(out, self.scale_factor)
        out = _lrelu(self.conv2(out))
        x = _resize(x, self.scale_factor)
        return out + self.skip(x)


def _sft_branch(ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ch, ch, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(ch, out_ch, 3, 1, 1))


# ---------------------------------------------------------------------------------------------- model


class GFPGANv1Clean(nn.Module):
    """GFP-GAN v1 "clean" (no custom CUDA ops). Input and output: (b, 3, S, S) RGB in [-1, 1]."""

    def __init__(self, out_size=512, num_style_feat=512, channel_multiplier=2, num_mlp=8, narrow=1.0,
                 sft_half=True, different_w=True):
        super().__init__()
        if not different_w:
            raise ValueError("only different_w=True (the released GFPGANv1.2-1.4 configuration) is supported")
        self.num_style_feat = num_style_feat
        ch = _channels(narrow * 0.5, channel_multiplier)  # the U-Net is half as wide as the decoder
        self.log_size = int(math.log2(out_size))
        self.out_size = out_size
        self.conv_body_first = nn.Conv2d(3, ch[out_size], 1)
        in_ch = ch[out_size]
        self.conv_body_down = nn.ModuleList()
        for i in range(self.log_size, 2, -1):
            self.conv_body_down.append(ResBlock(in_ch, ch[2 ** (i - 1)], "down"))
            in_ch = ch[2 ** (i - 1)]
        self.final_conv = nn.Conv2d(in_ch, ch[4], 3, 1, 1)
        in_ch = ch[4]
        self.conv_body_up = nn.ModuleList()
        for i in range(3, self.log_size + 1):
            self.conv_body_up.append(ResBlock(in_ch, ch[2**i], "up"))
            in_ch = ch[2**i]
        # Intermediate RGB heads are a training-time loss; kept so official checkpoints load strictly.
        self.toRGB = nn.ModuleList(nn.Conv2d(ch[2**i], 3, 1) for i in range(3, self.log_size + 1))
        self.final_linear = nn.Linear(ch[4] * 16, (self.log_size * 2 - 2) * num_style_feat)
        self.stylegan_decoder = StyleGAN2GeneratorCSFT(out_size, num_style_feat, num_mlp, channel_multiplier,
                                                       narrow, sft_half)
        self.condition_scale, self.condition_shift = nn.ModuleList(), nn.ModuleList()
        for i in range(3, self.log_size + 1):
            c = ch[2**i]
            self.condition_scale.append(_sft_branch(c, c if sft_half else 2 * c))
            self.condition_shift.append(_sft_branch(c, c if sft_half else 2 * c))

    def set_upstream_ops(self, upstream: bool) -> "GFPGANv1Clean":
        """``True``: the elementwise steps as upstream sequences them (gain, noise, bias and SFT each a pass
        over a new tensor), the official-style baseline of ``bench/gfpgan_throughput.py``. ``False`` (ours):
        gain and bias inside the convolutions, the rest in place. Equal up to float rounding (tested)."""
        for m in self.modules():
            if hasattr(m, "upstream_ops"):
                m.upstream_ops = upstream
        return self

    def set_modconv_impl(self, impl: ModConvImpl) -> "GFPGANv1Clean":
        for m in self.modules():
            if isinstance(m, ModulatedConv2d):
                m.impl = impl
        return self

    def forward(self, x: torch.Tensor, randomize_noise: bool = False) -> torch.Tensor:
        feat = _lrelu(self.conv_body_first(x))
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.insert(0, feat)
        feat = _lrelu(self.final_conv(feat))
        latent = self.final_linear(feat.flatten(1)).view(feat.size(0), -1, self.num_style_feat)
        conditions = []
        for i, block in enumerate(self.conv_body_up):
            feat = block(feat + skips[i])
            conditions += [self.condition_scale[i](feat), self.condition_shift[i](feat)]
        return self.stylegan_decoder(latent, conditions, randomize_noise=randomize_noise)


# ---------------------------------------------------------------------------------------------- loading


def checkpoint_filter_fn(checkpoint: dict) -> dict[str, torch.Tensor]:
    """Official checkpoints: ``{'params_ema': sd}`` (else ``params``), possibly with ``module.`` prefixes."""
    sd = checkpoint
    for key in ("params_ema", "params"):
        if isinstance(checkpoint, dict) and key in checkpoint:
            sd = checkpoint[key]
            break
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load with strict=True, but say which keys and shapes disagree (the usual error hides them)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        def few(xs):
            return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")
        parts = [f"{name} {few(xs)}" for name, xs in
                 (("missing:", missing), ("unexpected:", unexpected), ("shape mismatch:", mismatched)) if xs]
        raise ValueError(f"{source} does not match the architecture: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def infer_arch(state_dict: dict[str, torch.Tensor]) -> dict:
    """Constructor arguments of a GFPGANv1Clean checkpoint, read from its tensors' shapes (a user-supplied
    checkpoint of another width or style size); the strict load that follows checks every other tensor."""
    try:
        w = state_dict["stylegan_decoder.style_conv1.modulated_conv.weight"]      # (1, c4, c4, 3, 3)
        mod = state_dict["stylegan_decoder.style_conv1.modulated_conv.modulation.weight"]  # (c4, style)
    except KeyError as e:
        raise ValueError(f"not a GFP-GAN v1 (clean) checkpoint: no tensor {e.args[0]}") from None
    return dict(GFPGAN_V1_CLEAN_512, narrow=w.shape[1] / 512, num_style_feat=int(mod.shape[1]))


def to_channels_last(model: nn.Module) -> nn.Module:
    """NHWC layout for every 4-D parameter and buffer, as ``Module.to(memory_format=torch.channels_last)``
    would do, which refuses the 5-D modulated weights (1, out, in, k, k): those get the layout whose
    ``[0]`` view, the shared convolution weight, is NHWC. Values and ``state_dict`` are unchanged."""
    nhwc = torch.channels_last
    for t in [*model.parameters(), *model.buffers()]:
        if t.dim() == 4:
            t.data = t.data.contiguous(memory_format=nhwc)
        elif t.dim() == 5:
            t.data = t.data[0].contiguous(memory_format=nhwc).unsqueeze(0)
    return model


def gfpgan_v1_clean(**overrides) -> GFPGANv1Clean:
    """The released GFPGANv1.3/v1.4 architecture; ``overrides`` change it (e.g. narrow for tests)."""
    return GFPGANv1Clean(**{**GFPGAN_V1_CLEAN_512, **overrides})
