"""The whole job on a real local Ray with a logical GPU: every row and derivative, resume, kill-and-resume."""

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pytest

from pipeline import compaction, imageio, job, ledger, resume, runs
from pipeline.config import ClusterConfig, RestoreConfig, RunConfig, StorageConfig, detect_fingerprint, load_config
from pipeline.errors import ConfigError

from conftest import E2E_IMAGES, IMAGES, REPO, TINY_GFPGAN, need, test_overrides
from test_faces import EXPECTED


def _cfg(**cluster) -> RunConfig:
    return RunConfig(cluster=ClusterConfig(**cluster))


@pytest.mark.parametrize("resources,expect", [
    ({"CPU": 2, "GPU": 1}, dict(device="cuda", restore_min=1, restore_gpus=1.0, decode_max=1)),
    ({"CPU": 64, "GPU": 4}, dict(device="cuda", restore_min=4, restore_max=4, decode_max=59, restore_cpus=1.0)),
    ({"CPU": 4, "GPU": 0.5}, dict(device="cpu", restore_gpus=0.0)),  # a fraction of a GPU holds no actor
    ({"CPU": 16}, dict(device="cpu", restore_min=1, restore_max=1, restore_gpus=0.0, restore_cpus=1.0,
                       decode_max=14)),
    ({"CPU": 1, "GPU": 1}, dict(restore_min=1, decode_max=1)),
])
def test_a_local_rays_pools_fit_the_machine(resources, expect):
    rp = job.plan_resources(resources, RunConfig(), elastic=False)
    for k, v in expect.items():
        assert getattr(rp, k) == v, k
    # everything that must run at once fits in the machine's CPUs
    need = rp.restore_min * rp.restore_cpus + rp.decode_min * rp.decode_cpus + rp.compose_cpus
    assert need <= resources["CPU"] + 1e-6
    assert rp.restore_min * rp.restore_cpus + rp.decode_max * rp.decode_cpus + rp.compose_cpus \
        <= resources["CPU"] + 1e-6


def test_decode_pool_cap():
    assert job.plan_resources({"CPU": 64, "GPU": 1}, _cfg(decode_actors_max=8), elastic=False).decode_max == 8


def test_a_clusters_pools_grow_with_it_and_need_nothing_at_submission():
    """A CPU-less head and no workers: nothing fails; pools start at one actor and have no cap but the
    configured one. A GPU actor asks for its GPU and no CPU (a CPU stage cannot take the core it needs)."""
    empty = {"memory": 1e9, "object_store_memory": 1e8}
    cuda = RunConfig(restore=RestoreConfig(device="cuda"))
    rp = job.plan_resources(empty, cuda, elastic=True)
    assert (rp.device, rp.restore_gpus, rp.restore_cpus, rp.restore_min, rp.restore_max) == ("cuda", 1.0, 0.0, 1, None)
    assert (rp.decode_min, rp.decode_max) == (1, None)
    assert job.plan_resources(empty, _cfg(max_gpus=8), elastic=True).restore_max == 8  # auto + promised GPUs
    assert job.plan_resources({"CPU": 8, "GPU": 2}, RunConfig(), elastic=True).device == "cuda"


def test_restoring_on_cpu_is_said_or_asked_for(caplog):
    rp = job.plan_resources({"CPU": 8}, RunConfig(), elastic=True)  # auto, no GPU now and none promised
    assert (rp.device, rp.restore_gpus, rp.restore_max) == ("cpu", 0.0, 1)
    assert "restore.device=cuda" in caplog.text
    caplog.clear()
    cpu = RunConfig(restore=RestoreConfig(device="cpu"))
    assert job.plan_resources({"CPU": 8, "GPU": 4}, cpu, elastic=True).device == "cpu"  # asked for
    assert "restoring on CPU" not in caplog.text
    with pytest.raises(ConfigError, match="no whole GPU"):
        job.plan_resources({"CPU": 8}, RunConfig(restore=RestoreConfig(device="cuda")), elastic=False)
    # detection on the device without a GPU to restore on: all of it would land in the one Restore actor
    caplog.clear()
    job.plan_resources({"CPU": 8, "GPU": 1}, RunConfig.model_validate({"detect": {"device": "gpu"}}), elastic=True)
    assert "detect.device=gpu while restoring on CPU" not in caplog.text
    job.plan_resources({"CPU": 8}, RunConfig.model_validate({"detect": {"device": "gpu"},
                                                             "restore": {"device": "cpu"}}), elastic=True)
    assert "detect.device=gpu while restoring on CPU" in caplog.text


