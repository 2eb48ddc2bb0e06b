"""The GPU side: GFP-GAN over any number of aligned crops, in micro-batches, with identity scoring.

uint8 crops go to the device as they are and are normalised there (4x less host-to-device traffic
than float32), from pinned memory on a side stream so that the next micro-batch's copy overlaps the
current one's compute; restored crops come back as uint8. Half-precision outputs that are non-finite or far
outside [-1, 1] are recomputed in fp32 and counted. A CUDA out-of-memory halves the micro-batch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from . import identity, weights
from .config import RunConfig
from .errors import WeightsError
from .models.gfpgan import checkpoint_filter_fn, gfpgan_v1_clean, load_state_dict_strict

log = logging.getLogger(__name__)

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# A trained GFP-GAN's output sits in [-1, 1] with small overshoot; far beyond it means overflow.
_MAX_ABS_VALID = 4.0


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[precision]


def build_gfpgan(cfg: RunConfig) -> tuple[torch.nn.Module, weights.Resolved]:
    resolved = weights.resolve(cfg.restore.model, cfg)
    if resolved.spec.kind != "gfpgan":
        raise ValueError(f"restore.model {cfg.restore.model!r} is a {resolved.spec.kind} model, not GFP-GAN")
    torch.manual_seed(0)  # the seeded stand-in for --untrained
    model = gfpgan_v1_clean(**resolved.spec.arch)
    if not resolved.untrained:
        sd = checkpoint_filter_fn(weights.load_torch_file(resolved.path))
        try:
            load_state_dict_strict(model, sd, str(resolved.path))
        except ValueError as e:
            raise WeightsError(str(e)) from None
    return model.eval(), resolved


@dataclass
class Restored:
    faces: np.ndarray            # (n, 512, 512, 3) uint8 BGR
    similarity: np.ndarray       # (n,) float32 cosine(input, restored); NaN where not scored
    fp32_fallback: np.ndarray    # (n,) bool: recomputed in fp32 after a bad half-precision output


class FaceRestorer:
    def __init__(self, cfg: RunConfig, device: str | torch.device | None = None):
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(cfg.restore.precision, self.device)
        if self.device.type == "cpu" and self.dtype == torch.float16:
            raise ValueError("restore.precision=fp16 needs CUDA; use fp32 or bf16 on CPU")
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.restore.cpu_threads or os.cpu_count() or 1)
        model, self.resolved = build_gfpgan(cfg)
        self.fp32_model = model if self.dtype == torch.float32 else None
        self.model = model.to(self.device, self.dtype)
        self.channels_last = cfg.restore.channels_last and self.device.type == "cuda"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = self.model
        if cfg.restore.compile:
            try:
                self.forward = torch.compile(self.model)
            except Exception as e:  # no compiler toolchain, unsupported platform
                log.warning("torch.compile unavailable (%s); running eagerly", e)
        self.micro_batch = cfg.restore.micro_batch
        self.id_weights = weights.resolve(weights.identity_model(cfg.qa), cfg)
        self.scorer = identity.build_scorer(cfg.qa, self.id_weights, self.device)
        self.untrained = self.resolved.untrained or self.id_weights.untrained

    def _to_input(self, crops: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = crops.to(self.device).permute(0, 3, 1, 2).flip(1)  # BGR uint8 -> RGB; already there on CUDA
        x = x.to(dtype).div_(127.5).sub_(1.0)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _fp32(self) -> torch.nn.Module:
        """The fallback model, from the original checkpoint (not the half weights), built on first need."""
        if self.fp32_model is None:
            self.fp32_model = build_gfpgan(self.cfg)[0].to(self.device)
        return self.fp32_model

    @torch.inference_mode()
    def _run_chunk(self, crops: torch.Tensor, mats: torch.Tensor):
        x = self._to_input(crops, self.dtype)
        out = self.forward(x)
        fallback = torch.zeros(len(x), dtype=torch.bool, device=self.device)
        if self.dtype != torch.float32:
            bad = ~torch.isfinite(out).flatten(1).all(1) | (out.float().abs().flatten(1).amax(1) > _MAX_ABS_VALID)
            if bad.any():
                idx = bad.nonzero().flatten()
                out = out.float()
                out[idx] = self._fp32()(self._to_input(crops[idx], torch.float32))
                fallback = bad
        rgb01 = ((out.float().clamp(-1, 1) + 1) * 0.5)
        in01 = x.float().add(1).mul(0.5)
        faces112 = identity.align_112(torch.cat([in01, rgb01]), torch.cat([mats, mats]))
        emb = self.scorer.embed(faces112)
        sim = identity.cosine(emb[: len(x)], emb[len(x):])
        restored = rgb01.mul(255).round().to(torch.uint8).flip(1).permute(0, 2, 3, 1)
        return restored.cpu().numpy(), sim.cpu().numpy(), fallback.cpu().numpy()

    def restore(self, crops: np.ndarray, arcface_mats: np.ndarray) -> Restored:
        """``crops``: (n,512,512,3) uint8 BGR; ``arcface_mats``: (n,2,3) from ``identity.arcface_matrix``."""
        n = len(crops)
        out = Restored(np.empty((n, 512, 512, 3), np.uint8), np.full(n, np.nan, np.float32), np.zeros(n, bool))
        if n == 0:
            return out
        src = torch.from_numpy(np.ascontiguousarray(crops))
        cuda = self.device.type == "cuda"
        if cuda:
            src = src.pin_memory()
            copies = torch.cuda.Stream(self.device)
        mats = torch.from_numpy(np.asarray(arcface_mats, np.float32)).to(self.device)

        def upload(a: int, b: int) -> torch.Tensor:
            """Start copying crops[a:b] to the device on the side stream (a no-op view on CPU)."""
            if not cuda:
                return src[a:b]
            with torch.cuda.stream(copies):
                return src[a:b].to(self.device, non_blocking=True)

        start, mb = 0, self.micro_batch
        ahead = upload(0, min(n, mb))
        while start < n:
            end = min(n, start + mb)
            x = ahead
            if cuda:  # the compute stream waits for its copy, and owns the tensor from here on
                torch.cuda.current_stream(self.device).wait_stream(copies)
                x.record_stream(torch.cuda.current_stream(self.device))
            # The next micro-batch's copy runs while this one computes.
            ahead = upload(end, min(n, end + mb)) if end < n else None
            try:
                faces, sim, fb = self._run_chunk(x, mats[start:end])
            except torch.cuda.OutOfMemoryError:
                if mb == 1:
                    raise
                mb = max(1, mb // 2)
                del x, ahead
                torch.cuda.empty_cache()
                log.warning("CUDA out of memory; micro-batch lowered to %d", mb)
                ahead = upload(start, min(n, start + mb))
                continue
            out.faces[start:end], out.similarity[start:end], out.fp32_fallback[start:end] = faces, sim, fb
            start = end
        return out
