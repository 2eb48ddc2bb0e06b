"""The stage callables, called directly on hand-built batches (no Ray)."""

import json
import shutil
import time

import numpy as np
import pyarrow as pa
import pytest

from pipeline import imageio
from pipeline.config import load_config
from pipeline.stages import Compose, DecodeDetect, Restore

from conftest import IMAGES, need, test_overrides


@pytest.fixture(scope="module")
def cfg(weights_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return load_config(None, test_overrides(weights_dir, out), environ={})


@pytest.fixture(scope="module")
def detected(cfg, tmp_path_factory):
    src = tmp_path_factory.mktemp("in")
    shutil.copy(need(IMAGES / "whole/gfpgan_Blake_Lively.jpg"), src / "blake.jpg")
    shutil.copy(need(IMAGES / "whole/codeformer_02.png"), src / "four faces.png")
    shutil.copy(need(IMAGES / "old/old_d.png"), src / "noface.png")
    (src / "text.jpg").write_text("not an image")
    names = ["blake.jpg", "four faces.png", "noface.png", "text.jpg", "missing.jpg"]
    batch = {"image_id": np.array([f"id{i}" for i in range(5)], object),
             "uri": np.array([str(src / n) for n in names], object),
             "shelf": np.array([10, 11, 12, 13, 14])}
    passthrough = pa.schema([("shelf", pa.int64())])
    return DecodeDetect(cfg, root=str(src) + "/", passthrough=passthrough)(batch), passthrough


def _numpy(table):
    return {k: np.array(v, dtype=object) for k, v in table.to_pydict().items()}


def test_decode_detect_rows(detected):
    t, _ = detected
    rows = t.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "no_face", "decode_error", "read_error"]
    assert [r["n_faces"] for r in rows] == [2, 4, 0, 0, 0]
    assert rows[1]["output_key"] == "four faces.png"
    assert "not a recognised image" in rows[3]["error"] and "not found" in rows[4]["error"]
    assert [r["shelf"] for r in rows] == [10, 11, 12, 13, 14]
    assert len(rows[1]["crops"]) == 4 * 512 * 512 * 3
    assert all(r["src_bytes"] is None for r in rows)  # Compose reads masters again (cluster.carry_masters)
    assert len(rows[0]["src_sha256"]) == 64 and rows[3]["src_sha256"] and rows[4]["src_sha256"] is None


def test_restore_is_independent_of_micro_batching(cfg, detected):
    t, pt = detected
    a = Restore(cfg, pt)(t)
    small = cfg.model_copy(update={"restore": cfg.restore.model_copy(update={"micro_batch": 1})})
    b = Restore(small, pt)(_numpy(t))  # numpy batches work too
    for ra, rb in zip(a.to_pylist(), b.to_pylist()):
        assert ra["crops"] is None and ra["status"] == rb["status"]
        if ra["n_faces"]:
            fa, fb = np.frombuffer(ra["restored"], np.uint8), np.frombuffer(rb["restored"], np.uint8)
            assert np.abs(fa.astype(int) - fb.astype(int)).max() <= 1
            faces = json.loads(ra["faces_json"])["faces"]
            assert all(-1 <= f["identity_similarity"] <= 1 for f in faces)
            assert all(f["qa"] is None for f in faces)  # untrained ArcFace: no QA verdicts
            assert ra["restore_s"] > 0


