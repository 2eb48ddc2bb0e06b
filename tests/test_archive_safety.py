"""Issue 9: the archive's guarantees, each defect found through the interface a user touches (job.run, the
CLI, load_results, load_config, the stages). Every test here failed on the code before its fix."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import time
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline import compaction, imageio, job, resume, storage, weights
from pipeline.cli import cli
from pipeline.config import RunConfig, StorageConfig, load_config
from pipeline.errors import StorageError, WeightsError

from conftest import IMAGES, MODELS, REPO, need, test_overrides

SMALL = ["whole/codeformer_03.jpg", "whole/codeformer_04.jpg", "old/old_d.png"]  # 1, 1, 0 faces


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _copy_small(dst, names=SMALL):
    out = []
    for rel in names:
        p = dst / os.path.basename(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(need(IMAGES / rel), p)
        out.append(p)
    return out


def _csv(path, uris):
    pacsv.write_csv(pa.table({"uri": [str(u) for u in uris]}), path)
    return path


# ------------------------------------------------------------------------------------- 1. originals

def _layout(kind, tmp_path):
    """(manifest, output, the originals' folder) for a layout where a write of the job would land on an input."""
    x = tmp_path / "x"
    if kind == "images_under_output":          # -o /x with the manifest listing /x/images/a.jpg
        files = _copy_small(x / "images")
        return _csv(tmp_path / "m.csv", files), x, x / "images"
    if kind == "through_symlinked_folder":     # /x/link -> /x/images
        files = _copy_small(x / "images")
        os.symlink(x / "images", tmp_path / "link")
        return _csv(tmp_path / "m.csv", [tmp_path / "link" / f.name for f in files]), x, x / "images"
    if kind == "through_dotdot":                # /x/other/../images/a.jpg
        files = _copy_small(x / "images")
        (x / "other").mkdir()
        return _csv(tmp_path / "m.csv", [f"{x}/other/../images/{f.name}" for f in files]), x, x / "images"
    if kind == "output_is_symlink_to_input":   # -o /out where /out -> /in
        files = _copy_small(tmp_path / "in")
        os.symlink(tmp_path / "in", tmp_path / "out")
        return _csv(tmp_path / "m.csv", files), tmp_path / "out", tmp_path / "in"
    if kind == "output_inside_input":
        files = _copy_small(tmp_path / "in")
        return _csv(tmp_path / "m.csv", files), tmp_path / "in" / "restored", tmp_path / "in"
    raise AssertionError(kind)


LAYOUTS = ["images_under_output", "through_symlinked_folder", "through_dotdot", "output_is_symlink_to_input",
           "output_inside_input"]


@pytest.mark.parametrize("kind", LAYOUTS)
def test_layouts_that_would_write_onto_originals_are_refused(kind, ray_local, weights_dir, tmp_path):
    manifest, out, originals = _layout(kind, tmp_path)
    before = _tree(originals)
    cfg = load_config(None, test_overrides(weights_dir, out, manifest), environ={})
    with pytest.raises(StorageError, match="input"):
        job.run(cfg)
    assert _tree(originals) == before, "an original was written"


def test_input_under_an_s3_output_is_refused(s3_endpoint, s3fs_client, weights_dir):
    fs = s3fs_client
    fs.mkdir("lay")
    fs.pipe_file("lay/x/images/a.jpg", (IMAGES / SMALL[0]).read_bytes())
    fs.pipe_file("lay/m.csv", b"uri\ns3://lay/x/images/a.jpg\n")
    cfg = load_config(None, test_overrides(weights_dir, "s3://lay/x", "s3://lay/m.csv",
                                           **{"storage.s3_endpoint_url": s3_endpoint}), environ={})
    with pytest.raises(StorageError, match="input"):
        job.run(cfg)
    assert fs.cat_file("lay/x/images/a.jpg") == (IMAGES / SMALL[0]).read_bytes()
    assert not fs.exists("lay/x/_runs") and not fs.exists("lay/x/_results")


def test_compose_never_writes_onto_its_own_input(weights_dir, tmp_path):
    """The last guard, at the write itself: even when a row's key leads onto its own input."""
    from pipeline.stages import Compose, DecodeDetect, Restore

    out = tmp_path / "out"
    (src,) = _copy_small(out / "images", SMALL[1:2])
    cfg = load_config(None, test_overrides(weights_dir, out), environ={})
    batch = {"image_id": np.array(["a"], object), "uri": np.array([str(src)], object)}
    detected = DecodeDetect(cfg, root=str(out / "images") + "/")(batch)
    before = src.read_bytes()
    row = Compose(cfg, "r", "f", True)(Restore(cfg)(detected)).to_pylist()[0]
    assert src.read_bytes() == before
    assert row["status"] == "write_error" and "input" in row["error"] and row["output_uri"] is None


# ------------------------------------------------------------------------------------- 2. read-only reads

def _ledger(out, rows=3):
    d = out / "_results" / "run=r1"
    d.mkdir(parents=True)
    t = pa.table({"image_id": [f"i{k}" for k in range(rows)], "status": ["ok"] * rows, "fingerprint": ["f"] * rows,
                  "n_faces": pa.array([1] * rows, pa.int32()), "run_id": ["r1"] * rows,
                  "finished_at": pa.array([0] * rows, pa.timestamp("ms", tz="UTC"))})
    pq.write_table(t, d / "good.parquet")
    (out / "_runs").mkdir()
    (out / "_runs" / "r1.json").write_text(json.dumps({"run_id": "r1", "state": "finished", "fingerprint": "f"}))
    return d


def test_reading_the_ledger_never_changes_it(tmp_path):
    out = tmp_path / "out"
    d = _ledger(out)
    # A file a writer has not finished (no footer yet), as another process sees it mid-write.
    (d / "in-progress.parquet").write_bytes((d / "good.parquet").read_bytes()[:40])
    before = _tree(out)
    assert resume.load_results(str(out), StorageConfig()).num_rows == 3
    r = CliRunner().invoke(cli, ["status", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["images"] == 3
    assert _tree(out) == before
    r = CliRunner().invoke(cli, ["report", str(out)])
    assert r.exit_code == 0, r.output
    after = _tree(out)
    after.pop("report/index.html")
    assert after == before


def _s3_ledger(fs, bucket):
    fs.mkdir(bucket)
    t = pa.table({"image_id": ["a", "b"], "status": ["ok", "no_face"], "fingerprint": ["f", "f"],
                  "n_faces": pa.array([1, 0], pa.int32()), "run_id": ["r1", "r1"],
                  "finished_at": pa.array([0, 0], pa.timestamp("ms", tz="UTC"))})
    sink = pa.BufferOutputStream()
    pq.write_table(t, sink)
    fs.pipe_file(f"{bucket}/out/_results/run=r1/part-0.parquet", sink.getvalue().to_pybytes())
    fs.pipe_file(f"{bucket}/out/_results/run=r1/part-1.parquet", sink.getvalue().to_pybytes())
    return sorted(fs.find(f"{bucket}/out"))


def test_transient_ledger_errors_are_retried_and_hide_nothing(s3_endpoint, s3fs_client):
    from s3_fault_proxy import FaultProxy, Rule

    keys = _s3_ledger(s3fs_client, "ledger-flaky")
    # Each result file answers its first 5 requests with 500 InternalError: as many as the S3 client tries by default.
    rule = Rule(r"/_results/.*parquet", first=("500", 5))
    with FaultProxy(s3_endpoint, [rule], seed=3) as proxy:
        r = CliRunner().invoke(cli, ["status", "s3://ledger-flaky/out", "--json", "--s3-endpoint-url", proxy.url])
    assert proxy.injected > 0
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["result_rows"] == 4
    assert sorted(s3fs_client.find("ledger-flaky/out")) == keys


def test_an_unreadable_result_file_fails_the_command_and_stays_put(s3_endpoint, s3fs_client):
    from s3_fault_proxy import FaultProxy, Rule

    keys = _s3_ledger(s3fs_client, "ledger-denied")
    with FaultProxy(s3_endpoint, [Rule(r"part-1\.parquet", {"403": 1.0}, methods=("GET",))]) as proxy:
        r = CliRunner().invoke(cli, ["status", "s3://ledger-denied/out", "--s3-endpoint-url", proxy.url])
    assert r.exit_code == 1 and "part-1.parquet" in r.output and r.output.startswith("Error: "), r.output
    assert sorted(s3fs_client.find("ledger-denied/out")) == keys


# ------------------------------------------------------------------------------------- 3. one run at a time

def _cli_args(manifest, out, weights_dir, *extra):
    o = test_overrides(weights_dir, out)
    return ["run", "-m", str(manifest), "-o", str(out), "--weights-dir", o["weights_dir"], "--untrained",
            "--detector", "retinaface_mobile0.25", "--set", f"restore.model={o['restore.model']}",
            "--set", "allow_download=false", "--set", "cluster.num_cpus=2", "--set", "cluster.num_gpus=1",
            "--set", "cluster.heartbeat_s=1", "--set", "detect.device=cpu", *extra]


def _popen(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), **kw)


@pytest.mark.slow
def test_two_runs_started_together_do_the_work_once(weights_dir, tmp_path):
    files = _copy_small(tmp_path / "in")
    manifest = _csv(tmp_path / "m.csv", files)
    out = tmp_path / "out"
    first = _popen(_cli_args(manifest, out, weights_dir))
    time.sleep(0.05)
    second = _popen(_cli_args(manifest, out, weights_dir))
    logs = [p.communicate(timeout=400)[0] for p in (first, second)]
    codes = sorted(p.returncode for p in (first, second))
    assert codes == [0, 1], logs
    refused = logs[[first.returncode, second.returncode].index(1)]
    assert "Error: " in refused and "running" in refused, refused
    res = resume.load_results(str(out), StorageConfig())
    assert sorted(res["image_id"].to_pylist()) == sorted(set(res["image_id"].to_pylist()))
    assert res.num_rows == len(files)


# ------------------------------------------------------------------------------------- 4-5. weights

def test_a_cached_s3_weights_file_follows_the_remote_file(s3_endpoint, s3fs_client, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fs = s3fs_client
    fs.mkdir("wts")
    det = need(MODELS / "detection_mobilenet0.25_Final.pth").read_bytes()
    fs.pipe_file("wts/detection_mobilenet0.25_Final.pth", det)
    cfg = RunConfig(weights_dir="s3://wts", allow_download=False,
                    storage=StorageConfig(s3_endpoint_url=s3_endpoint))
    first = weights.resolve("retinaface_mobile0.25", cfg)
    assert first.sha256 == hashlib.sha256(det).hexdigest()
    fs.pipe_file("wts/detection_mobilenet0.25_Final.pth", det + b"\0")  # replaced on the store
    again = weights.resolve("retinaface_mobile0.25", cfg)
    assert again.sha256 == hashlib.sha256(det + b"\0").hexdigest()


def test_a_stage_refuses_weights_other_than_those_preflight_checked(weights_dir, tmp_path):
    from pipeline.stages import DecodeDetect

    cfg = load_config(None, test_overrides(weights_dir, tmp_path / "out"), environ={})
    with pytest.raises(WeightsError) as e:
        DecodeDetect(cfg, root="/", expected_weights={"retinaface_mobile0.25": "0" * 64})
    real = hashlib.sha256(need(MODELS / "detection_mobilenet0.25_Final.pth").read_bytes()).hexdigest()
    assert "detection_mobilenet0.25_Final.pth" in str(e.value) and real in str(e.value) and "0" * 64 in str(e.value)


def test_registry_requires_only_publisher_checksums(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "w").mkdir()
    # What a user online gets from facexlib's release may differ from the fork's copy in ../shared: not refused.
    (tmp_path / "w" / "detection_mobilenet0.25_Final.pth").write_bytes(b"facexlib's own release file")
    r = weights.resolve("retinaface_mobile0.25", RunConfig(weights_dir=str(tmp_path / "w"), allow_download=False))
    assert r.size == len(b"facexlib's own release file")
    assert "GFPGAN-tiny" not in weights.REGISTRY  # test-only models stay out of the production registry


# ------------------------------------------------------------------------------------- 6. collisions

@pytest.mark.slow
def test_images_never_share_a_derivative(ray_local, weights_dir, tmp_path):
    face = need(IMAGES / "whole/codeformer_04.jpg").read_bytes()
    other = need(IMAGES / "whole/codeformer_03.jpg").read_bytes()
    src = tmp_path / "in"
    src.mkdir()
    nfc, nfd = unicodedata.normalize("NFC", "Müller.jpg"), unicodedata.normalize("NFD", "Müller.jpg")
    names = {"a?b.jpg": face, "a*b.jpg": other, "x.jpg ": face, "x.jpg": other, nfc: face, nfd: other}
    for n, data in names.items():
        (src / n).write_bytes(data)
    png = cv2_png(other)
    (src / "p.png").write_bytes(cv2_png(face))
    (src / "p.tif").write_bytes(cv2_tif(other))
    uris = [src / n for n in names] + [src / "p.png", src / "p.tif"]
    out = tmp_path / "out"
    cfg = load_config(None, test_overrides(weights_dir, out, _csv(tmp_path / "m.csv", uris),
                                           **{"output.format": "jpeg", "output.access_copy": True}), environ={})
    job.run(cfg)
    rows = resume.load_results(str(out), StorageConfig()).to_pylist()
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows), [(r["uri"], r["error"]) for r in rows]
    assert len({r["output_uri"] for r in rows}) == 8 and len({r["access_uri"] for r in rows}) == 8
    for r in rows:
        assert hashlib.sha256(open(r["output_uri"], "rb").read()).hexdigest() == r["out_sha256"], r["uri"]
    assert png  # both PNG spellings were made from real photographs


def cv2_png(jpeg: bytes) -> bytes:
    import cv2
    return cv2.imencode(".png", cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR))[1].tobytes()


def cv2_tif(jpeg: bytes) -> bytes:
    import cv2
    return cv2.imencode(".tif", cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR))[1].tobytes()


