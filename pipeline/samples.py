"""A small sample archive for the demo, built offline from scikit-image's bundled public-domain
photographs (``astronaut``: NASA, public domain; ``camera``: the cameraman test image, released by MIT
for unrestricted use) in archive-like variants: degraded, grey, scanned (sepia, grain, 16-bit TIFF)."""

from __future__ import annotations

import os

import cv2
import numpy as np


def _degrade(bgr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur, downscale, noise and heavy JPEG: the kind of copy an archive holds of a lost original."""
    h, w = bgr.shape[:2]
    x = cv2.GaussianBlur(bgr, (0, 0), 1.5)
    x = cv2.resize(cv2.resize(x, (w // 3, h // 3), interpolation=cv2.INTER_AREA), (w, h),
                   interpolation=cv2.INTER_LINEAR)
    x = np.clip(x.astype(np.float32) + rng.normal(0, 6, x.shape), 0, 255).astype(np.uint8)
    return cv2.imdecode(cv2.imencode(".jpg", x, [cv2.IMWRITE_JPEG_QUALITY, 25])[1], cv2.IMREAD_COLOR)


def _scanned(bgr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sepia-toned, faded, grainy print scanned at 16 bits."""
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.float32) / 255
    grey = 0.15 + 0.7 * grey + rng.normal(0, 0.03, grey.shape)
    sepia = np.stack([grey * 0.78, grey * 0.93, grey * 1.05], axis=2)
    return (np.clip(sepia, 0, 1) * 65535).astype(np.uint16)


def build_sample_archive(folder: str, seed: int = 0) -> list[str]:
    """Write the sample archive into ``folder``; return the image paths."""
    from skimage import data

    rng = np.random.default_rng(seed)
    astronaut = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    camera = cv2.cvtColor(data.camera(), cv2.COLOR_GRAY2BGR)
    files = {
        "portraits/astronaut.png": (astronaut, []),
        "portraits/astronaut_degraded.jpg": (_degrade(astronaut, rng), [cv2.IMWRITE_JPEG_QUALITY, 92]),
        "portraits/astronaut_grey.png": (cv2.cvtColor(astronaut, cv2.COLOR_BGR2GRAY), []),
        "scans/astronaut_scan_1962.tif": (_scanned(astronaut, rng), []),
        "scans/cameraman_degraded.jpg": (_degrade(camera, rng), [cv2.IMWRITE_JPEG_QUALITY, 92]),
    }
    paths = []
    for rel, (pixels, params) in files.items():
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cv2.imwrite(path, pixels, params)
        paths.append(path)
    return paths