def test_restore_calls_in_flight_together_give_what_each_gives_alone(cfg, detected):
    """Three batches through one stage at once (as the actor runs them, cluster.restore_calls_in_flight):
    while the first is on the device, the faces of the other two are queued and restored as one chunk,
    and each call gets back its own rows, as when called alone (within a level: the same faces in other
    micro-batches)."""
    import threading
    import time

    t, pt = detected
    batches = [t.slice(0, 2), t.slice(1, 4), t.slice(0, 1)]  # 2 + 4 faces; 4 + 0 + 0; 2
    alone = [Restore(cfg, pt)(x).to_pylist() for x in batches]
    stage = Restore(cfg, pt)
    gate, entered, real = threading.Event(), threading.Event(), stage.queue._restore_fn

    def held(crops, mats):  # the first chunk waits until the other calls have queued their faces
        entered.set()
        gate.wait(60)
        return real(crops, mats)

    stage.queue._restore_fn = held
    got = {}
    threads = [threading.Thread(target=lambda k=k: got.setdefault(k, stage(batches[k]).to_pylist())) for k in range(3)]
    threads[0].start()
    assert entered.wait(60)
    for k in (1, 2):
        threads[k].start()
        deadline = time.monotonic() + 60
        while len(stage.queue._queue) < k and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(stage.queue._queue) == k, "the call did not queue its faces"
    stage.queue._restore_fn = real
    gate.set()
    for th in threads:
        th.join(120)
    assert list(stage.queue.chunks) == [6, 4 + 2]  # the held call, then the two queued ones together
    for k in range(3):
        for ra, rb in zip(got[k], alone[k], strict=True):
            assert (ra["status"], ra["image_id"], ra["n_faces"]) == (rb["status"], rb["image_id"], rb["n_faces"])
            if ra["n_faces"]:
                fa, fb = np.frombuffer(ra["restored"], np.uint8), np.frombuffer(rb["restored"], np.uint8)
                assert len(fa) == ra["n_faces"] * 512 * 512 * 3 and np.abs(fa.astype(int) - fb.astype(int)).max() <= 1
                assert json.loads(ra["faces_json"])["faces"][0]["identity_similarity"] == \
                    pytest.approx(json.loads(rb["faces_json"])["faces"][0]["identity_similarity"], abs=1e-3)
                assert ra["restore_s"] > 0


def _restored(table):
    return [None if r["restored"] is None else np.frombuffer(r["restored"], np.uint8).astype(int)
            for r in table.to_pylist()]


def test_restore_counts_the_device_time_of_failed_attempts(cfg, detected):
    """A batch that fails is restored again image by image: each row's restore_s and cpu_s count its share
    of both tries, and a row that fails on its own still says what its faces cost (lower bounds: the batch's
    try takes at least 1 s, each image's 0.1 s, and each 0.05 s of CPU)."""
    from pipeline.facequeue import FaceQueue

    t, pt = detected
    stage = Restore(cfg, pt)
    real = stage.restorer.restore
    tries = []

    def slow(crops, mats):
        tries.append(len(crops))
        time.sleep(1.0 if len(crops) > 4 else 0.1)  # the batch's try: more than a retry alone takes
        c0 = time.thread_time()
        while time.thread_time() - c0 < 0.05:
            pass
        if len(crops) > 4:
            raise RuntimeError("the batch fails; each image alone does not")
        if len(crops) == 4:
            raise RuntimeError("this image fails alone")
        return real(crops, mats)

    stage.queue = FaceQueue(slow, cfg.restore.micro_batch, 10**6, combine=False, cpu_clock=time.thread_time)
    rows = stage(t).to_pylist()
    n = [r["n_faces"] for r in t.to_pylist()]
    assert n[:2] == [2, 4] and tries == [6, 2, 4]  # the batch, then each image with faces alone
    assert [r["status"] for r in rows[:2]] == ["ok", "restore_error"]
    assert rows[0]["restore_s"] >= 1.0 * 2 / 6 + 0.1 and rows[1]["restore_s"] >= 1.0 * 4 / 6 + 0.1
    assert rows[0]["cpu_s"] >= 0.05 * 2 / 6 + 0.05 and rows[1]["cpu_s"] >= 0.05 * 4 / 6 + 0.05


def test_restore_reads_any_arrow_layout_and_passes_the_rest_through(cfg, detected):
    t, pt = detected
    stage = Restore(cfg, pt)
    ref = _restored(stage(t))
    # Several chunks with offsets: crops of the two face rows lie in different buffers.
    chunked = pa.concat_tables([t.slice(0, 1), t.slice(1)])
    out = stage(chunked)
    assert [r is None for r in _restored(out)] == [r is None for r in ref]
    assert all(a is None or np.abs(a - b).max() <= 1 for a, b in zip(_restored(out), ref))
    masters = pa.concat_tables([t.slice(0, 1), t.slice(1)])  # as with cluster.carry_masters
    masters = masters.set_column(masters.schema.get_field_index("src_bytes"), "src_bytes",
                                 pa.array([b"m" * 1000 * (i + 1) for i in range(5)], pa.large_binary()))
    src = [c.buffers()[2].address for c in masters["src_bytes"].chunks]
    assert [c.buffers()[2].address for c in stage(masters)["src_bytes"].chunks] == src  # not copied
    assert out.schema == stage.schema and out["shelf"].to_pylist() == [10, 11, 12, 13, 14]
    # A failed row that still carries crops sits between two face rows; a third row's crops are cut short.
    rows = t.to_pylist()
    broken, short = dict(rows[0], status="decode_error", error="x"), dict(rows[0], image_id="short")
    short["crops"] = short["crops"][:-1]
    out = stage(pa.Table.from_pylist([rows[0], broken, rows[1], short], schema=t.schema)).to_pylist()
    assert [r["status"] for r in out] == ["ok", "decode_error", "ok", "restore_error"]
    assert "crops hold 1572863 bytes for 2 faces" in out[3]["error"] and out[3]["restored"] is None
    assert out[1]["restored"] is None and all(r["crops"] is None for r in out)
    for r, expected in zip([out[0], out[2]], ref[:2]):
        assert np.abs(np.frombuffer(r["restored"], np.uint8).astype(int) - expected).max() <= 1