# ------------------------------------------------------------------------------------- 7. errors are data

@pytest.mark.slow
def test_a_malformed_uri_is_one_error_row(ray_local, weights_dir, tmp_path):
    files = _copy_small(tmp_path / "in")
    m = tmp_path / "m.csv"
    pacsv.write_csv(pa.table({"uri": ["s3:///a.jpg", "nosuch://x/y.jpg"] + [str(f) for f in files]}), m)
    out = tmp_path / "out"
    record = job.run(load_config(None, test_overrides(weights_dir, out, m), environ={}))
    rows = {r["uri"]: r for r in resume.load_results(str(out), StorageConfig()).to_pylist()}
    assert rows["s3:///a.jpg"]["status"] == "read_error" and rows["nosuch://x/y.jpg"]["status"] == "read_error"
    assert [rows[str(f)]["status"] for f in files] == ["ok", "ok", "no_face"]
    assert record["state"] == "finished"


def test_compose_failures_of_any_kind_are_rows(weights_dir, tmp_path, monkeypatch):
    import cv2

    from pipeline import metadata
    from pipeline.stages import Compose, DecodeDetect, Restore

    files = _copy_small(tmp_path / "in", SMALL[:2] + ["whole/codeformer_05.jpg"])
    cfg = load_config(None, test_overrides(weights_dir, tmp_path / "out"), environ={})
    batch = {"image_id": np.array(["a", "b", "c"], object), "uri": np.array([str(f) for f in files], object)}
    restored = Restore(cfg)(DecodeDetect(cfg, root=str(tmp_path / "in") + "/")(batch))
    real_carry, real_encode = metadata.carry, imageio.encode
    master_a, master_b = files[0].read_bytes(), files[1].read_bytes()

    def carry(master, *a, **k):
        if master == master_a:
            raise RuntimeError("exiv2 says no")
        return real_carry(master, *a, **k)

    def encode(px, ext, *a, **k):
        if px.shape[:2] == imageio.decode(master_b, 10**9).pixels.shape[:2]:
            raise cv2.error("encoder failed")
        return real_encode(px, ext, *a, **k)

    monkeypatch.setattr(metadata, "carry", carry)
    monkeypatch.setattr(imageio, "encode", encode)
    rows = Compose(cfg, "r", "f", True)(restored).to_pylist()
    assert [r["status"] for r in rows] == ["write_error", "write_error", "ok"]
    assert "exiv2 says no" in rows[0]["error"] and "encoder failed" in rows[1]["error"]
    assert all(f["action"] != "restored" for r in rows[:2] for f in r["faces"])


