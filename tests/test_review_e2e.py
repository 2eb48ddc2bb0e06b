"""The curator's loop end to end on a real local Ray: runs with passed, flagged and failed images and an
untrained one -> the review page in headless Chromium -> a decisions file -> `review apply` -> re-runs."""

import base64
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from click.testing import CliRunner

from pipeline import imageio, job, ledger, metadata, report, resume
from pipeline.cli import cli
from pipeline.config import StorageConfig, load_config
from pipeline.faces import align_matrix, paste_mask

from conftest import IMAGES, REPO, need, test_overrides

pytestmark = [pytest.mark.slow]

PASSED = ["whole/codeformer_04.jpg", "old/old_a.png"]          # run A: every face passes QA
FLAGGED = ["whole/codeformer_00.jpg", "whole/facexlib_test.jpg"]  # run B: the tiny GFP-GAN's faces are flagged
UNTRAINED = ["old/old_b.png"]                                  # run C: untrained identity weights, no verdicts
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", REPO / "test-artifacts"))


def _manifest(path: Path, uris: list[str]) -> str:
    pacsv.write_csv(pa.table({"uri": uris}), path)
    return str(path)


@pytest.fixture(scope="module")
def runs(ray_local, weights_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("review")
    archive, out = base / "archive", base / "out"
    for rel in PASSED + FLAGGED + UNTRAINED:
        (archive / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(need(IMAGES / rel), archive / rel)
    (archive / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this scan was cut short")
    common = {"input.root": str(archive), "output.format": "png", "qa.identity_backend": "onnx"}

    def cfg(rels, name, **extra):
        m = _manifest(base / f"{name}.csv", [str(archive / r) for r in rels])
        return load_config(None, test_overrides(weights_dir, out, m, **{**common, **extra}), environ={})

    a = cfg(PASSED, "a", **{"qa.min_identity_similarity": -1.0})
    b = cfg(FLAGGED + ["broken.jpg"], "b", **{"qa.min_identity_similarity": 0.5})
    c = cfg(UNTRAINED, "c", **{"qa.identity_backend": "arcface_ir_se50"})  # not staged: seeded random weights
    records = [job.run(x) for x in (a, b, c)]
    assert [r["untrained"] for r in records] == [False, False, True]
    rows = {r["uri"]: r for r in resume.latest_rows(ledger.load_results(str(out), StorageConfig())).to_pylist()}
    by = {rel: rows[str(archive / rel)] for rel in PASSED + FLAGGED + UNTRAINED + ["broken.jpg"]}
    assert all(f["qa"] == "pass" for rel in PASSED for f in by[rel]["faces"])
    assert all(f["qa"] == "flag" and f["action"] == "restored" for rel in FLAGGED for f in by[rel]["faces"])
    assert all(f["qa"] is None for f in by[UNTRAINED[0]]["faces"])
    assert by["broken.jpg"]["status"] == "decode_error"
    assert len(by["whole/codeformer_00.jpg"]["faces"]) == 4 and len(by["whole/facexlib_test.jpg"]["faces"]) == 1
    many, one, passed = by["whole/codeformer_00.jpg"], by["whole/facexlib_test.jpg"], by[PASSED[0]]
    before = {"many": _pixels(many["output_uri"]), "passed": Path(passed["output_uri"]).read_bytes()}
    d = base / "decisions.csv"
    d.write_text("image_id,face,decision\n"
                 f"{many['image_id']},0,reject\n{many['image_id']},1,accept\n"
                 f"{one['image_id']},0,reject\n{passed['image_id']},0,accept\n")
    applied = CliRunner().invoke(cli, ["review", "apply", str(out), str(d)])
    return {"out": out, "archive": archive, "cfg_b": b, "rows": by, "before": before, "decisions": d,
            "applied": applied}


def _pixels(path) -> np.ndarray:
    return imageio.decode(Path(path).read_bytes(), 10**9).pixels


def _mask(shape, face) -> np.ndarray:
    """Where ``face`` was pasted (boolean, whole image)."""
    ys, xs, m, _ = paste_mask(shape, align_matrix(np.asarray(face["landmarks"], np.float32).reshape(5, 2)))
    full = np.zeros(shape[:2], bool)
    full[ys, xs] = m > 0
    return full


def _history(out, image_id):
    t = ledger.load_results(str(out), StorageConfig())
    return sorted((r for r in t.to_pylist() if r["image_id"] == image_id), key=lambda r: r["finished_at"])


def test_review_apply_reverts_rejected_faces_and_records_decisions(runs):
    out, archive, rows = runs["out"], runs["archive"], runs["rows"]
    many, one, passed = rows["whole/codeformer_00.jpg"], rows["whole/facexlib_test.jpg"], rows[PASSED[0]]
    before_many, passed_bytes = runs["before"]["many"], runs["before"]["passed"]
    r = runs["applied"]
    assert r.exit_code == 0, r.output
    assert "3 images changed (2 faces reverted, 2 rejected, 2 accepted)" in r.output

    # The rejected single face: the derivative is the master again, without the AI-edit label.
    master = _pixels(archive / "whole/facexlib_test.jpg")
    assert np.array_equal(_pixels(one["output_uri"]), master)
    assert "Xmp.iptcExt.DigitalSourceType" not in metadata.read(Path(one["output_uri"]).read_bytes())["xmp"]
    new_one = _history(out, one["image_id"])[-1]
    f = new_one["faces"][0]
    assert (f["action"], f["review"]) == ("reverted", "rejected")
    assert Path(f["review_before"]).read_bytes() == Path(f["review_after"]).read_bytes()

    # Four faces, one rejected: its region is the master's, the other three keep their restoration.
    now, master = _pixels(many["output_uri"]), _pixels(archive / "whole/codeformer_00.jpg")
    kept = np.zeros(master.shape[:2], bool)
    for face in many["faces"][1:]:
        kept |= _mask(master.shape, face)
    rejected = _mask(master.shape, many["faces"][0]) & ~kept
    assert rejected.sum() > 1000 and np.array_equal(now[rejected], master[rejected])
    assert not np.array_equal(before_many[rejected], master[rejected])  # it was restored before
    assert np.array_equal(now[kept], before_many[kept]) and np.array_equal(now[~kept], master[~kept])
    # Without the masks: only pixels that were restored before may differ from the master now, and fewer do.
    was, now_changed = (before_many != master).any(-1), (now != master).any(-1)
    assert not (now_changed & ~was).any() and 1000 < was.sum() - now_changed.sum()
    assert "Xmp.iptcExt.DigitalSourceType" in metadata.read(Path(many["output_uri"]).read_bytes())["xmp"]

    # The accepted face of an unchanged image: same bytes, a new row saying so.
    assert Path(passed["output_uri"]).read_bytes() == passed_bytes
    assert _history(out, passed["image_id"])[-1]["faces"][0]["review"] == "accepted"

    # History: the run's row and the review's row.
    hist = _history(out, many["image_id"])
    assert [h["review_id"] is not None for h in hist] == [False, True]
    assert hist[1]["run_id"] == hist[1]["review_id"]  # its bytes are the review's now
    assert _history(out, passed["image_id"])[-1]["run_id"] == passed["run_id"]  # its bytes are not
    assert [(x["action"], x["review"]) for x in hist[0]["faces"]] == [("restored", None)] * 4
    assert [(x["action"], x["review"]) for x in hist[1]["faces"]] == \
        [("reverted", "rejected"), ("restored", "accepted"), ("restored", None), ("restored", None)]
    assert hist[1]["fingerprint"] == hist[0]["fingerprint"]
    assert hist[1]["out_sha256"] == hashlib.sha256(Path(many["output_uri"]).read_bytes()).hexdigest()

    # status counts faces by decision
    r = CliRunner().invoke(cli, ["status", str(out), "--json"])
    st = json.loads(r.output)
    assert st["faces_by"]["decision"] == {"accepted": 2, "rejected": 2, "undecided": st["faces"] - 4}
    assert st["faces_by"]["action"]["reverted"] == 2

    # The same file again changes nothing.
    r = CliRunner().invoke(cli, ["review", "apply", str(out), str(runs["decisions"])])
    assert r.exit_code == 0 and "0 images changed" in r.output and "3 already as decided" in r.output
    assert len(_history(out, many["image_id"])) == 2


def test_review_apply_refuses_a_bad_file_whole(runs, tmp_path):
    out, rows = runs["out"], runs["rows"]
    one, many = rows["whole/facexlib_test.jpg"], rows["whole/codeformer_00.jpg"]
    snapshot = {p: p.read_bytes() for p in (out / "images").rglob("*") if p.is_file()}
    n_rows = ledger.load_results(str(out), StorageConfig()).num_rows
    d = tmp_path / "bad.csv"
    d.write_text("image_id,face,decision\n"
                 f"{many['image_id']},2,reject\n"  # fine on its own
                 f"{one['image_id']},0,accept\n"   # reverted by the earlier review: cannot be accepted
                 f"{many['image_id']},9,reject\nnot-an-image,0,reject\n")
    r = CliRunner().invoke(cli, ["review", "apply", str(out), str(d)])
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert "nothing was applied" in r.output and "an earlier decision reverted it" in r.output
    assert "has no face 9" in r.output and "not-an-image: no result" in r.output
    assert {p: p.read_bytes() for p in (out / "images").rglob("*") if p.is_file()} == snapshot
    assert ledger.load_results(str(out), StorageConfig()).num_rows == n_rows


INJECTED = """<script>
window.addEventListener("load", () => {
  const r = {};
  const q = s => document.querySelector(s), all = s => [...document.querySelectorAll(s)];
  r.banner = q("#untrained-banner") ? q("#untrained-banner").textContent : null;
  r.failed = all("#failed tbody tr").map(tr => [tr.dataset.image, tr.querySelector(".status").textContent,
                                                tr.querySelector(".error").textContent]);
  r.images = all("#faces img").map(i => [i.getAttribute("src"), i.naturalWidth]);
  r.rows = all("#faces tbody tr").map(tr => [tr.dataset.key, tr.querySelector(".qa").textContent,
                                             tr.querySelector(".sim").textContent, tr.querySelector(".action").textContent]);
  r.chart = all("#throughput polyline").length;
  const first = all("#faces tbody tr")[0].dataset.key, second = all("#faces tbody tr")[1].dataset.key;
  q(`tr[data-key="${first}"] button.reject`).click();
  q(`tr[data-key="${second}"] button.accept`).click();
  q("#export-csv").click();
  r.csv = decodeURIComponent(q("#export-link").href.split(",").slice(1).join(","));
  r.exported = [first, second];
  const f = q("#qa-filter"); f.value = "pass"; f.dispatchEvent(new Event("change"));
  r.pass_rows = all("#faces tbody tr").map(tr => tr.querySelector(".qa").textContent);
  const d = q("#decision-filter"); d.value = "rejected"; f.value = "all"; d.dispatchEvent(new Event("change"));
  r.rejected_rows = all("#faces tbody tr").map(tr => tr.dataset.key);
  const pre = document.createElement("pre"); pre.id = "test-result"; pre.textContent = JSON.stringify(r);
  document.body.append(pre);
});
</script>"""


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return exe


def _headless(exe: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                           "--no-first-run", "--disable-dev-shm-usage", "--virtual-time-budget=20000", *args],
                          capture_output=True, text=True, timeout=180)


def test_review_page_in_headless_chromium(runs, tmp_path):
    exe = _chromium()
    out, rows = runs["out"], runs["rows"]
    page = Path(report.write_report(str(out), StorageConfig()))
    assert page == out / "report" / "index.html"
    test_page = page.with_name("index-test.html")  # beside it, so its relative links resolve the same
    test_page.write_text(page.read_text().replace("</body>", INJECTED + "</body>"))
    try:
        dom = _headless(exe, "--dump-dom", test_page.as_uri())
    finally:
        test_page.unlink()
    m = re.search(r'<pre id="test-result">(.*?)</pre>', dom.stdout, re.S)
    assert m, dom.stderr[-2000:]
    r = json.loads(html.unescape(m.group(1)))

    assert r["banner"] and "UNTRAINED" in r["banner"]
    broken = rows["broken.jpg"]
    assert r["failed"] == [[broken["image_id"], "decode_error", broken["error"]]]
    assert r["images"] and all(w > 0 for _, w in r["images"]), r["images"]  # before/after crops load
    assert {s for s, _ in r["images"]} >= {"../" + urllib.parse.quote(
        os.path.relpath(f["review_before"], out)) for rel in FLAGGED for f in rows[rel]["faces"]}
    # flagged faces first, least similar first; then the others
    qa = [x[1] for x in r["rows"]]
    n_flag = sum(len(rows[rel]["faces"]) for rel in FLAGGED)
    assert qa[:n_flag] == ["flag"] * n_flag and "flag" not in qa[n_flag:]
    sims = [float(x[2]) for x in r["rows"][:n_flag]]
    assert sims == sorted(sims)
    assert "reverted" in [x[3] for x in r["rows"]]
    assert r["chart"] == 2
    # the filter and the export
    n_pass = sum(len(rows[rel]["faces"]) for rel in PASSED)
    assert r["pass_rows"] == ["pass"] * n_pass
    first, second = r["exported"]
    expect = sorted([(first, "reject"), (second, "accept")])
    assert r["csv"] == "image_id,face,decision,derivative_sha256\n" + "".join(
        "{},{},{},{}\n".format(*k.split("|")[:2], v, k.split("|")[2]) for k, v in expect)
    latest = {x["image_id"]: x for x in resume.latest_rows(ledger.load_results(str(out), StorageConfig())).to_pylist()}
    assert all(latest[k.split("|")[0]]["out_sha256"].startswith(k.split("|")[2]) for k, _ in expect)
    assert first in r["rejected_rows"]  # a choice made on the page counts in the decision filter

    # A screenshot, kept as the test's artifact.
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "review-page.png"
    shot.unlink(missing_ok=True)
    _headless(exe, f"--screenshot={shot}", "--window-size=1400,2600", page.as_uri())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_rerunning_the_job_keeps_the_curators_decisions(runs):
    out, archive, rows, cfg = runs["out"], runs["archive"], runs["rows"], runs["cfg_b"]
    one = rows["whole/facexlib_test.jpg"]
    images = {p: p.read_bytes() for p in (out / "images").rglob("*") if p.is_file()}
    again = job.run(cfg)
    assert again["plan"]["todo"] == 0  # the review's rows are current: nothing to redo
    assert {p: p.read_bytes() for p in (out / "images").rglob("*") if p.is_file()} == images
    # Processing again from the same masters: the rejected faces stay original.
    redo = job.run(cfg.model_copy(update={"reprocess": "all"}))
    assert redo["plan"]["todo"] == 3
    latest = _history(out, one["image_id"])[-1]
    assert latest["run_id"] == redo["run_id"]
    assert [(f["action"], f["review"]) for f in latest["faces"]] == [("reverted", "rejected")]
    assert np.array_equal(_pixels(one["output_uri"]), _pixels(archive / "whole/facexlib_test.jpg"))
    many = _history(out, rows["whole/codeformer_00.jpg"]["image_id"])[-1]
    assert [f["action"] for f in many["faces"]] == ["reverted", "restored", "restored", "restored"]
    # ... unless asked otherwise
    fresh = job.run(cfg.model_copy(update={"reprocess": "all", "review": cfg.review.model_copy(
        update={"carry_decisions": False})}))
    latest = _history(out, one["image_id"])[-1]
    assert latest["run_id"] == fresh["run_id"] and latest["faces"][0]["action"] == "restored"