def test_restore_with_no_faces_at_all(cfg, detected):
    t, pt = detected
    out = Restore(cfg, pt)(t.slice(2, 3))
    assert out.num_rows == 3 and out["restored"].null_count == 3


def test_compose_writes_derivatives_and_result_rows(cfg, detected):
    t, pt = detected
    restored = Restore(cfg, pt)(t)
    res = Compose(cfg, "run-x", "fp-x", True, pt)(restored).to_pylist()
    assert [r["status"] for r in res] == ["ok", "ok", "no_face", "decode_error", "read_error"]
    ok = res[1]
    assert ok["output_uri"].endswith("/images/four faces.png") and ok["fingerprint"] == "fp-x"
    assert ok["untrained"] is True and ok["run_id"] == "run-x" and ok["shelf"] == 11
    assert len(ok["faces"]) == 4 and all(f["action"] == "restored" for f in ok["faces"])
    master = imageio.decode(open(restored["uri"][1].as_py(), "rb").read(), 10**9).pixels
    out = imageio.decode(open(ok["output_uri"], "rb").read(), 10**9).pixels
    assert out.shape == master.shape and out.dtype == master.dtype
    changed = (out != master).any(axis=2)
    assert changed.any(), "the restored faces were pasted"
    for f in ok["faces"]:  # every change lies near a detected face
        x1, y1, x2, y2 = f["bbox"]
        w, h = x2 - x1, y2 - y1
        changed[int(max(0, y1 - h)):int(y2 + h), int(max(0, x1 - w)):int(x2 + w)] = False
    assert not changed.any(), "pixels far from every face changed"
    assert np.array_equal(out[..., 3], master[..., 3])  # alpha untouched
    assert all(r["output_uri"] is None for r in res[2:])
    # CPU seconds per image add up over the stages (bench/scale.py's overhead is measured against them)
    after = [r["cpu_s"] for r in t.to_pylist()], [r["cpu_s"] for r in restored.to_pylist()], [r["cpu_s"] for r in res]
    assert all(c > 0 for c in after[0][:4]) and all(a <= b <= c for a, b, c in zip(*after))
    assert after[1][1] - after[0][1] > after[1][2] - after[0][2]  # four faces restored cost more than none
    assert after[2][1] > after[1][1]  # Compose's paste and encode


def test_a_row_carries_the_fingerprint_of_the_device_its_faces_were_restored_on(cfg, detected):
    """The job plans CUDA (fp16 under precision=auto), but an actor that finds no CUDA restores in fp32 on
    CPU: those rows carry the CPU fingerprint, rows without restored faces the plan's."""
    t, pt = detected
    restored = Restore(cfg, pt)(t)
    assert restored["restore_device"].to_pylist()[:2] == ["cpu", "cpu"]
    res = Compose(cfg, "run-x", "fp-plan", True, pt, device_fingerprints={"cuda": "fp-gpu", "cpu": "fp-cpu"})(restored)
    assert res["fingerprint"].to_pylist() == ["fp-cpu", "fp-cpu", "fp-plan", "fp-plan", "fp-plan"]
    gpu = restored.set_column(restored.schema.get_field_index("restore_device"), "restore_device",
                              pa.array(["cuda (NVIDIA H100 80GB HBM3)"] * 2 + [None] * 3, pa.string()))
    res = Compose(cfg, "run-x", "fp-plan", True, pt, device_fingerprints={"cuda": "fp-gpu", "cpu": "fp-cpu"})(gpu)
    assert res["fingerprint"].to_pylist()[:3] == ["fp-gpu", "fp-gpu", "fp-plan"]
    # a manifest column named "fingerprint" passes through to the work rows: a run's rows never take it
    tagged = restored.append_column("fingerprint", pa.array(["phash:ab12"] * restored.num_rows, pa.string()))
    res = Compose(cfg, "run-x", "fp-plan", True, pt, device_fingerprints={"cuda": "fp-gpu", "cpu": "fp-cpu"})(tagged)
    assert res["fingerprint"].to_pylist() == ["fp-cpu", "fp-cpu", "fp-plan", "fp-plan", "fp-plan"]