def test_one_bad_image_does_not_fail_its_restore_batch(weights_dir, tmp_path):
    from pipeline.stages import DecodeDetect, Restore

    files = _copy_small(tmp_path / "in", ["whole/codeformer_03.jpg", "whole/codeformer_04.jpg",
                                          "whole/codeformer_05.jpg"])
    cfg = load_config(None, test_overrides(weights_dir, tmp_path / "out"), environ={})
    batch = {"image_id": np.array(["a", "b", "c"], object), "uri": np.array([str(f) for f in files], object)}
    rows = DecodeDetect(cfg, root=str(tmp_path / "in") + "/")(batch).to_pylist()
    faces = json.loads(rows[1]["faces_json"])
    faces["faces"][0]["arcface"] = [float("nan")] * 5  # a malformed alignment: this image's faces cannot run
    rows[1]["faces_json"] = json.dumps(faces)
    out = Restore(cfg)(pa.Table.from_pylist(rows)).to_pylist()
    assert [r["status"] for r in out] == ["ok", "restore_error", "ok"]
    assert out[0]["restored"] is not None and out[2]["restored"] is not None


def test_deterministic_failures_stop_after_max_attempts():
    t0 = pa.array([0, 1, 2], pa.timestamp("ms", tz="UTC"))
    results = pa.table({"image_id": ["a", "a", "a"], "status": ["write_error"] * 3, "fingerprint": ["fp"] * 3,
                        "finished_at": t0})
    manifest = pa.table({"image_id": ["a", "b"], "uri": ["/x/a.jpg", "/x/b.jpg"]})
    plan = resume.plan(manifest, results, "fp", "missing", max_attempts=3)
    assert plan.todo["image_id"].to_pylist() == ["b"] and plan.counts["gave_up"] == 1
    assert resume.plan(manifest, results, "fp", "failed", max_attempts=3).todo["image_id"].to_pylist() == ["a", "b"]
    assert resume.plan(manifest, results, "fp", "missing", max_attempts=4).todo["image_id"].to_pylist() == ["a", "b"]


