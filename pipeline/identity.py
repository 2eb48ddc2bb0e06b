"""Identity QA: does the restored face still show the same person?

Both the input crop and its restoration are re-aligned to the ArcFace 112x112 five-point template
(one batched ``grid_sample`` on the restoring device), embedded, and compared by cosine similarity,
accumulated in fp32. Backends: facexlib's ArcFace IR-SE50 (torch, same device as GFP-GAN) or any ONNX
face-embedding model through onnxruntime (e.g. MobileFaceNet-ArcFace).
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from .config import QAConfig
from .weights import Resolved, load_torch_file, seeded_init

log = logging.getLogger(__name__)

ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)
# The 512 crop is area-downsampled by this factor before the warp, so that the ~0.28x resampling to
# 112 px does not alias (bilinear sampling alone reads 1 of every ~13 pixels).
_PRE = 4
_PRE_SIZE = 512 // _PRE


def arcface_matrix(landmarks_in_crop: np.ndarray) -> np.ndarray:
    """2x3 similarity from the (downsampled) 512-crop's pixel grid to the ArcFace 112 template."""
    lm = (landmarks_in_crop.astype(np.float32) + 0.5) / _PRE - 0.5
    m, _ = cv2.estimateAffinePartial2D(lm, ARCFACE_TEMPLATE_112, method=cv2.LMEDS)
    if m is None:
        raise ValueError("degenerate landmarks for identity alignment")
    return m.astype(np.float32)


def arcface_theta(matrices: np.ndarray, src: int = _PRE_SIZE, dst: int = 112) -> np.ndarray:
    """cv2-style pixel matrices (n,2,3) src->dst  ->  ``affine_grid`` thetas (dst normalised -> src normalised).

    Computed on the host once per batch: a matrix inverse on the device would make the host wait for it.
    """
    n = len(matrices)
    full = np.zeros((n, 3, 3))
    full[:, :2] = matrices
    full[:, 2, 2] = 1
    to_norm = np.array([[2 / src, 0, 1 / src - 1], [0, 2 / src, 1 / src - 1], [0, 0, 1]])
    from_norm = np.array([[dst / 2, 0, (dst - 1) / 2], [0, dst / 2, (dst - 1) / 2], [0, 0, 1]])
    return (to_norm @ np.linalg.inv(full) @ from_norm)[:, :2].astype(np.float32)


def align_112(crops: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """(n,3,512,512) RGB in [0,1] (any float dtype) + (n,2,3) thetas -> (n,3,112,112) fp32 ArcFace-aligned faces."""
    small = F.avg_pool2d(crops, _PRE).float()
    grid = F.affine_grid(theta.to(small.device), [crops.shape[0], 3, 112, 112], align_corners=False)
    return F.grid_sample(small, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ArcFaceIRSE50:
    """facexlib's ArcFace (IR-SE50, 512-d); input RGB normalised to [-1, 1].

    Runs in the restoring dtype (in fp32 it would cost a third of GFP-GAN's time on a tensor-core GPU);
    the final L2 normalisation, a 512-term sum of squares, runs in fp32.
    """

    def __init__(self, weights: Resolved, device: torch.device, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False):
        from facexlib.recognition.arcface_arch import Backbone

        with seeded_init():  # deterministic stand-in when untrained
            self.net = Backbone(num_layers=50, drop_ratio=0.6, mode="ir_se")
        if not weights.untrained:
            self.net.load_state_dict(load_torch_file(weights.path), strict=True)
        self.net.eval().to(device, dtype)
        self.dtype, self.channels_last = dtype, channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def embed(self, faces112: torch.Tensor) -> torch.Tensor:
        x = faces112.sub(0.5).div(0.5).to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        net = self.net
        feat = net.body(net.input_layer(x)).contiguous()  # its Flatten is a view: NCHW order, not NHWC
        return F.normalize(net.output_layer(feat).float(), dim=1)


class OnnxEmbedder:
    """An ONNX embedding model trained on ArcFace-aligned RGB faces with ImageNet normalisation.

    Embedding = f(x) + f(flip(x)), as its authors evaluate it. Models with a fixed batch of 1 run
    face by face.
    """

    MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
    STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)

    def __init__(self, weights: Resolved):
        import onnxruntime as ort

        if weights.untrained:
            raise ValueError("an ONNX identity model cannot be replaced by random weights; stage the file")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(weights.path), opts, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self.fixed_batch == 1:
            return np.concatenate([self.session.run(None, {self.input_name: x[i:i + 1]})[0] for i in range(len(x))])
        return self.session.run(None, {self.input_name: x})[0]

    def embed(self, faces112: torch.Tensor) -> torch.Tensor:
        x = ((faces112.float().cpu().numpy() - self.MEAN) / self.STD).astype(np.float32)
        e = self._run(x) + self._run(np.ascontiguousarray(x[:, :, :, ::-1]))
        return torch.from_numpy(e).float()


def build_scorer(cfg: QAConfig, weights: Resolved, device: torch.device, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False):
    """The configured embedder; ``dtype``/``channels_last`` apply to the torch backend (ONNX runs fp32 on CPU)."""
    if cfg.identity_backend == "onnx":
        return OnnxEmbedder(weights)
    return ArcFaceIRSE50(weights, device, dtype, channels_last)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=1)
