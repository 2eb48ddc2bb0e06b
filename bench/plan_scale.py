"""Driver cost of planning a run over a huge archive: read the manifest, check the layout, load the ledger,
anti-join, and give every image a unique output key (keys.assign over the whole manifest and the ledger's
earlier names).

    python bench/plan_scale.py                 # 1M and 10M rows, 90% already done
    python bench/plan_scale.py --sizes 1000000

Synthetic manifests of s3:// URIs with an image_id column (what `archive-restore manifest` writes) and a
results ledger of 90% of the images spread over 10 Parquet files, on local disk. Each size is planned in
a fresh subprocess so its peak RSS (ru_maxrss, the interpreter included) is its own. The last line is
`plan_10m_s=<seconds> plan_10m_peak_gb=<GB>`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


COLLIDE_EVERY = 10_000  # one image in 10,000 is a case variant of its neighbour's name (IMG.TIF next to img.tif)


def make(folder: Path, n: int) -> None:
    from pipeline.keys import with_tag

    ids = pc.binary_join_element_wise("img", pa.array(np.arange(n)).cast(pa.string()), "")
    boxes = pa.array((np.arange(n) // 1000)).cast(pa.string())
    # Realistic clashes: keys.assign must suffix these, so planning also runs its exact path.
    variant = pa.array(np.arange(n) % COLLIDE_EVERY == 1)
    stems = pc.if_else(variant, pc.binary_join_element_wise(
        "IMG", pa.array(np.arange(n) - 1).cast(pa.string()), ""), ids)
    exts = pc.if_else(variant, pa.scalar(".TIF"), pa.scalar(".tif"))
    uris = pc.binary_join_element_wise("s3://museum/scans/box", boxes, "/", stems, exts, "")
    pq.write_table(pa.table({"uri": uris, "image_id": ids}), folder / "manifest.parquet")
    done = int(n * 0.9)
    res = folder / "out" / "_results"
    ts = pa.scalar(1_700_000_000_000, pa.timestamp("ms", tz="UTC"))
    for part, start in enumerate(range(0, done, -(-done // 10))):
        stop = min(done, start + -(-done // 10))
        k = stop - start
        d = res / f"run=r{part}"
        d.mkdir(parents=True)
        keys = pc.binary_join_element_wise("box", boxes[start:stop], "/", stems[start:stop], exts[start:stop], "")
        tagged = np.flatnonzero(variant[start:stop].to_numpy(zero_copy_only=False))  # an earlier run suffixed them
        keys = pc.replace_with_mask(keys, variant[start:stop], pa.array(
            [with_tag(keys[int(i)].as_py(), ids[start + int(i)].as_py()) for i in tagged], pa.string()))
        pq.write_table(pa.table({
            "image_id": ids[start:stop],
            "status": pa.array(["ok"] * k),
            "fingerprint": pa.array(["fp-current"] * k),
            "finished_at": pa.array([ts] * k, pa.timestamp("ms", tz="UTC")),
            "output_uri": pc.binary_join_element_wise(f"{folder}/out/images/", keys, ""),
            "access_uri": pa.nulls(k, pa.string()),
        }), d / "part.parquet")


def plan_once(folder: str) -> None:
    """Runs in a subprocess: the timed part, exactly what `job.run` does before any image work."""
    import resource

    from pipeline import layout, resume
    from pipeline.config import load_config
    from pipeline.manifest import read_manifest

    t0 = time.perf_counter()
    cfg = load_config(None, {"input.manifest": f"{folder}/manifest.parquet", "output.root": f"{folder}/out"},
                      environ={})
    m = read_manifest(cfg)
    layout.check(m.table["uri"], cfg.input.manifest, cfg.output.root, m.root)
    results = resume.load_for_planning(cfg.output.root, cfg.storage)
    plan = resume.plan(m.table, results, "fp-current", "missing", cfg.max_attempts)
    t_plan = time.perf_counter() - t0
    todo = resume.keyed_todo(plan, resume.assign_keys(m.table, m.root, cfg.output, resume.claims(results)))
    suffixed = pc.sum(pc.match_substring(todo["output_key"], "~")).as_py() or 0
    elapsed = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(json.dumps({"rows": m.table.num_rows, "todo": todo.num_rows, "s": elapsed, "plan_s": t_plan,
                      "peak_gb": peak_gb, "suffixed": suffixed}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--_plan", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._plan:
        plan_once(args._plan)
        return
    last = None
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="plan-scale-") as d:
            t0 = time.perf_counter()
            make(Path(d), n)
            made = time.perf_counter() - t0
            out = subprocess.run([sys.executable, __file__, "--_plan", d], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
        assert r["rows"] == n and r["todo"] == n - int(n * 0.9), r
        # Each case-variant pair still to do has no earlier name and no unchanged-path winner: both get suffixes.
        done = int(n * 0.9)
        pairs = [i for i in range(1, n, COLLIDE_EVERY) if i >= done]
        assert r["suffixed"] == sum(2 if i - 1 >= done else 1 for i in pairs), r
        print(f"{n:>11,} rows ({int(n * 0.9):,} done): {r['s']:6.1f} s (of which keys {r['s'] - r['plan_s']:.1f} s), "
              f"peak RSS {r['peak_gb']:5.2f} GB, todo {r['todo']:,}   (data generated in {made:.0f} s)")
        last = r
    print(f"plan_{args.sizes[-1] // 1_000_000}m_s={last['s']:.1f} plan_{args.sizes[-1] // 1_000_000}m_peak_gb={last['peak_gb']:.2f}")


if __name__ == "__main__":
    main()