def test_faces_are_found_on_the_device_by_default_when_restoring_on_cuda():
    """detect.device=auto: gpu where the Restore actors restore on CUDA (the default ResNet-50 detector costs ~6 s
    of CPU a 12 MP image), cpu where they restore on CPU; an explicit setting wins. The stages get it resolved."""
    auto = RunConfig()
    assert auto.detect.device == "auto"
    assert (job.resolve_detect_device(auto, "cuda"), job.resolve_detect_device(auto, "cpu")) == ("gpu", "cpu")
    for asked in ("cpu", "gpu"):
        cfg = RunConfig.model_validate({"detect": {"device": asked}})
        assert job.resolve_detect_device(cfg, "cuda") == job.resolve_detect_device(cfg, "cpu") == asked
    resolved = job.with_detect_device(auto, "cuda")
    assert resolved.detect.device == "gpu" and auto.detect.device == "auto"  # a copy
    # not in the run's fingerprint: auto, cpu and gpu restore the same archive
    assert resolved.fingerprint({}) == auto.fingerprint({}) == job.with_detect_device(auto, "cpu").fingerprint({})
    with pytest.raises(ValueError, match="resolved"):
        detect_fingerprint(auto.detect, "0" * 64)  # a result's fingerprint names where its faces were found


def _archive_manifest(archive, tmp_path):
    """CSV manifest over the archive plus broken inputs, with a pass-through column."""
    bad = archive / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.png").write_text("this is not an image")
    uris = [str(archive / r) for r in E2E_IMAGES] + [str(bad / "empty.jpg"), str(bad / "text.png"),
                                                     str(archive / "gone.jpg")]
    m = tmp_path / "manifest.csv"
    pacsv.write_csv(pa.table({"uri": uris, "box": [f"box-{i}" for i in range(len(uris))]}), m)
    return m, uris


def _results(out):
    return resume.load_results(str(out), StorageConfig())


