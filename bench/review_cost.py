"""What review crops cost Compose: one image's Compose step with ``review.crops`` on and off, interleaved.

    python bench/review_cost.py            # a 12 MP JPEG master with 4 faces, 5 repeats each way

The master is a real photograph (../shared/images/whole/codeformer_00.jpg, 4 faces) scaled to 12 MP and
saved as JPEG q95; faces are detected with the real RetinaFace mobile0.25 and "restored" by a stand-in
(the input crops), so only Compose is timed: read, decode, paste, encode, metadata, write, and the
crops. Local disk, one thread. The last line is `review_crops_ms_per_face=<ms> compose_share=<fraction>`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.config import load_config  # noqa: E402
from pipeline.stages import Compose, DecodeDetect  # noqa: E402

SHARED = Path(os.environ.get("ARCHIVE_SHARED_DIR", ROOT.parent / "shared"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--megapixels", type=float, default=12.0)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = cv2.imread(str(SHARED / "images/whole/codeformer_00.jpg"))
        f = (args.megapixels * 1e6 / (src.shape[0] * src.shape[1])) ** 0.5
        big = cv2.resize(src, (round(src.shape[1] * f), round(src.shape[0] * f)), interpolation=cv2.INTER_CUBIC)
        (tmp / "in").mkdir()
        cv2.imwrite(str(tmp / "in" / "master.jpg"), big, [cv2.IMWRITE_JPEG_QUALITY, 95])
        (tmp / "w").mkdir()
        os.symlink(SHARED / "models/detection_mobilenet0.25_Final.pth", tmp / "w/detection_mobilenet0.25_Final.pth")
        base = {"weights_dir": str(tmp / "w"), "allow_download": False, "untrained": True,
                "detect.model": "retinaface_mobile0.25"}
        cfgs = {on: load_config(None, {**base, "output.root": str(tmp / f"out-{on}"), "review.crops": on},
                                environ={}) for on in (False, True)}
        batch = {"image_id": np.array(["m"], object), "uri": np.array([str(tmp / "in" / "master.jpg")], object)}
        detected = DecodeDetect(cfgs[True], root=str(tmp / "in") + "/")(batch)
        row = detected.to_pylist()[0]
        n = row["n_faces"]
        row.update(restored=row["crops"], crops=None)
        faces = json.loads(row["faces_json"])
        for face in faces["faces"]:
            face.update(identity_similarity=0.9, qa="pass", action="restored", fp32_fallback=False)
        row["faces_json"] = json.dumps(faces)
        stages = {on: Compose(cfg, "bench", "fp", False) for on, cfg in cfgs.items()}
        times = {False: [], True: []}
        for _ in range(args.repeats):
            for on in (False, True):
                t0 = time.perf_counter()
                out = stages[on](pa.Table.from_pylist([row], schema=detected.schema))
                times[on].append(time.perf_counter() - t0)
                assert out.column("status")[0].as_py() == "ok", out.column("error")[0].as_py()
        off, on = statistics.median(times[False]), statistics.median(times[True])
        per_face = (on - off) / n * 1000
        print(f"master {big.shape[1]}x{big.shape[0]} ({big.shape[0] * big.shape[1] / 1e6:.1f} MP JPEG), {n} faces; "
              f"Compose median of {args.repeats}: crops off {off * 1000:.0f} ms, on {on * 1000:.0f} ms")
    print(f"review_crops_ms_per_face={max(per_face, 0.0):.3f} compose_share={max(on - off, 0.0) / on:.3f}")


if __name__ == "__main__":
    main()
