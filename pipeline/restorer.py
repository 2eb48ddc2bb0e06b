"""The GPU side: GFP-GAN over any number of aligned crops, in micro-batches, with identity scoring.

The device is kept busy by a two-deep pipeline: uint8 crops go to the device as they are and are
normalised there (4x less host-to-device traffic than float32), from pinned memory on a side stream, so
the next micro-batch's copy overlaps the current one's compute; restored uint8 crops, similarities and
the guard's verdict come back with non-blocking copies, and are read only after the next micro-batch
has been queued. The host therefore never waits on the device with the device idle (with the torch
ArcFace; an ONNX scorer runs on the host and waits for its inputs).

Half precision is guarded: a face whose half-precision restoration is non-finite or far outside
[-1, 1], or whose identity score is non-finite, is recomputed in fp32 and counted. A CUDA out-of-memory
halves the micro-batch.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from . import identity, weights
from .accel import accelerate
from .config import RunConfig
from .errors import WeightsError
from .models.gfpgan import (checkpoint_filter_fn, gfpgan_v1_clean, infer_arch, load_state_dict_strict,
                            to_channels_last)

log = logging.getLogger(__name__)

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# A trained GFP-GAN's output sits in [-1, 1] with small overshoot; far beyond it means overflow.
_MAX_ABS_VALID = 4.0


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[precision]


def build_gfpgan(cfg: RunConfig, expect: str | None = None) -> tuple[torch.nn.Module, weights.Resolved]:
    """The GFP-GAN of ``restore.model``; ``expect``: the sha256 the run's preflight checked (see weights.resolve)."""
    resolved = weights.resolve(cfg.restore.model, cfg, expect)
    if resolved.spec.kind != "gfpgan":
        raise ValueError(f"restore.model {cfg.restore.model!r} is a {resolved.spec.kind} model, not GFP-GAN")
    sd = None if resolved.untrained else checkpoint_filter_fn(weights.load_torch_file(resolved.path))
    try:
        arch = resolved.spec.arch if resolved.spec.arch is not None else infer_arch(sd)
    except ValueError as e:
        raise WeightsError(f"{resolved.path}: {e}") from None
    with weights.seeded_init():  # the seeded stand-in for --untrained
        model = gfpgan_v1_clean(**arch)
    if sd is not None:
        try:
            load_state_dict_strict(model, sd, str(resolved.path))
        except ValueError as e:
            raise WeightsError(str(e)) from None
    return model.eval(), resolved


@dataclass
class Restored:
    faces: np.ndarray            # (n, 512, 512, 3) uint8 BGR
    similarity: np.ndarray       # (n,) float32 cosine(input, restored); NaN where not scored
    fp32_fallback: np.ndarray    # (n,) bool: recomputed in fp32 after a bad half-precision result


@dataclass
class _InFlight:
    """One micro-batch queued on the device; its results are on the host when ``done`` has passed."""
    start: int
    end: int
    similarity: torch.Tensor     # (m,) float32
    bad: torch.Tensor            # (m,) bool
    done: torch.cuda.Event | None