# ------------------------------------------------------------------------------------- 8. preflight reads

def test_a_run_without_read_access_fails_before_any_work(s3_endpoint, s3fs_client, weights_dir):
    from s3_fault_proxy import FaultProxy, Rule

    fs = s3fs_client
    fs.mkdir("denied")
    for rel in SMALL:
        fs.pipe_file(f"denied/scans/{os.path.basename(rel)}", (IMAGES / rel).read_bytes())
    fs.pipe_file("denied/m.csv", ("uri\n" + "".join(f"s3://denied/scans/{os.path.basename(r)}\n"
                                                    for r in SMALL)).encode())
    with FaultProxy(s3_endpoint, [Rule(r"^/denied/scans/", {"403": 1.0}, methods=("GET",))]) as proxy:
        cfg = load_config(None, test_overrides(weights_dir, "s3://denied/out", "s3://denied/m.csv",
                                               **{"storage.s3_endpoint_url": proxy.url}), environ={})
        with pytest.raises(StorageError, match="cannot read"):
            job.run(cfg)
    assert not fs.exists("denied/out/_results")


# ------------------------------------------------------------------------------------- 9. incremental results

@pytest.mark.slow
def test_results_land_per_compose_batch(ray_local, weights_dir, tmp_path, monkeypatch):
    """A block of 8 images must not wait for its last image before any of its rows are recorded."""
    files = _copy_small(tmp_path / "in", ["whole/codeformer_03.jpg", "whole/codeformer_04.jpg",
                                          "whole/codeformer_05.jpg", "old/old_d.png"])
    dup = [shutil.copy(f, f.with_name("copy-" + f.name)) for f in files]
    out = tmp_path / "out"
    cfg = load_config(None, test_overrides(weights_dir, out, _csv(tmp_path / "m.csv", files + dup),
                                           **{"cluster.rows_per_block": 8, "cluster.compose_batch_size": 2}),
                      environ={})
    fold = compaction.fold_loose
    monkeypatch.setattr(compaction, "fold_loose", lambda *a, **k: None)  # to see the files as they landed
    record = job.run(cfg)
    assert record["ledger_fold"] is None
    parts = list((out / "_results").rglob("*.parquet"))
    assert len(parts) >= 4, parts
    assert sum(pq.read_metadata(p).num_rows for p in parts) == 8
    # Incremental: the first results were on disk before the block's last derivative was written.
    derivatives = [p.stat().st_mtime_ns for p in (out / "images").rglob("*.*")]
    assert min(p.stat().st_mtime_ns for p in parts) < max(derivatives)
    # What a run does at its end: the per-batch files become one, rows unchanged.
    before = sorted(map(str, resume.load_results(str(out), StorageConfig()).to_pylist()))
    assert fold(str(out), cfg.storage, by="test")["files_after"] == 1
    assert [p.name for p in (out / "_results").rglob("*.parquet")] == ["part-00000.parquet"]
    assert sorted(map(str, resume.load_results(str(out), StorageConfig()).to_pylist())) == before