def test_keep_original_policy_pastes_nothing(cfg, detected):
    t, pt = detected
    restored = Restore(cfg, pt)(t.slice(1, 1)).to_pylist()
    faces = json.loads(restored[0]["faces_json"])
    for f in faces["faces"]:
        f["qa"], f["action"] = "flag", "kept_original"
    restored[0]["faces_json"] = json.dumps(faces)
    row = Compose(cfg, "r", "f", True, pt)(pa.Table.from_pylist(restored)).to_pylist()[0]
    master = imageio.decode(open(restored[0]["uri"], "rb").read(), 10**9).pixels
    assert np.array_equal(imageio.decode(open(row["output_uri"], "rb").read(), 10**9).pixels, master)
    assert [f["action"] for f in row["faces"]] == ["kept_original"] * 4


def test_compose_rereads_masters_and_refuses_one_changed_since_detection(cfg, detected, tmp_path):
    t, pt = detected
    restored = Restore(cfg, pt)(t.slice(0, 2))
    rows = restored.to_pylist()
    moved = tmp_path / "blake.jpg"
    shutil.copy(rows[0]["uri"], moved)
    rows[0]["uri"] = str(moved)
    moved.write_bytes(moved.read_bytes() + b"\0")  # replaced by another version after detection
    rows[1]["uri"] = str(tmp_path / "gone.png")
    res = Compose(cfg, "r", "f", True, pt)(pa.Table.from_pylist(rows, schema=restored.schema)).to_pylist()
    assert [r["status"] for r in res] == ["read_error", "read_error"]  # retried by the next run
    assert "changed while this run was processing it" in res[0]["error"] and res[0]["output_uri"] is None
    assert "cannot read the master again" in res[1]["error"]


def test_carried_masters_are_not_read_again(weights_dir, tmp_path, detected):
    _, pt = detected
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(need(IMAGES / "whole/gfpgan_Blake_Lively.jpg"), src / "blake.jpg")
    carry = load_config(None, test_overrides(weights_dir, tmp_path / "out", **{"cluster.carry_masters": True}),
                        environ={})
    batch = {"image_id": np.array(["a"], object), "uri": np.array([str(src / "blake.jpg")], object),
             "shelf": np.array([1])}
    t = DecodeDetect(carry, root=str(src) + "/", passthrough=pt)(batch)
    assert t["src_bytes"][0].as_py() == (src / "blake.jpg").read_bytes()
    restored = Restore(carry, pt)(t)
    (src / "blake.jpg").unlink()
    res = Compose(carry, "r", "f", True, pt)(restored).to_pylist()
    assert res[0]["status"] == "ok" and res[0]["output_uri"]


def test_an_error_row_describes_no_derivative_but_names_the_files_it_wrote(weights_dir, tmp_path, detected):
    """The derivative is written, then the access copy fails: the row is an error and says so truthfully."""
    t, pt = detected
    out = tmp_path / "out"
    out.mkdir()
    (out / "access").write_text("a file where the access/ folder should be")
    cfg = load_config(None, test_overrides(weights_dir, out, **{"output.access_copy": True}), environ={})
    rows = Compose(cfg, "r", "f", True, pt)(Restore(cfg, pt)(t.slice(0, 1))).to_pylist()
    r = rows[0]
    assert r["status"] == "write_error" and r["output_uri"] is None and r["out_sha256"] is None
    assert r["access_uri"] is None and (out / "images" / r["output_name"]).is_file()
    assert all(f["action"] is None for f in r["faces"])


def test_compose_and_the_driver_do_not_load_torch():
    """A Compose task's worker and a driver with nothing to do import neither torch nor facexlib (seconds
    of CPU per fresh worker, 15 s on a cold node); the run record still names their versions."""
    import subprocess
    import sys

    code = ("import sys\nfrom pipeline.stages import Compose, compose_and_record\n"
            "from pipeline import decisions, job, report\nv = job._versions()\n"
            "assert v['torch'] != '?' and v['facexlib'] != '?', v\n"
            "print(sorted(m for m in ('torch', 'facexlib', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
