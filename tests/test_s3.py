"""The job against a real S3 endpoint on 127.0.0.1 (moto's server mode), through s3fs and pyarrow."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import imageio, job, resume
from pipeline.config import StorageConfig, load_config
from pipeline.manifest import build_manifest

from conftest import E2E_IMAGES, IMAGES, TINY_GFPGAN, test_overrides
from test_faces import EXPECTED

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_job_reads_and_writes_s3(ray_local, s3_endpoint, s3fs_client, weights_dir, tmp_path):
    fs = s3fs_client
    for bucket in ("museum", "models"):
        fs.mkdir(bucket)
    for rel in E2E_IMAGES[:5]:
        fs.put_file(str(IMAGES / rel), f"museum/scans/{rel.upper()}")  # upper-case keys and extensions
    fs.pipe_file("museum/scans/broken.jpg", b"\xff\xd8\xff garbage")
    for f in weights_dir.iterdir():
        fs.put_file(str(f.resolve()), f"models/{f.name}")

    storage = StorageConfig(s3_endpoint_url=s3_endpoint)
    n = build_manifest("s3://museum/scans/", "s3://museum/manifests/scans.parquet", storage)
    assert n == 6
    overrides = test_overrides("s3://models", "s3://museum/restored", "s3://museum/manifests/scans.parquet",
                               **{"storage.s3_endpoint_url": s3_endpoint})
    cfg = load_config(None, overrides, environ={})
    record = job.run(cfg)

    res = resume.load_results("s3://museum/restored", storage).to_pylist()
    assert len(res) == 6
    by_key = {r["uri"].split("/scans/")[1]: r for r in res}
    assert by_key["broken.jpg"]["status"] == "decode_error"
    for rel in E2E_IMAGES[:5]:
        r = by_key[rel.upper()]
        assert r["n_faces"] == EXPECTED[rel]
        assert r["output_uri"] == f"s3://museum/restored/images/{rel.upper()}"
        data = fs.cat_file(r["output_uri"])
        assert imageio.decode(data, 10**9).width == r["width"]
    runs = json.loads(fs.cat_file(f"museum/restored/_runs/{record['run_id']}.json"))
    assert runs["state"] == "finished" and runs["weights"][str(TINY_GFPGAN)]["untrained"] is False
    # pyarrow reads the ledger straight from S3, as a user would
    t = pq.read_table("museum/restored/_results", filesystem=pa.fs.PyFileSystem(pa.fs.FSSpecHandler(fs)))
    assert t.num_rows == 6
    # nothing written outside the output prefix; originals untouched
    assert sorted(fs.ls("museum")) == ["museum/manifests", "museum/restored", "museum/scans"]
    assert fs.cat_file(f"museum/scans/{E2E_IMAGES[0].upper()}") == (IMAGES / E2E_IMAGES[0]).read_bytes()

    assert job.run(cfg)["plan"]["todo"] == 0  # resume on S3: nothing left to do

    # Curator review on S3: the page beside the results links the crops relatively; a decisions file on S3
    # rejects every face of a PNG, whose derivative becomes the master's pixels again.
    png = by_key["WHOLE/CODEFORMER_02.PNG"]
    assert all(fs.exists(f["review_after"]) for f in png["faces"])
    fs.pipe_file("museum/decisions.csv", ("image_id,face,decision\n" + "".join(
        f"{png['image_id']},{i},reject\n" for i in range(len(png["faces"])))).encode())
    from click.testing import CliRunner
    from pipeline.cli import cli
    r = CliRunner().invoke(cli, ["review", "apply", "s3://museum/restored", "s3://museum/decisions.csv",
                                 "--s3-endpoint-url", s3_endpoint])
    assert r.exit_code == 0 and "1 images changed (4 faces reverted" in r.output, r.output
    assert (imageio.decode(fs.cat_file(png["output_uri"]), 10**9).pixels ==
            imageio.decode((IMAGES / "whole/codeformer_02.png").read_bytes(), 10**9).pixels).all()
    r = CliRunner().invoke(cli, ["report", "s3://museum/restored", "--s3-endpoint-url", s3_endpoint])
    assert r.exit_code == 0 and r.output.strip().splitlines()[-1] == "s3://museum/restored/report/index.html"
    page = fs.cat_file("museum/restored/report/index.html").decode()
    assert '"../review/WHOLE/CODEFORMER_02.PNG/face-0-before.jpg"' in page


def test_output_inside_input_is_refused(s3_endpoint, s3fs_client, weights_dir):
    from pipeline.errors import StorageError

    s3fs_client.mkdir("lib")
    s3fs_client.pipe_file("lib/scans/a.jpg", b"x")
    pq_path = "s3://lib/m.parquet"
    storage = StorageConfig(s3_endpoint_url=s3_endpoint)
    build_manifest("s3://lib/scans/", pq_path, storage)
    cfg = load_config(None, test_overrides(weights_dir, "s3://lib/scans/restored", pq_path,
                                           **{"storage.s3_endpoint_url": s3_endpoint}), environ={})
    with pytest.raises(StorageError, match="inside the input"):
        job.run(cfg)