# ------------------------------------------------------------------------------------- 10. permissions

def test_written_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        storage.write_bytes(str(tmp_path / "d" / "f.jpg"), b"x", StorageConfig())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d" / "f.jpg").stat().st_mode) == 0o644


# ------------------------------------------------------------------------------------- smaller defects

def test_verbose_flag_turns_on_debug_logs(tmp_path, caplog):
    out = tmp_path / "out"
    _ledger(out)
    for args, expect in ((["status", str(out)], False), (["-v", "status", str(out)], True)):
        caplog.clear()
        with caplog.at_level(logging.NOTSET):
            assert CliRunner().invoke(cli, args).exit_code == 0
        debug = [r for r in caplog.records if r.name.startswith("pipeline") and r.levelno == logging.DEBUG]
        assert bool(debug) == expect, args


def test_environment_names_outside_the_config_are_not_settings():
    cfg = load_config(None, environ={"ARCHIVE_RESTORE_SHARED": "/somewhere", "ARCHIVE_RESTORE_WEIGHTS_DIR": "/w"})
    assert cfg.weights_dir == "/w"
    from pipeline.errors import ConfigError
    with pytest.raises(ConfigError, match="restore.precison"):
        load_config(None, environ={"ARCHIVE_RESTORE_RESTORE__PRECISON": "fp16"})


