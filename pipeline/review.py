"""What a curator sees of each face, and which faces a curator rejected.

Review crops: per restored face, the same square region around it in the master ("before") and in the
derivative ("after"), as small JPEGs under ``review/<output key>/face-<i>-{before,after}.jpg``. The same
region of the real files, rather than the aligned 512x512 crops the network saw, so that what a curator
judges is what the archive holds: the paste-back, colour policy and surroundings included.

Rejections: a face a curator rejected (``decisions.py``) stays original when its image is processed
again from the same master bytes; faces are matched to the rejected ones by box overlap, so a
re-detection that moves a box by a few pixels still finds it.
"""

from __future__ import annotations

import json

import cv2
import numpy as np

from . import imageio

# The region around a face's box that a review crop shows: hair, ears and the paste-back's edge.
CONTEXT = 1.6
# Boxes overlapping at least this much (intersection over union) are the same face.
SAME_FACE_IOU = 0.5


def crop_box(bbox, width: int, height: int) -> tuple[int, int, int, int]:
    """The square around ``bbox`` (x1, y1, x2, y2 in master pixels) that a review crop shows, clipped."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half = max(x2 - x1, y2 - y1) * CONTEXT / 2
    a, b = max(0, int(np.floor(cx - half))), max(0, int(np.floor(cy - half)))
    c, d = min(width, int(np.ceil(cx + half))), min(height, int(np.ceil(cy + half)))
    return a, b, max(c, a + 1), max(d, b + 1)


def crop_preview(pixels: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """``box`` of ``pixels`` (any depth and channels) as 8-bit BGR whose long side is at most ``size``."""
    x0, y0, x1, y1 = box
    h, w = y1 - y0, x1 - x0
    region = pixels[y0:y1, x0:x1]  # whole rows: OpenCV takes the view as it is, without a copy
    if max(h, w) <= size:  # only ever downscaled: the page scales small faces up itself
        return imageio.to_bgr8(region)
    f = size / max(h, w)
    out = (max(1, round(w * f)), max(1, round(h * f)))
    # A preview: a crop at least 8x the preview's size each way is first sampled at the cell centres of a
    # grid 4x the preview's (INTER_NEAREST_EXACT: one gather in C rather than a strided numpy copy), whose
    # 4x4 samples per preview pixel INTER_AREA then averages on its whole-factor path. A 2,800 px crop to
    # 256 px: 14.7 -> ~2 ms.
    grid = (4 * out[0], 4 * out[1])
    if w >= 2 * grid[0] and h >= 2 * grid[1]:
        region = cv2.resize(region, grid, interpolation=cv2.INTER_NEAREST_EXACT)
    return cv2.resize(imageio.to_bgr8(region), out, interpolation=cv2.INTER_AREA)


def crop_jpeg(pixels: np.ndarray, box: tuple[int, int, int, int], size: int, quality: int) -> bytes:
    """``crop_preview`` as a JPEG."""
    return imageio.encode(crop_preview(pixels, box, size), ".jpg", quality)


def crop_names(output_key: str, index: int) -> tuple[str, str]:
    """Names below ``review/`` of face ``index``'s crops."""
    return f"{output_key}/face-{index}-before.jpg", f"{output_key}/face-{index}-after.jpg"


def iou(a, b) -> float:
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    iw, ih = max(0.0, min(ax2, bx2) - max(ax1, bx1)), max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def rejected_boxes(faces: list[dict] | None) -> str | None:
    """The boxes of the faces a curator rejected, as carried to the next processing (JSON), or None."""
    boxes = [f["bbox"] for f in faces or [] if f.get("review") == "rejected" and f.get("bbox") is not None]
    return json.dumps(boxes) if boxes else None


def mark_rejected(records: list[dict], rejected_json: str | None) -> int:
    """Mark (``review="rejected"``) each face record overlapping a rejected box; returns how many."""
    if not rejected_json:
        return 0
    boxes = json.loads(rejected_json)
    n = 0
    for r in records:
        if any(iou(r["bbox"], b) >= SAME_FACE_IOU for b in boxes):
            r["review"] = "rejected"
            n += 1
    return n
