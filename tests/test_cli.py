"""The CLI: help for every command, clean one-line errors, and `ray job submit` of the job entrypoint."""

import datetime as dt
import json
import os
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline import ledger, report, runs
from pipeline.cli import cli
from pipeline.config import StorageConfig

from conftest import REPO, free_port, test_overrides, wait_for_port

COMMANDS = [[], ["run"], ["manifest"], ["status"], ["report"], ["models"], ["models", "list"],
            ["models", "download"], ["models", "verify"], ["demo"], ["verify"], ["review"], ["review", "apply"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "group")
def test_help_for_every_command(cmd):
    r = CliRunner().invoke(cli, [*cmd, "-h"])
    assert r.exit_code == 0, r.output
    assert "Example" in r.output and "Usage" in r.output


def _one_line_error(r, words):
    assert r.exit_code == 1, r.output
    lines = [l for l in r.output.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and words in lines[0], r.output


def test_errors_are_one_line_with_exit_1(tmp_path, weights_dir, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = CliRunner()
    _one_line_error(run.invoke(cli, ["run", "-o", str(tmp_path / "o")]), "no manifest")
    _one_line_error(run.invoke(cli, ["run", "-m", str(tmp_path / "nope.csv"), "-o", str(tmp_path / "o")]),
                    "not found")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"x")
    (tmp_path / "m.csv").write_text(f"uri\n{tmp_path / 'in' / 'a.jpg'}\n")
    _one_line_error(run.invoke(cli, ["run", "-m", str(tmp_path / "m.csv"), "-o", str(tmp_path / "in" / "out")]),
                    "inside the input")
    _one_line_error(run.invoke(cli, ["run", "-m", str(tmp_path / "m.csv"), "-o", str(tmp_path / "o"),
                                     "--set", "allow_download=false", "--weights-dir", str(tmp_path / "w")]),
                    "GFPGANv1.4.pth")
    _one_line_error(run.invoke(cli, ["run", "-m", str(tmp_path / "m.csv"), "--set", "nonsense"]), "--set")
    _one_line_error(run.invoke(cli, ["run", "-m", str(tmp_path / "m.csv"), "--set", "restore.micro_batch=0"]),
                    "restore.micro_batch")
    _one_line_error(run.invoke(cli, ["manifest", str(tmp_path / "empty"), "-o", str(tmp_path / "m.parquet")]),
                    "does not exist")


def test_status_and_report(tmp_path):
    out = tmp_path / "out"
    (out / "_results" / "run=r1").mkdir(parents=True)
    (out / "_runs").mkdir()
    t = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    face = {"bbox": [0, 0, 1, 1], "score": 1.0, "landmarks": [0.0] * 10, "identity_similarity": 0.2,
            "qa": "flag", "action": "restored"}
    pq.write_table(pa.Table.from_pylist([
        {"image_id": "a", "uri": "/in/a.jpg", "status": "ok", "fingerprint": "f", "finished_at": t,
         "n_faces": 1, "faces": [face], "output_uri": "/out/images/a.jpg", "run_id": "r1"},
        {"image_id": "b", "uri": "/in/b.jpg", "status": "no_face", "fingerprint": "f", "finished_at": t,
         "n_faces": 0, "faces": [], "output_uri": None, "run_id": "r1"},
    ]), out / "_results" / "run=r1" / "part.parquet")
    (out / "_runs" / "r1.json").write_text(json.dumps({"run_id": "r1", "state": "finished", "fingerprint": "f",
                                                       "summary": {"images": 2, "images_per_s": 1.5}}))
    (tmp_path / "m.csv").write_text("uri,image_id\n/in/a.jpg,a\n/in/b.jpg,b\n/in/c.jpg,c\n")
    r = CliRunner().invoke(cli, ["status", str(out), "-m", str(tmp_path / "m.csv"), "--json"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.output)
    assert st["by_status"] == {"no_face": 1, "ok": 1} and st["faces"] == 1
    assert st["against_manifest"] == {"manifest": 3, "current": 2, "outdated": 0, "failed": 0, "missing": 1,
                                      "gave_up": 0}
    r = CliRunner().invoke(cli, ["report", str(out)])
    assert r.exit_code == 0, r.output
    html = (out / "report" / "index.html").read_text()
    assert "flag 1" in html  # the face counts
    data = json.loads(html.split('<script id="data" type="application/json">')[1].split("</script>")[0])
    assert data["images"][0][0] == "a" and data["faces"] == [[0, 0, 0.2, "flag", "restored", None, None, None]]


def test_compact_folds_the_ledger_and_status_answers_as_before(tmp_path):
    out = tmp_path / "out"
    t = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    for run, day, ids in (("r1", 0, "abc"), ("r2", 1, "ab"), ("r3", 2, "a")):
        d = out / "_results" / f"run={run}"
        d.mkdir(parents=True)
        for i in ids:  # one file per image: a run's per-batch files
            pq.write_table(pa.Table.from_pylist([
                {"image_id": i, "uri": f"/in/{i}.jpg", "status": "ok", "fingerprint": run, "n_faces": 0,
                 "finished_at": t + dt.timedelta(days=day), "output_name": f"{i}.jpg", "run_id": run}]),
                d / f"part-{i}.parquet")
        (out / "_runs").mkdir(exist_ok=True)
        (out / "_runs" / f"{run}.json").write_text(json.dumps({"run_id": run, "kind": "job", "state": "finished",
                                                               "started_at": (t + dt.timedelta(days=day)).isoformat()}))
    (tmp_path / "m.csv").write_text("uri,image_id\n/in/a.jpg,a\n/in/b.jpg,b\n/in/c.jpg,c\n")
    status = ["status", str(out), "-m", str(tmp_path / "m.csv"), "--json"]
    before = json.loads(CliRunner().invoke(cli, status).output)

    def chart(history=True):  # the report's throughput chart, over every run's rows
        return report.throughput(ledger.load_results(str(out), StorageConfig(), history=history),
                                 runs.read_records(str(out), StorageConfig()))

    chart_before = chart()
    r = CliRunner().invoke(cli, ["compact", str(out)])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"{out}: 6 result files -> 1; 3 rows kept, 3 moved to _history/"
    after = json.loads(CliRunner().invoke(cli, status).output)
    assert [r["state"] for r in after["runs"] if r["kind"] == "compact"] == ["finished"]
    assert {k: after[k] for k in ("images", "by_status", "against_manifest")} == \
        {k: before[k] for k in ("images", "by_status", "against_manifest")}
    assert len(list((out / "_history").rglob("*.parquet"))) == 1
    assert chart() == chart_before and chart(history=False) != chart_before
    assert "compact " in CliRunner().invoke(cli, ["status", str(out)]).output
    r = CliRunner().invoke(cli, ["compact", str(out), "--delete-history"])
    assert r.exit_code == 0 and "0 deleted, and 1 history files" in r.output and not list((out / "_history").rglob("*.parquet"))
    _one_line_error(CliRunner().invoke(cli, ["compact", str(tmp_path / "nothing")]), "holds no results")


@pytest.mark.slow
@pytest.mark.integration
def test_ray_job_submit_runs_the_job_on_a_ray_head(weights_dir, archive, tmp_path):
    from pipeline.manifest import build_manifest

    build_manifest(str(archive), str(tmp_path / "m.parquet"), StorageConfig())
    gcs, dash = free_port(), free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token")
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}", "--num-cpus=2",
         "--num-gpus=1", "--include-dashboard=true", "--disable-usage-stats",
         f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--ray-client-server-port={free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_for_port(dash, 120), "the Ray head's dashboard did not come up"
        out = tmp_path / "out"
        o = test_overrides(weights_dir, out)
        args = ["-m", str(tmp_path / "m.parquet"), "-o", str(out), "--weights-dir", o["weights_dir"],
                "--untrained", "--detector", "retinaface_mobile0.25", "--set", f"restore.model={o['restore.model']}",
                "--set", "allow_download=false", "--set", "detect.device=cpu"]  # the head's GPU is logical
        submit = subprocess.run(
            ["ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO), "--",
             "python", "jobs/restore_archive.py", *args], env=env, capture_output=True, text=True, timeout=400)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "images processed" in submit.stdout
        rows = pq.read_table(out / "_results").num_rows
        assert rows == 8
        bad = subprocess.run(
            ["ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO), "--",
             "python", "jobs/restore_archive.py", "-m", str(tmp_path / "none.parquet"), "-o", str(out)],
            env=env, capture_output=True, text=True, timeout=200)
        assert bad.returncode != 0 and "Error: manifest" in bad.stdout + bad.stderr
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        # a head stopped without `ray stop` leaves its address behind for other Ray tools on the machine
        current = "/tmp/ray/ray_current_cluster"
        if os.path.exists(current) and open(current).read().strip().endswith(f":{gcs}"):
            os.unlink(current)


@pytest.mark.slow
def test_demo_builds_an_archive_and_restores_it(weights_dir, tmp_path):
    """The README's first command: sample archive, local Ray, real detector; missing GFP-GAN -> untrained, said."""
    env = dict(os.environ, ARCHIVE_RESTORE_WEIGHTS_DIR=str(weights_dir), ARCHIVE_RESTORE_ALLOW_DOWNLOAD="false")
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "-o", str(tmp_path / "demo")], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "5 images processed (ok 5); 5 faces" in r.stdout
    assert "GFPGANv1.4.pth" in r.stderr and "NOT restorations" in r.stderr
    res = pq.read_table(tmp_path / "demo" / "restored" / "_results")
    assert set(res["status"].to_pylist()) == {"ok"} and all(res["untrained"].to_pylist())
    assert len(list((tmp_path / "demo" / "restored" / "images").rglob("*.*"))) == 5
