"""The review page at archive scale: generation time and page size for 20,000 faces, and how long the
page's own script takes to list, sort and filter them in headless Chromium (when installed).

    python bench/report_scale.py                # 20,000 faces (5,000 images x 4), 50 failed images
    python bench/report_scale.py --faces 2000

A synthetic output on local disk: result files of 100 images each (one per Compose batch, as a run
writes them) with every face's QA verdict, similarity and review crop URIs, plus a run record. The crops
themselves are not written (the page only links them). The last line is
`report_20k_faces_s=<seconds> page_mb=<MB>`, named for 20k whatever --faces says.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import report, runs  # noqa: E402
from pipeline.config import StorageConfig  # noqa: E402
from pipeline.schema import RESULT_SCHEMA  # noqa: E402

FACES_PER_IMAGE = 4


def make(out: Path, n_faces: int) -> None:
    rng = np.random.default_rng(0)
    n_images = n_faces // FACES_PER_IMAGE
    t0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
    rows = []
    for i in range(n_images + 50):
        failed = i >= n_images
        key = f"box{i // 1000:03d}/scan-{i:06d}.tif"
        faces = [] if failed else [
            {"bbox": [100.0, 100.0, 300.0, 320.0], "score": 0.99, "landmarks": [150.0] * 10,
             "identity_similarity": float(s), "qa": "flag" if s < 0.5 else "pass", "action": "restored",
             "fp32_fallback": False, "review": None,
             "review_before": str(out / "review" / key / f"face-{k}-before.jpg"),
             "review_after": str(out / "review" / key / f"face-{k}-after.jpg")}
            for k, s in enumerate(rng.uniform(0.2, 0.95, FACES_PER_IMAGE))]
        rows.append({"image_id": f"{i:016x}", "uri": f"s3://museum/scans/{key}",
                     "status": "decode_error" if failed else "ok",
                     "error": "truncated file (cut short inside its header): re-copy it from the source" if failed else None,
                     "output_uri": None if failed else str(out / "images" / key), "output_key": key,
                     "n_faces": len(faces), "faces": faces, "fingerprint": "f" * 16, "run_id": "20261101T000000Z-aaaaaa",
                     "untrained": False, "finished_at": t0 + timedelta(seconds=i * 0.05)})
    folder = out / "_results" / "run=20261101T000000Z-aaaaaa"
    folder.mkdir(parents=True)
    for p, start in enumerate(range(0, len(rows), 100)):
        pq.write_table(pa.Table.from_pylist(rows[start:start + 100], schema=RESULT_SCHEMA), folder / f"part-{p:05d}.parquet")
    runs.write_record(str(out), {"run_id": "20261101T000000Z-aaaaaa", "kind": "job", "state": "finished",
                                 "fingerprint": "f" * 16, "started_at": t0.isoformat(), "untrained": False,
                                 "weights": {"GFPGANv1.4": {"sha256": "e2cd4703ab14f4d01fd1383a8a8b266f9a5833dacee8e6a79d3bf21a1b6be5ad"}},
                                 "summary": {"images": len(rows), "faces": n_faces}}, StorageConfig())


PROBE = """<script>
window.addEventListener("load", () => {
  const t = {}, q = s => document.querySelector(s);
  let a = performance.now();
  const f = q("#qa-filter"); f.value = "flag"; f.dispatchEvent(new Event("change"));
  t.filter_ms = performance.now() - a;
  a = performance.now();
  const s = q("#sort"); s.value = "sim-desc"; s.dispatchEvent(new Event("change"));
  t.sort_ms = performance.now() - a;
  a = performance.now();
  q("#pager button.next").click();
  t.page_ms = performance.now() - a;
  t.load_ms = performance.timing.loadEventStart - performance.timing.navigationStart;
  t.shown = q("#shown").textContent;
  const pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(t);
  document.body.append(pre);
});
</script>"""


def browser_timings(page: Path) -> dict | None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        return None
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    r = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                        "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=300)
    m = re.search(r'<pre id="probe">(.*?)</pre>', r.stdout, re.S)
    return json.loads(m.group(1).replace("&quot;", '"')) if m else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", type=int, default=20_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        make(out, args.faces)
        t0 = time.perf_counter()
        page = Path(report.write_report(str(out), StorageConfig()))
        took = time.perf_counter() - t0
        mb = page.stat().st_size / 1e6
        print(f"faces={args.faces} images={args.faces // FACES_PER_IMAGE} failed=50 report_s={took:.2f} "
              f"page_mb={mb:.2f}")
        t = browser_timings(page)
        if t:
            print(f"chromium: load {t['load_ms']:.0f} ms; filter to flagged {t['filter_ms']:.1f} ms, sort "
                  f"{t['sort_ms']:.1f} ms, next page {t['page_ms']:.1f} ms ({t['shown']})")
        else:
            print("chromium: not installed, page script not timed")
    print(f"report_20k_faces_s={took:.3f} page_mb={mb:.3f}")


if __name__ == "__main__":
    main()