def test_string_settings_keep_strings():
    cfg = load_config(None, {"input.id_column": "no"}, environ={"ARCHIVE_RESTORE_INPUT__URI_COLUMN": "off"})
    assert cfg.input.id_column == "no" and cfg.input.uri_column == "off"
    r = CliRunner().invoke(cli, ["run", "--set", "input.id_column=no", "--set", "input.uri_column=1"])
    assert "id_column" not in r.output and "uri_column" not in r.output, r.output


def test_status_uses_the_configured_columns(tmp_path):
    out = tmp_path / "out"
    _ledger(out)
    (tmp_path / "m.csv").write_text("path,ident\n/in/a.jpg,i0\n/in/b.jpg,i1\n/in/c.jpg,zz\n")
    (tmp_path / "job.yaml").write_text("input: {uri_column: path, id_column: ident}\n")
    r = CliRunner().invoke(cli, ["status", str(out), "-m", str(tmp_path / "m.csv"), "-c", str(tmp_path / "job.yaml"),
                                 "--json"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.output[r.output.index("{"):])
    assert st["against_manifest"]["current"] == 2 and st["against_manifest"]["missing"] == 1


def test_report_reads_the_environment(s3_endpoint, s3fs_client, monkeypatch):
    _s3_ledger(s3fs_client, "report-env")
    monkeypatch.setenv("ARCHIVE_RESTORE_STORAGE__S3_ENDPOINT_URL", s3_endpoint)
    r = CliRunner().invoke(cli, ["report", "s3://report-env/out"])
    assert r.exit_code == 0, r.output
    assert s3fs_client.exists("report-env/out/report/index.html")


def test_a_compose_read_error_lists_no_restored_faces(weights_dir, tmp_path):
    from pipeline.stages import Compose, DecodeDetect, Restore

    (src,) = _copy_small(tmp_path / "in", SMALL[1:2])
    cfg = load_config(None, test_overrides(weights_dir, tmp_path / "out"), environ={})
    batch = {"image_id": np.array(["a"], object), "uri": np.array([str(src)], object)}
    restored = Restore(cfg)(DecodeDetect(cfg, root=str(src.parent) + "/")(batch))
    src.unlink()  # gone before Compose reads it again
    row = Compose(cfg, "r", "f", True)(restored).to_pylist()[0]
    assert row["status"] == "read_error" and row["faces"] and all(f["action"] != "restored" for f in row["faces"])


def test_building_models_leaves_the_global_rng_alone(weights_dir, tmp_path):
    import torch

    from pipeline.faces import FaceDetector
    from pipeline.restorer import FaceRestorer

    cfg = load_config(None, {**test_overrides(weights_dir, tmp_path / "out"), "weights_dir": str(tmp_path / "none"),
                             "qa.identity_backend": "arcface_ir_se50"}, environ={})
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    FaceDetector(cfg.detect, weights.resolve(cfg.detect.model, cfg))
    FaceRestorer(cfg, "cpu")
    assert torch.equal(torch.rand(3), expected)