@pytest.mark.slow
def test_end_to_end_job_on_local_ray(ray_local, weights_dir, archive, tmp_path):
    manifest, uris = _archive_manifest(archive, tmp_path)
    out = tmp_path / "out"
    cfg = load_config(None, test_overrides(weights_dir, out, manifest), environ={})
    before = {p: p.read_bytes() for p in archive.rglob("*") if p.is_file()}  # the inputs, broken ones too

    record = job.run(cfg)

    res = _results(out).to_pylist()
    assert len(res) == len(uris) and len({r["image_id"] for r in res}) == len(uris)
    # The fingerprint of the precision on the device the job planned (the logical GPU: cuda); faces restored
    # elsewhere carry that device's (the logical GPU's actor found no CUDA: fp32 on CPU). Both are among
    # those planning accepted, and the record holds both, as decisions and reports look settings up by them.
    hashes = {n: w["sha256"] for n, w in record["weights"].items()}
    fp_cuda, fp_cpu = cfg.fingerprint(hashes, device="cuda"), cfg.fingerprint(hashes, device="cpu")
    assert record["restore_plan"]["device"] == "cuda" and fp_cuda != fp_cpu
    assert record["fingerprint"] == fp_cuda and record["device_fingerprints"] == {"cuda": fp_cuda, "cpu": fp_cpu}
    assert {fp_cuda, fp_cpu} <= set(record["fingerprints"])
    by_uri = {r["uri"]: r for r in res}
    for rel in E2E_IMAGES:
        r = by_uri[str(archive / rel)]
        n = EXPECTED[rel]
        assert r["n_faces"] == n and len(r["faces"]) == n, rel
        assert r["status"] == ("ok" if n else "no_face"), rel
        assert r["fingerprint"] == (fp_cpu if n else fp_cuda) and r["run_id"] == record["run_id"], rel
        assert (r["restore_device"] == "cpu") == bool(n)
        assert r["untrained"] is True and r["box"].startswith("box-")
        assert len(r["src_sha256"]) == 64 and r["decode_s"] > 0
        if n:
            assert r["output_uri"] == str(out / "images" / rel)  # same key, same format
            data = open(r["output_uri"], "rb").read()
            assert imageio.decode(data, 10**9).pixels.shape == \
                imageio.decode((archive / rel).read_bytes(), 10**9).pixels.shape
            import hashlib
            assert hashlib.sha256(data).hexdigest() == r["out_sha256"]
            for f in r["faces"]:
                assert len(f["bbox"]) == 4 and len(f["landmarks"]) == 10 and f["action"] == "restored"
                assert -1 <= f["identity_similarity"] <= 1
        else:
            assert r["output_uri"] is None and not (out / "images" / rel).exists()
    assert by_uri[uris[-3]]["status"] == "decode_error" and "empty" in by_uri[uris[-3]]["error"]
    assert by_uri[uris[-2]]["status"] == "decode_error" and "not a recognised image" in by_uri[uris[-2]]["error"]
    assert by_uri[uris[-1]]["status"] == "read_error" and "not found" in by_uri[uris[-1]]["error"]
    # inputs untouched; run record complete
    assert {p: p.read_bytes() for p in archive.rglob("*") if p.is_file()} == before
    rec = json.loads((out / "_runs" / f"{record['run_id']}.json").read_text())
    assert rec["state"] == "finished" and rec["untrained"] is True
    assert rec["weights"]["retinaface_mobile0.25"]["sha256"].startswith("38ec7bb3")
    assert rec["weights"]["arcface_ir_se50"]["untrained"] is True
    with_faces = sum(1 for r in E2E_IMAGES if EXPECTED[r])
    assert rec["summary"]["by_status"] == {"ok": with_faces, "no_face": len(E2E_IMAGES) - with_faces,
                                           "decode_error": 2, "read_error": 1}
    assert rec["summary"]["faces"] == sum(EXPECTED[r] for r in E2E_IMAGES)

    # Re-run: only the passing failure (read_error) is tried again; no derivative is rewritten.
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*") if p.is_file()}
    again = job.run(cfg)
    assert again["plan"]["todo"] == 1 and again["plan"]["skipped"] == len(uris) - 1
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*") if p.is_file()} == mtimes

    # Changing a setting that changes output bytes makes results outdated, but only --reprocess outdated redoes them.
    changed = load_config(None, test_overrides(weights_dir, out, manifest, **{"output.jpeg_quality": 80}),
                          environ={})
    assert job.run(changed)["plan"]["todo"] == 1
    redo = job.run(changed.model_copy(update={"reprocess": "outdated"}))
    assert redo["plan"]["todo"] == len(uris) and redo["summary"]["images"] == len(uris)
    # Same bytes, same detector: the stored detections are reused (detection skipped) and equal.
    latest = {r["uri"]: r for r in _results(out).to_pylist() if r["run_id"] == redo["run_id"]}
    decoded = [u for u in latest if by_uri[u]["status"] in ("ok", "no_face")]
    assert redo["summary"]["detections_reused"] == len(decoded) == len(E2E_IMAGES)
    for u in decoded:
        assert latest[u]["detect_reused"] is True and latest[u]["detect_s"] < by_uri[u]["detect_s"]
        assert [f["landmarks"] for f in latest[u]["faces"]] == [f["landmarks"] for f in by_uri[u]["faces"]]
        assert latest[u]["status"] == by_uri[u]["status"]
    assert all(not latest[u]["detect_reused"] for u in uris[-3:])
    # --redetect: detection runs again, with the same outcome
    again = job.run(changed.model_copy(update={"reprocess": "all", "redetect": True}))
    assert again["summary"]["detections_reused"] == 0
    latest = {r["uri"]: r for r in _results(out).to_pylist() if r["run_id"] == again["run_id"]}
    for u in decoded:
        assert latest[u]["detect_s"] > 0
        assert [f["landmarks"] for f in latest[u]["faces"]] == [f["landmarks"] for f in by_uri[u]["faces"]]
    # History: every run's rows are kept; status counts the latest row per image.
    from pipeline import report
    from pipeline.manifest import read_manifest
    st = report.status(str(out), StorageConfig(), read_manifest(changed).table)
    assert st["result_rows"] == 3 * len(uris) + 2 and st["images"] == len(uris)
    assert st["against_manifest"]["current"] == len(uris) - 1 and st["against_manifest"]["missing"] == 1
    # Each run folded its per-batch files (at most one file per run is left), and `compact` folds the history
    # so that every plan is the same as over the full ledger.
    listing = ledger.list_ledger(str(out), StorageConfig())
    assert len(listing.files) <= 5 and len(listing.loose) <= 1 and listing.records, listing
    manifest_table = read_manifest(changed).table

    def plans():
        rows = resume.load_for_planning(str(out), StorageConfig())
        return {m: resume.plan(manifest_table, rows, fp, m, 3).counts
                for fp in (record["fingerprint"], again["fingerprint"]) for m in ("missing", "outdated", "failed")}

    before = plans()
    compacted = compaction.run_compact(str(out), changed)
    # Kept: each image's latest row, and all 5 retryable read_error rows of the missing file (max_attempts
    # counts them); the 2 older rows of every other image go to history.
    assert compacted["state"] == "finished" and compacted["summary"]["rows_to_history"] == 2 * len(uris) - 2
    assert plans() == before and len(ledger.list_ledger(str(out), StorageConfig()).files) == 1
    st2 = report.status(str(out), StorageConfig(), manifest_table)
    assert {k: st2[k] for k in ("images", "by_status", "against_manifest")} == \
        {k: st[k] for k in ("images", "by_status", "against_manifest")}


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_job_resumes_without_losing_or_duplicating(weights_dir, tmp_path, sig):
    src = tmp_path / "archive"
    from conftest import IMAGES
    rels = ["whole/codeformer_03.jpg", "whole/codeformer_04.jpg", "whole/codeformer_05.jpg",
            "whole/facexlib_test.jpg", "whole/facexlib_test2.jpg", "old/old_a.png", "old/old_d.png"]
    for copy in range(5):
        for rel in rels:
            dst = src / f"box{copy}" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(IMAGES / rel, dst)
    manifest = tmp_path / "m.parquet"
    from pipeline.manifest import build_manifest
    n = build_manifest(str(src), str(manifest), StorageConfig())
    out = tmp_path / "out"
    args = ["run", "-m", str(manifest), "-o", str(out), "--weights-dir", str(weights_dir), "--untrained",
            "--detector", "retinaface_mobile0.25", "--set", f"restore.model={TINY_GFPGAN}",
            "--set", "allow_download=false", "--set", "cluster.num_cpus=2", "--set", "cluster.num_gpus=1",
            "--set", "cluster.rows_per_block=2", "--set", "cluster.restore_batch_size=4",
            "--set", "cluster.heartbeat_s=1", "--set", "detect.device=cpu"]
    proc = _cli(*args, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if list(out.glob("_results/run=*/*.parquet")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the job ended before it could be interrupted:\n" + proc.stdout.read()[-3000:]
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    else:  # `ray job stop`, a pod's termination: the driver alone is told
        proc.send_signal(signal.SIGTERM)
        stopped_log = proc.communicate(timeout=120)[0]
        assert proc.returncode == 143, stopped_log[-3000:]
        assert "Error: stopped by SIGTERM; the images it finished are saved" in stopped_log, stopped_log[-3000:]
    first = json.loads(next(out.glob("_runs/*.json")).read_text())
    killed_run = first["run_id"]
    partial = _results(out)
    assert 0 < partial.num_rows < n, "kill should land mid-run"
    if sig == signal.SIGTERM:  # the record says so, counts what was finished, and the lease is free
        assert first["state"] == "stopped" and first["summary"]["images"] <= partial.num_rows, first
        assert runs.holder(str(out), StorageConfig()) is None  # released: nobody holds the output

    resumed = _cli(*args)
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log[-3000:]
    if sig == signal.SIGTERM:  # the lease was released: the next run took nothing over, waited for nothing
        second = [json.loads(p.read_text()) for p in out.glob("_runs/*.json") if p.stem != killed_run]
        assert len(second) == 1 and "took_over_from" not in second[0], second
    res = _results(out)
    ids = res["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == n, "every image exactly once across the killed and the resumed run"
    assert set(pc.unique(res["run_id"]).to_pylist()).__len__() == 2
    ok = res.filter(pc.equal(res["status"], "ok"))
    assert ok.num_rows == n - 5  # old_d has no face, once per copy
    for uri in ok["output_uri"].to_pylist():
        imageio.decode(open(uri, "rb").read(), 10**9)  # every derivative is whole
    # tasks in flight when the driver died may still have written; the resumed run waited for them
    by_killed = res.filter(pc.equal(res["run_id"], killed_run)).num_rows
    assert by_killed >= partial.num_rows
    assert f"{by_killed} skipped as done" in log


def test_a_run_without_progress_ends_with_a_clear_error(ray_local):
    """The watchdog is Ray Data's no-progress guard at cluster.stall_timeout_s, turned into Stalled; it
    raises inside the iteration (a watchdog thread of ours, found by review, left the execution running)."""
    import threading

    from pipeline.errors import Stalled

    ds = ray_local.data.range(4, override_num_blocks=2).map_batches(lambda b: (time.sleep(30), b)[1])
    before = threading.active_count()
    t0 = time.monotonic()
    with pytest.raises(Stalled, match="cluster.stall_timeout_s") as e:
        for _ in job._consume(ds, ClusterConfig(stall_timeout_s=2)):
            pass
    assert "MapBatches(<lambda>)" in str(e.value)  # the stage that did not finish is named
    assert time.monotonic() - t0 < 25  # ended by the guard, not by the 30 s batch
    time.sleep(1)
    assert threading.active_count() <= before + 1  # no thread of ours left iterating


def test_memory_is_declared_from_measured_peaks_and_the_largest_image_accepted():
    """bench/stage_memory.py measured (12 / 100 MP masters): DecodeDetect 1.05 / 1.48 GB, Compose 0.93 / 2.6 GB,
    Restore on CPU at micro-batch 16: 10.3 GB. The declarations cover 12 MP and are sized up to 50 MP."""
    def plan(mp, device="cpu", **kw):
        return job.memory_plan(RunConfig.model_validate({"input": {"max_pixels": int(mp * 1e6)}, **kw}), device)

    for mp, decode, compose in ((12, 1.05e9, 0.93e9), (50, None, None)):
        m = plan(mp)
        if decode:
            assert decode <= m["decode"] < 2 * decode + 1e9 and compose <= m["compose"] < 2 * compose + 1e9
    # sized for masters up to 50 MP: the 200 MP guard does not make every actor ask for 200 MP's memory
    assert plan(200) == plan(50) and plan(50)["compose"] < 2.6e9 * 1.2
    assert plan(12)["restore"] >= 10.3e9 and plan(12, "cuda")["restore"] < 5e9
    assert plan(12, restore={"micro_batch": 4})["restore"] < plan(12)["restore"]
    assert plan(12, cluster={"decode_actor_memory_gb": 0.5})["decode"] == 0.5e9  # an explicit setting wins


def test_restore_calls_in_flight_follow_the_pool_unless_set():
    """3 calls an actor on a pool of fixed size; 1 on a pool that grows (more would keep Ray Data from
    asking for an actor on a GPU node that joins: tests/test_cluster.py (c)); a setting wins."""
    fixed = job.plan_resources({"CPU": 4.0, "GPU": 1.0}, RunConfig(), elastic=False)
    grows = job.plan_resources({"CPU": 4.0, "GPU": 1.0}, RunConfig(), elastic=True)
    assert (fixed.restore_min, fixed.restore_max) == (1, 1) and grows.restore_max != grows.restore_min
    assert job.restore_calls(RunConfig(), fixed) == 3 and job.restore_calls(RunConfig(), grows) == 1
    two = RunConfig.model_validate({"cluster": {"restore_calls_in_flight": 2}})
    assert job.restore_calls(two, grows) == 2 and job.restore_calls(two, fixed) == 2


def test_memory_is_declared_on_a_cluster_or_when_set():
    cfg = RunConfig()
    assert job.declared_memory(cfg, "cpu", elastic=True) == job.memory_plan(cfg, "cpu")
    assert job.declared_memory(cfg, "cpu", elastic=False) == {"decode": None, "restore": None, "compose": None}
    set_ = RunConfig.model_validate({"cluster": {"compose_task_memory_gb": 1.5}})
    assert job.declared_memory(set_, "cuda", elastic=False)["compose"] == 1.5e9


def _derive_case(tmp_path, ledger_image: str):
    """Image "a", planned for an access copy from a ledger file holding an ok row of ``ledger_image``: the
    output folder, manifest table, preflight and derive plan that ``job._derive`` takes."""
    import pyarrow.parquet as pq

    from pipeline.manifest import Manifest

    out = tmp_path / "out"
    part = out / "_results" / "run=r0" / "part.parquet"
    part.parent.mkdir(parents=True)
    pq.write_table(pa.table({"image_id": [ledger_image], "status": ["ok"], "fingerprint": ["f"],
                             "finished_at": pa.array([0], pa.timestamp("ms", tz="UTC"))}), part)
    table = pa.table({"image_id": ["a"], "uri": ["/in/a.jpg"]})
    pre = job.Preflight(Manifest(table, "/in/", pa.schema([]), 1, 0, 0), {}, "f", False)
    derive = pa.table({"image_id": ["a"], "_source": [str(part)], "_row": pa.array([0], pa.int64()),
                       "access_key": ["a.jpg"], "key_error": pa.nulls(1, pa.string())})
    return out, table, pre, derive


@pytest.mark.parametrize("where", ["local", "cluster"])
def test_access_copy_tasks_ask_for_what_a_compose_task_does(tmp_path, monkeypatch, where):
    """On a cluster a derive task declares a Compose task's memory and CPUs; on the local Ray the job
    started, no memory and never more CPUs than that machine has (or the task would never run)."""
    import sys
    import types

    out, table, pre, derive = _derive_case(tmp_path, ledger_image="a")
    cfg = RunConfig.model_validate({"output": {"root": str(out)}, "cluster": {"compose_task_cpus": 4}})
    asked = {}

    class Dataset:
        def map_batches(self, fn, **kw):
            asked.update(kw)
            return self

    fake = types.SimpleNamespace(data=types.SimpleNamespace(from_arrow=lambda blocks: Dataset()),
                                 cluster_resources=lambda: {"CPU": 2.0, "memory": 8e9})
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(job, "_start_ray", lambda *a: "/tmp/ray/session_x" if where == "local" else None)
    monkeypatch.setattr(job, "_consume", lambda ds, cc: [])
    monkeypatch.setattr(job, "_software", lambda cfg, pre: "sw")
    lease = types.SimpleNamespace(fence=lambda: None, lost=threading.Event())
    job._derive(cfg, pre, derive, table, "r1", lease, input_folders=None)
    if where == "local":
        assert asked["memory"] is None and asked["num_cpus"] == 2.0
    else:
        assert asked["memory"] == job.memory_plan(cfg, "cpu")["compose"] and asked["num_cpus"] == 4


def test_the_local_ray_a_run_started_stays_its_own_when_asked_again(monkeypatch):
    """A run that processes and then adds access copies asks for Ray twice; the second time it is still
    the local Ray the run started (so not sized as a cluster), while a Ray started by someone else in the
    process is one the job joined."""
    import sys
    import types

    state = {"up": False}
    node = types.SimpleNamespace(get_session_dir_path=lambda: "/tmp/ray/session_x")
    fake = types.SimpleNamespace(is_initialized=lambda: state["up"], init=lambda **kw: state.update(up=True),
                                 _private=types.SimpleNamespace(worker=types.SimpleNamespace(_global_node=node)))
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(job, "_started_session", None)
    assert job._init_ray(RunConfig()) == "/tmp/ray/session_x"
    assert job._init_ray(RunConfig()) == "/tmp/ray/session_x"
    monkeypatch.setattr(job, "_started_session", None)  # up, but not started by this run
    assert job._init_ray(RunConfig()) is None


@pytest.mark.slow
def test_access_and_no_face_copies_are_added_without_restoring_again(ray_local, weights_dir, tmp_path):
    """Settings that only add files (issue 10): turned on after an archive was processed, a run adds the
    access copies from the derivatives and copies the no-face images (their detection reused), restoring
    nothing; a new access size remakes only the access copies; a run after that has nothing to do."""
    import hashlib

    from conftest import IMAGES, need

    import cv2

    rels = ["whole/codeformer_00.jpg", "old/old_a.png", "old/old_d.png"]  # 4 faces, 1 face, no face
    for rel in rels:
        (tmp_path / "archive" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(need(IMAGES / rel), tmp_path / "archive" / rel)
    # old_a.png and old_a.tif: two derivatives, but their access copies would both be old_a.jpg
    cv2.imwrite(str(tmp_path / "archive" / "old/old_a.tif"), cv2.imread(str(need(IMAGES / "old/old_a.png"))))
    manifest = tmp_path / "m.csv"
    pacsv.write_csv(pa.table({"uri": [str(tmp_path / "archive" / r) for r in rels + ["old/old_a.tif"]]}), manifest)
    out = tmp_path / "out"

    def run(**extra):
        return job.run(load_config(None, test_overrides(weights_dir, out, manifest, **extra), environ={}))

    def latest():
        return {r["uri"].split("/archive/")[1]: r for r in resume.latest_rows(_results(out)).to_pylist()}

    first = run()
    before = latest()
    derivatives = {rel: (out / "images" / rel).read_bytes() for rel in rels[:2]}
    assert before["old/old_d.png"]["status"] == "no_face" and before["old/old_d.png"]["output_uri"] is None

    second = run(**{"output.access_copy": True, "output.copy_no_face": True})
    assert second["fingerprint"] == first["fingerprint"]
    assert second["plan"]["todo"] == 1 and second["plan"]["derive"] == 3 and second["plan"]["copy_no_face"] == 1
    assert second["derived"] == {"access_copies": 3, "failed": 0, "errors": {}}
    assert second["summary"]["faces"] == 0 and not second["summary"]["restored_on"]  # GFP-GAN never ran
    now = latest()
    for rel in rels[:2]:
        r, b = now[rel], before[rel]
        assert (out / "images" / rel).read_bytes() == derivatives[rel]  # the derivative is untouched
        assert (r["run_id"], r["out_sha256"], r["faces"], r["fingerprint"]) == \
            (b["run_id"], b["out_sha256"], b["faces"], b["fingerprint"])
        assert r["access_spec"] == "2048px q85" and "made from the derivative" in r["notes"]
        data = (out / "access" / r["access_name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["access_sha256"]
        px = imageio.decode(data, 10**9).pixels
        assert px.shape[:2] == imageio.decode(derivatives[rel], 10**9).pixels.shape[:2]  # small: not downscaled
    tif, png = now["old/old_a.tif"], now["old/old_a.png"]  # each its own access copy: neither overwritten
    assert tif["output_name"] == "old/old_a.tif" and png["output_name"] == "old/old_a.png"
    assert len({tif["access_name"], png["access_name"]}) == 2 and "~" in tif["access_name"] + png["access_name"]
    for r in (tif, png):
        assert hashlib.sha256((out / "access" / r["access_name"]).read_bytes()).hexdigest() == r["access_sha256"]
    copy = now["old/old_d.png"]
    assert copy["status"] == "no_face" and copy["detect_reused"] is True
    assert (out / "images" / "old/old_d.png").read_bytes() == (tmp_path / "archive" / "old/old_d.png").read_bytes()

    third = run(**{"output.access_copy": True, "output.copy_no_face": True, "output.access_long_side": 64})
    assert third["plan"]["todo"] == 0 and third["derived"]["access_copies"] == 3
    for rel in rels[:2]:
        r = latest()[rel]
        assert r["access_spec"] == "64px q85" and r["run_id"] == before[rel]["run_id"]
        assert max(imageio.decode((out / "access" / r["access_name"]).read_bytes(), 10**9).pixels.shape[:2]) == 64

    fourth = run(**{"output.access_copy": True, "output.copy_no_face": True, "output.access_long_side": 64})
    assert fourth["plan"]["todo"] == 0 and fourth["plan"]["derive"] == 0 and "derived" not in fourth
    # The same settings from the start: Compose makes the access copies from its in-memory pixels. From a
    # lossless derivative the derived copy is the same file; from a JPEG one, within its JPEG generation.
    fresh = tmp_path / "fresh"
    job.run(load_config(None, test_overrides(weights_dir, fresh, manifest, **{
        "output.access_copy": True, "output.copy_no_face": True, "output.access_long_side": 64}), environ={}))
    name = latest()["old/old_a.png"]["access_name"]  # suffixed alike in both outputs
    assert (fresh / "access" / name).read_bytes() == (out / "access" / name).read_bytes()
    a, b = (imageio.decode((d / "access" / "whole/codeformer_00.jpg").read_bytes(), 10**9).pixels.astype(int)
            for d in (fresh, out))
    assert abs(a - b).mean() < 2.0


def test_results_of_settings_that_only_add_files_stay_current_across_the_upgrade():
    """Before these settings left the fingerprint, an archive made with access copies at 1,024 px got a
    fingerprint of its own (its run record keeps it). Today, with copies at 2,048 px or none at all, those
    results are current (no GFP-GAN), and with 2,048 px their copies are made again."""
    from pipeline.resume import Wants, plan

    h = {"GFPGANv1.4": "aa", "retinaface": "bb"}

    def cfg(**output):
        return RunConfig().model_copy(update={"output": RunConfig().output.model_copy(update=output)})

    then = cfg(access_copy=True, access_long_side=1024)
    old_fp = then.fingerprint(h, legacy=True)
    records = [{"run_id": "r0", "kind": "job", "fingerprint": old_fp, "config": then.model_dump(mode="json")},
               {"run_id": "r1", "kind": "job", "fingerprint": "other", "config": {"not": "a config"}}]
    m = pa.table({"image_id": ["a"], "uri": ["/x/a.jpg"]})
    res = pa.table({"image_id": ["a"], "status": ["ok"], "fingerprint": [old_fp],
                    "finished_at": pa.array([0], pa.timestamp("ms", tz="UTC")), "output_name": ["a.jpg"],
                    "access_name": ["a.jpg"]})
    on_cuda = cfg(access_copy=True)
    on_cuda = on_cuda.model_copy(update={"restore": on_cuda.restore.model_copy(update={"device": "cuda"})})
    for today, derive in ((cfg(access_copy=True), ["a"]), (cfg(), None), (then, None), (on_cuda, ["a"])):
        fp = today.fingerprint(h)
        pre = job.Preflight(None, {}, fp, False, hashes=h, accepted=today.accepted_fingerprints(h))
        accepted, specs = job._accepted(today, pre, records)
        assert old_fp in accepted and specs[old_fp] == "1024px q85"
        p = plan(m, res, accepted, "outdated", wants=Wants.of(today.output, specs))
        assert p.todo.num_rows == 0
        assert (p.derive["image_id"].to_pylist() if p.derive is not None else None) == derive
    # The same settings with other weights: those results are outdated, whatever the record says.
    older = then.fingerprint({**h, "GFPGANv1.4": "older weights"}, legacy=True)
    stale = [{"run_id": "r0", "kind": "job", "fingerprint": older, "config": then.model_dump(mode="json")}]
    today = cfg(access_copy=True)
    pre = job.Preflight(None, {}, today.fingerprint(h), False, hashes=h, accepted=today.accepted_fingerprints(h))
    accepted, _ = job._accepted(today, pre, stale)
    assert older not in accepted
    res = res.set_column(2, "fingerprint", pa.array([older]))
    assert plan(m, res, accepted, "outdated", wants=Wants.of(today.output)).todo.num_rows == 1


def test_an_image_whose_row_vanished_before_its_copy_is_counted_and_ray_is_not_started(tmp_path, monkeypatch):
    """Planning chose the image, and its ok row is no longer in the file (a concurrent compact moved it):
    nothing to derive, no Ray, and the run record counts it as not made (tried again next run)."""
    out, table, pre, derive = _derive_case(tmp_path, ledger_image="b")
    cfg = RunConfig().model_copy(update={"output": RunConfig().output.model_copy(update={"root": str(out)})})
    monkeypatch.setattr(job, "_start_ray", lambda *a: pytest.fail("Ray started with nothing to derive"))
    got = job._derive(cfg, pre, derive, table, "r1", lease=None, input_folders=None)
    assert got == {"access_copies": 0, "failed": 1, "errors": {}}


def test_a_run_with_nothing_to_do_folds_what_a_killed_run_left_loose(weights_dir, tmp_path, monkeypatch):
    """A run killed before its fold leaves one file per batch; the next run folds them even when it has
    nothing to process (before, only a run with work folded, so an archive that was complete stayed at
    one file per batch until someone ran `compact`). No Ray is started for it."""
    from pipeline import weights
    from pipeline.manifest import read_manifest

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        shutil.copy(need(IMAGES / "whole/codeformer_03.jpg"), src / name)
    manifest = tmp_path / "manifest.csv"
    pacsv.write_csv(pa.table({"uri": [str(p) for p in sorted(src.iterdir())]}), manifest)
    out = tmp_path / "out"
    cfg = load_config(None, test_overrides(weights_dir, out, manifest), environ={})
    hashes = {n: r.sha256 for n, r in weights.resolve_all(cfg).items()}
    fp = cfg.fingerprint(hashes, device="cpu")
    ids = read_manifest(cfg).table["image_id"].to_pylist()
    t = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    for i in ids:  # the killed run's batches: every image finished (no face: no file to check)
        ledger.write_part(pa.table({"image_id": [i], "status": ["no_face"], "fingerprint": [fp], "run_id": ["killed"],
                                    "finished_at": pa.array([t], pa.timestamp("ms", tz="UTC")),
                                    "faces_skipped": [0]}), ledger.part_uri(str(out), "killed", [i]), StorageConfig())
    assert len(ledger.list_ledger(str(out), StorageConfig()).loose) == 3
    monkeypatch.setattr(job, "_start_ray", lambda *a: pytest.fail("Ray started for a run with nothing to do"))

    record = job.run(cfg)

    assert record["plan"]["todo"] == 0 and record["state"] == "finished"
    assert record["ledger_fold"]["files_before"] == 3
    listing = ledger.list_ledger(str(out), StorageConfig())
    assert not listing.loose and len(listing.files) == 1
    assert sorted(_results(out)["image_id"].to_pylist()) == sorted(ids)
