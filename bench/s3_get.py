"""What bounds reading many small ledger files from S3 here: the reader, or the S3 server?

    python bench/s3_get.py [N] [moto|s3rver] [S3RVER_BIN]   # N result files of 50 rows (default 600, moto)

Writes N per-batch result files to an S3 server on 127.0.0.1 (`scale.s3_server`) and fetches their bytes (no
parsing) three ways, 16 threads where the client is synchronous, each twice in the order A B C C B A (means
printed): A `storage.read_small` (Arrow's C++ S3 client: HEAD + GET), B s3fs `cat_file` per file (one GET), C
s3fs `cat` of the whole list (one GET each, concurrent in s3fs's event loop). Per file: wall time, the
server's CPU and the reader's CPU. The server shares this machine's cores with the reader, so the wall per
file is bounded by their sum over the cores.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import _cpu_s, s3_server  # noqa: E402


def main() -> None:
    import s3fs

    from pipeline import ledger, storage
    from pipeline.config import StorageConfig

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 600
    server = sys.argv[2] if len(sys.argv) > 2 else "moto"
    proc, endpoint = s3_server(server, *sys.argv[3:4])
    try:
        cfg = StorageConfig(s3_endpoint_url=endpoint)
        out, t = "s3://scale/out", dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
        uris = []
        for f in range(n):
            ids = [f"img{f * 50 + i:08d}" for i in range(50)]
            uris.append(ledger.part_uri(out, f"r{f % 7}", ids))
            ledger.write_part(pa.table({
                "image_id": ids, "status": ["ok"] * 50, "fingerprint": ["fp"] * 50,
                "finished_at": pa.array([t] * 50, pa.timestamp("ms", tz="UTC")), "run_id": ["r"] * 50,
                "output_uri": [f"{out}/images/{i}.jpg" for i in ids], "access_uri": pa.nulls(50, pa.string()),
                "faces_skipped": [0] * 50}), uris[-1], cfg)
        reader = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
        keys = [u[len("s3://"):] for u in uris]

        def arrow():
            with ThreadPoolExecutor(16) as ex:
                return list(ex.map(lambda u: storage.read_small(u, cfg), uris))

        def s3fs_each():
            with ThreadPoolExecutor(16) as ex:
                return list(ex.map(reader.cat_file, keys))

        def s3fs_batch():
            got = reader.cat(keys)
            return [got[k] for k in keys]

        ways = {"A read_small (Arrow: HEAD + GET)": arrow, "B s3fs cat_file (GET)": s3fs_each,
                "C s3fs cat, one list (GET)": s3fs_batch}
        figures: dict[str, list] = {}
        for name in [*ways, *reversed(ways)]:
            t0, server0, client0 = time.perf_counter(), _cpu_s(proc.pid), _cpu_s()
            got = ways[name]()
            assert len(got) == n and all(len(g) > 100 for g in got)
            figures.setdefault(name, []).append(((time.perf_counter() - t0) / n, (_cpu_s(proc.pid) - server0) / n,
                                                 (_cpu_s() - client0) / n))
        for name, runs in figures.items():
            wall, cpu, client = (1000 * v for v in np.mean(runs, axis=0))
            print(f"{name:<34} wall {wall:5.2f} ms/file   {server} CPU {cpu:5.2f} ms   reader CPU {client:5.2f} ms")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
