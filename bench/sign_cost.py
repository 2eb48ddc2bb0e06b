"""What C2PA signing adds to Compose, per derivative: 1 MP and 12 MP JPEG masters with their derivatives.

    python bench/sign_cost.py

For each size, one thread, best of a few repeats, side by side in one run: the baseline is what Compose
already does to a finished derivative before the write (JPEG encode at quality 95 and the metadata
carry-over with exiv2); the new row is the signing (manifest with the master as parent ingredient,
actions and the faces assertion, ES256 with a throwaway certificate made here). Last line:
``sign_ms_1mp=<ms> sign_ms_12mp=<ms>``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from pipeline import imageio, metadata, provenance  # noqa: E402

SHARED = Path(os.environ.get("ARCHIVE_SHARED_DIR", REPO.parent / "shared"))


def best(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    from test_provenance import make_pki  # the throwaway CA of the tests

    pki = make_pki(Path(tempfile.mkdtemp(prefix="sign-cost-")))
    m = provenance.Material(pki["chain"].read_bytes(), pki["key"].read_bytes(), "es256")
    signer = provenance.Signer(m, "archive-restore bench; GFPGANv1.4 sha256:0123456789abcdef")
    photo = cv2.imread(str(SHARED / "images" / "whole" / "gfpgan_00.jpg"))
    facts = {"run_id": "bench", "fingerprint": "0" * 16, "faces": [
        {"box": {"x1": 10.0, "y1": 20.0, "x2": 200.0, "y2": 260.0}, "identity_similarity": 0.8, "qa": "pass",
         "action": "restored"}] * 2}
    print(f"{'master':<14}{'encode + metadata (baseline)':>30}{'+ C2PA sign':>14}{'sign / baseline':>17}{'bytes added':>13}")
    line = []
    for label, mp in (("1 MP JPEG", 1), ("12 MP JPEG", 12)):
        h, w = photo.shape[:2]
        f = (mp * 1e6 / (h * w)) ** 0.5
        px = cv2.resize(photo, (round(w * f), round(h * f)), interpolation=cv2.INTER_CUBIC)
        master = imageio.encode(px, ".jpg", 90)
        sha = hashlib.sha256(master).hexdigest()
        out = {}

        def baseline():
            data = imageio.encode(px, ".jpg", 95)
            out["d"], _ = metadata.carry(master, data, "JPEG", restored=True, software="archive-restore bench")

        def sign():
            out["s"] = signer.sign(out["d"], "JPEG", "a.jpg", master, "a.jpg", "JPEG", facts, sha)

        t_base = best(baseline)
        t_sign = best(sign)
        assert provenance.verify(out["s"], "JPEG").ok
        print(f"{label:<14}{t_base * 1e3:>27.1f} ms{t_sign * 1e3:>11.1f} ms{t_sign / t_base:>16.2f}x"
              f"{len(out['s']) - len(out['d']):>13,}")
        line.append(f"sign_ms_{mp}mp={t_sign * 1e3:.1f}")
    print(f"measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d}, one thread")
    print(" ".join(line))


if __name__ == "__main__":
    main()
