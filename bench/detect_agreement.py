"""How far faces found on the device are from the CPU's, and what moves them: decoder or arithmetic.

    python bench/detect_agreement.py          # on a CUDA machine (on CPU every row compares the CPU with itself)

For the masters of tests/test_devicefaces.py's CUDA check, the largest landmark distance (pixels at the
detection scale) from the CPU's detection (OpenCV's decode, float32 on the CPU), for:
- net_tf32: the CPU's pixels, the network on the device with cuDNN's float32 convolutions in TF32 (PyTorch's
  default on Ampere and later);
- net_ieee: the same in IEEE float32;
- device: ``DeviceFaces`` end to end (the device's JPEG decoder, detection copy and network), TF32, against
  the CPU's detection on the same canvas (``devicefaces.CANVAS_STEP``);
- canvas: the CPU's detection on that canvas against the CPU's at the copy's own size (the canvas's share).
Measured on an H200 (BENCHMARKS.md): TF32 moves landmarks by 0.03 px at most, the decoder by up to 4.3 px
(nvJPEG upsamples chroma by replication: libjpeg-turbo with its interpolation off gave the same distances on
a CPU; tests/test_devicefaces.py checks that decode's replication).
The last line is ``worst_net_tf32=<px> worst_net_ieee=<px> worst_device=<px> worst_canvas=<px>``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline import imageio, weights  # noqa: E402
from pipeline.config import DetectConfig, RunConfig  # noqa: E402
from pipeline.devicefaces import DeviceFaces, canvas_side  # noqa: E402
from pipeline.faces import FaceDetector  # noqa: E402

SHARED = Path(os.environ.get("ARCHIVE_SHARED_DIR", ROOT.parent / "shared"))
MASTERS = ["whole/gfpgan_Blake_Lively.jpg", "whole/codeformer_00.jpg", "whole/gfpgan_00.jpg", "old/old_a.png",
           "whole/facexlib_test.jpg", "old/old_b.png"]


def _precision(p: str) -> None:
    torch.backends.cudnn.allow_tf32 = p == "tf32"  # the legacy switch: the new one makes reading it raise


def on_canvas(host: DeviceFaces, bgr: np.ndarray):
    """The CPU's detection with its copy on the device path's canvas."""
    det = host.detector
    scale, ch, cw = det.copy_size(*bgr.shape[:2])
    small = cv2.resize(bgr, (cw, ch), interpolation=cv2.INTER_AREA) if scale != 1.0 else bgr
    x = host._on_canvas(torch.from_numpy(np.ascontiguousarray(small)).permute(2, 0, 1).float(), canvas_side(ch),
                        canvas_side(cw))
    return det.select(det.detect_batch(x[None].contiguous(memory_format=torch.channels_last))[0], scale)[0]


def worst(a, b, scale) -> float:
    if len(a) != len(b):
        return float("inf")
    return max((float(np.abs(x.landmarks - y.landmarks).max()) * scale for x, y in zip(a, b)), default=0.0)


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(SHARED / "models/detection_mobilenet0.25_Final.pth", Path(tmp) / "detection_mobilenet0.25_Final.pth")
        cfg = RunConfig(weights_dir=tmp, allow_download=False, detect=DetectConfig(model="retinaface_mobile0.25"))
        res = weights.resolve(cfg.detect.model, cfg)
        cpu, dev = FaceDetector(cfg.detect, res), FaceDetector(cfg.detect, res, device=device)
        faces, host = DeviceFaces(dev, 4), DeviceFaces(cpu, 1)
        rows = {"net_tf32": [], "net_ieee": [], "device": [], "canvas": []}
        print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; torch {torch.__version__}; "
              f"cv2 {cv2.__version__}")
        for rel in MASTERS:
            bgr = imageio.to_bgr8(imageio.decode((SHARED / "images" / rel).read_bytes(), 10**9).pixels)
            data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # the CPU's decode of that JPEG
            ref, _ = cpu.detect(bgr)
            scale = cpu.copy_size(*bgr.shape[:2])[0]
            out = {}
            for p in ("tf32", "ieee"):
                _precision(p)
                out["net_" + p] = worst(dev.detect(bgr)[0], ref, scale)
            _precision("tf32")  # PyTorch's default, as the Restore actor runs
            found = faces([data], [1])[0]
            ref_canvas = on_canvas(host, bgr)
            out["device"] = worst(found.faces, ref_canvas, scale) if not isinstance(found, Exception) else float("inf")
            out["canvas"] = worst(ref_canvas, ref, scale)
            for k, v in out.items():
                rows[k].append(v)
            print(f"{rel:<34} {len(ref)} faces  " + "  ".join(f"{k} {v:6.3f} px" for k, v in out.items()))
        print(" ".join(f"worst_{k}={max(v):.3f}" for k, v in rows.items()))


if __name__ == "__main__":
    main()