class FaceRestorer:
    def __init__(self, cfg: RunConfig, device: str | torch.device | None = None,
                 expected_weights: dict[str, str] | None = None):
        self.cfg = cfg
        expected = expected_weights or {}
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        self.device_name = f"cuda ({torch.cuda.get_device_name(self.device)})" if self.cuda else "cpu"
        self.dtype = resolve_dtype(cfg.restore.precision, self.device)
        if not self.cuda and self.dtype == torch.float16:
            raise ValueError("restore.precision=fp16 needs CUDA; use fp32 or bf16 on CPU")
        if not self.cuda:
            torch.set_num_threads(cfg.restore.cpu_threads or os.cpu_count() or 1)
        else:  # micro-batches have few distinct shapes: let cuDNN time its algorithms once per shape
            torch.backends.cudnn.benchmark = True
        # Host-to-device copies of the next micro-batch run on this side stream, one for the actor's life.
        self.copies = torch.cuda.Stream(self.device) if self.cuda else None
        model, self.resolved = build_gfpgan(cfg, expected.get(cfg.restore.model))
        self.fp32_model = model if self.dtype == torch.float32 else None
        self.model = model.to(self.device, self.dtype)
        self.channels_last = self.cuda if cfg.restore.channels_last is None else cfg.restore.channels_last
        if self.channels_last:
            self.model = to_channels_last(self.model)
        self.forward, self.fixed_shape = accelerate(self.model, cfg.restore.compile, cfg.restore.cuda_graphs)
        self.micro_batch = cfg.restore.micro_batch
        id_model = weights.identity_model(cfg.qa)
        self.id_weights = weights.resolve(id_model, cfg, expected.get(id_model))
        self.scorer = identity.build_scorer(cfg.qa, self.id_weights, self.device, self.dtype, self.channels_last)
        self.scorer32 = self.scorer if self.dtype == torch.float32 else None
        self.untrained = self.resolved.untrained or self.id_weights.untrained

    def _to_input(self, crops: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = crops.to(self.device).permute(0, 3, 1, 2).flip(1)  # BGR uint8 -> RGB; already there on CUDA
        x = x.to(dtype).div_(127.5).sub_(1.0)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _fp32(self) -> tuple[torch.nn.Module, object]:
        """The fallback model (from the original checkpoint, not the half weights) and scorer, built on first need."""
        if self.fp32_model is None:
            model = build_gfpgan(self.cfg, self.resolved.sha256)[0].to(self.device)
            self.fp32_model = to_channels_last(model) if self.channels_last else model
        if self.scorer32 is None:
            self.scorer32 = identity.build_scorer(self.cfg.qa, self.id_weights, self.device)
        return self.fp32_model, self.scorer32

    def _finish(self, x: torch.Tensor, out: torch.Tensor, theta: torch.Tensor, scorer):
        """Network input and output -> uint8 BGR faces and cosine(input, restored), still on the device."""
        rgb01 = out.clamp(-1, 1).add(1).mul(0.5)
        in01 = x.add(1).mul(0.5)
        emb = scorer.embed(identity.align_112(torch.cat([in01, rgb01]), torch.cat([theta, theta])))
        sim = identity.cosine(emb[: len(x)], emb[len(x):])
        faces = out.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).flip(1).permute(0, 2, 3, 1)
        return faces, sim

    def _launch(self, crops: torch.Tensor, theta: torch.Tensor, start: int, dest: torch.Tensor) -> _InFlight:
        """Queue one micro-batch (``crops`` already on the device) and its copies back to the host: the
        restored faces straight into ``dest`` (pinned on CUDA), the rest into small pinned buffers."""
        m = len(crops)
        if self.fixed_shape and m < self.micro_batch:  # compiled/graphed forwards specialise on the shape
            crops = torch.cat([crops, crops.new_zeros((self.micro_batch - m, *crops.shape[1:]))])
        with torch.inference_mode():
            x = self._to_input(crops, self.dtype)
            out = self.forward(x)[:m]
            x = x[:m]
            if self.dtype == torch.float32:
                bad = torch.zeros(m, dtype=torch.bool, device=self.device)
            else:  # NaN fails the comparison too
                bad = ~(out.abs().flatten(1).amax(1).float() <= _MAX_ABS_VALID)
            faces, sim = self._finish(x, out, theta, self.scorer)
        dest.copy_(faces, non_blocking=self.cuda)
        if not self.cuda:
            return _InFlight(start, start + m, sim.float(), bad, None)
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (sim, bad)]
        for h, t in zip(host, (sim.float(), bad)):
            h.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return _InFlight(start, start + m, *host, done)

    def _collect(self, job: _InFlight, src: torch.Tensor, theta: torch.Tensor, out: Restored) -> None:
        """Wait for a queued micro-batch, store it, and recompute in fp32 what half precision got wrong."""
        if job.done is not None:
            job.done.synchronize()
        sl = slice(job.start, job.end)
        out.similarity[sl] = job.similarity.numpy()
        redo = job.bad.numpy() | (~np.isfinite(out.similarity[sl]) if self.dtype != torch.float32 else False)
        if not redo.any():
            return
        idx = np.flatnonzero(redo) + job.start
        model, scorer = self._fp32()
        with torch.inference_mode():
            x = self._to_input(src[torch.from_numpy(idx)], torch.float32)
            faces, sim = self._finish(x, model(x), theta[torch.from_numpy(idx).to(theta.device)], scorer)
        out.faces[idx], out.similarity[idx] = faces.cpu().numpy(), sim.float().cpu().numpy()
        out.fp32_fallback[idx] = True
        log.info("%d face(s) recomputed in fp32 after a bad %s result", len(idx), self.dtype)

    def restore(self, crops: np.ndarray, arcface_mats: np.ndarray) -> Restored:
        """``crops``: (n,512,512,3) uint8 BGR; ``arcface_mats``: (n,2,3) from ``identity.arcface_matrix``."""
        n = len(crops)
        # On CUDA the restored faces are copied from the device straight into pinned memory that the
        # caller keeps (the Restore stage wraps it in its Arrow output): no second host copy, unless the
        # face queue cut a call's faces over two chunks (facequeue.py: then they are joined once).
        faces = torch.empty((n, 512, 512, 3), dtype=torch.uint8, pin_memory=self.cuda and n > 0)
        out = Restored(faces.numpy(), np.full(n, np.nan, np.float32), np.zeros(n, bool))
        if n == 0:
            return out
        with warnings.catch_warnings():  # read-only (a view of an Arrow batch) is fine: it is only read
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            src = torch.from_numpy(np.ascontiguousarray(crops))
        copies = self.copies
        theta = torch.from_numpy(identity.arcface_theta(arcface_mats)).to(self.device)

        def upload(a: int, b: int) -> torch.Tensor:
            """Start copying crops[a:b] to the device on the side stream (a no-op view on CPU).

            Pinned per micro-batch, while the device computes the one before, rather than the whole
            batch up front; the pinned block is not reused before its copy has finished.
            """
            if not self.cuda:
                return src[a:b]
            with torch.cuda.stream(copies):
                return src[a:b].pin_memory().to(self.device, non_blocking=True)

        start, mb = 0, self.micro_batch
        pending: _InFlight | None = None
        ahead = upload(0, min(n, mb))
        while start < n:
            end = min(n, start + mb)
            x = ahead
            if self.cuda:  # the compute stream waits for its copy, and owns the tensor from here on
                torch.cuda.current_stream(self.device).wait_stream(copies)
                x.record_stream(torch.cuda.current_stream(self.device))
            ahead = upload(end, min(n, end + mb)) if end < n else None
            try:
                job = self._launch(x, theta[start:end], start, faces[start:end])
            except torch.cuda.OutOfMemoryError:
                if mb == 1:
                    raise
                job = None
            if job is None:  # out of the except block, so its frames no longer hold device memory
                mb = self.micro_batch = max(1, mb // 2)
                del x, ahead
                torch.cuda.empty_cache()
                log.warning("CUDA out of memory; micro-batch lowered to %d", mb)
                ahead = upload(start, min(n, start + mb))
                continue
            # Read the previous micro-batch only now that this one is queued behind it.
            if pending is not None:
                self._collect(pending, src, theta, out)
            pending, start = job, end
        self._collect(pending, src, theta, out)
        return out
