"""The output's lease: atomic takeover, staleness from the holder's own counter, fencing, run records,
leftover processes of a dead run's local Ray."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipeline import runs, storage
from pipeline.config import StorageConfig
from pipeline.errors import Fenced, StorageError

CFG = StorageConfig(retries=1)


def _holder(out, n, **fields):
    """Write generation ``n`` as another process would."""
    body = {"generation": n, "run_id": f"other-{n}", "host": "elsewhere", "pid": 1, "pid_start": "0", "counter": 0,
            "state": "held", "lease_s": 0.6, "renewed_at": "2000-01-01T00:00:00+00:00", **fields}
    storage.write_bytes(runs.gen_uri(str(out), n), json.dumps(body).encode(), CFG)
    return body


@contextlib.contextmanager
def _beating(beat, every_s: float):
    """``beat(1)``, ``beat(2)``, ... every ``every_s`` in a thread while the block runs: a live holder's renewals."""
    stop = threading.Event()

    def loop():
        k = 0
        while not stop.wait(every_s):
            k += 1
            beat(k)

    t = threading.Thread(target=loop)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def test_of_runs_starting_together_exactly_one_takes_the_output(tmp_path):
    won, refused = [], []
    barrier = threading.Barrier(6)

    def start(i):
        lease = runs.Lease(str(tmp_path), CFG, f"run-{i}", heartbeat_s=0.2)
        barrier.wait()
        try:
            won.append(lease.acquire().start())  # a run renews from the moment it holds the output
        except StorageError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=start, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for lease in won:
        lease.stop()
    assert len(won) == 1 and len(refused) == 5, (won, refused)
    assert all("still running" in m for m in refused)
    assert os.listdir(tmp_path / "_lock") == ["gen-000000000001.json"]


def test_a_released_output_is_taken_at_once_by_the_next_generation(tmp_path):
    a = runs.Lease(str(tmp_path), CFG, "a", heartbeat_s=5).acquire()
    a.release()
    t0 = time.monotonic()
    b = runs.Lease(str(tmp_path), CFG, "b", heartbeat_s=5).acquire()
    assert b.generation == 2 and b.taken_over is None and time.monotonic() - t0 < 1


def test_a_dead_holder_on_this_host_is_taken_over_at_once_and_its_record_says_killed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _holder(tmp_path, 1, **runs._process_space(), pid=dead.pid, pid_start="1", lease_s=3600)
    runs.write_record(str(tmp_path), {"run_id": "other-1", "state": "running", "lease_generation": 1}, CFG)
    t0 = time.monotonic()
    lease = runs.Lease(str(tmp_path), CFG, "me", heartbeat_s=5).acquire()
    assert time.monotonic() - t0 < 2 and lease.generation == 2 and lease.taken_over["run_id"] == "other-1"
    runs.mark_killed(str(tmp_path), lease.taken_over, "me", CFG)
    rec = runs.read_records(str(tmp_path), CFG)[0]
    assert rec["state"] == "killed" and "me" in rec["ended_by"]


def test_staleness_comes_from_the_counter_not_from_comparing_clocks(tmp_path):
    # A holder on another host whose clock is far behind ours, but which renews: alive, refused.
    _holder(tmp_path, 1, renewed_at="1990-01-01T00:00:00+00:00")
    with _beating(lambda k: _holder(tmp_path, 1, renewed_at="1990-01-01T00:00:00+00:00", counter=k), 0.1):
        with pytest.raises(StorageError, match="still running"):
            runs.Lease(str(tmp_path), CFG, "me", heartbeat_s=5).acquire()
    # A holder whose clock is far ahead (its renewal "in the future"), but which has stopped: stale after its lease.
    _holder(tmp_path, 1, renewed_at="2999-01-01T00:00:00+00:00", counter=7)
    t0 = time.monotonic()
    lease = runs.Lease(str(tmp_path), CFG, "me", heartbeat_s=5).acquire()
    assert lease.generation == 2 and 0.6 <= time.monotonic() - t0 < 5


def test_a_taken_over_run_is_fenced_and_knows_it_lost(tmp_path):
    a = runs.Lease(str(tmp_path), CFG, "a", heartbeat_s=5).acquire()
    fence = a.fence()
    fence.check()  # still ours
    _holder(tmp_path, 2)  # another run took the output (a lapsed lease)
    time.sleep(fence.ttl_s)  # a passed check is trusted that long
    with pytest.raises(Fenced):
        fence.check()
    a.renew()
    assert a.lost.is_set()
    before = (tmp_path / "_lock" / "gen-000000000001.json").read_bytes()
    a.release()  # a lost lease is not ours to release
    assert (tmp_path / "_lock" / "gen-000000000001.json").read_bytes() == before


def test_the_heartbeat_renews_until_stopped_and_never_after(tmp_path):
    lease = runs.Lease(str(tmp_path), CFG, "a", heartbeat_s=0.05).acquire().start()
    gen = tmp_path / "_lock" / "gen-000000000001.json"
    time.sleep(0.4)
    lease.stop()
    counter = json.loads(gen.read_text())["counter"]
    assert counter >= 2
    time.sleep(0.3)
    assert json.loads(gen.read_text())["counter"] == counter
    lease.release()
    assert json.loads(gen.read_text())["state"] == "released"


def test_a_lease_that_cannot_be_renewed_is_given_up(tmp_path, monkeypatch):
    lease = runs.Lease(str(tmp_path), CFG, "a", heartbeat_s=0.05).acquire()

    def broken(*a, **k):
        raise OSError("storage unreachable")

    monkeypatch.setattr(storage, "write_bytes", broken)
    lease.start()
    assert lease.lost.wait(3), "a lease not renewed for its whole length must count as lost"
    lease.stop()


@pytest.mark.integration
def test_one_run_takes_an_s3_output(s3_endpoint, s3fs_client):
    s3fs_client.mkdir("lease")
    cfg = StorageConfig(s3_endpoint_url=s3_endpoint, retries=1)
    won, refused = [], []
    barrier = threading.Barrier(4)

    def start(i):
        lease = runs.Lease("s3://lease/out", cfg, f"run-{i}", heartbeat_s=0.3)
        barrier.wait()
        try:
            won.append(lease.acquire().start())
        except StorageError:
            refused.append(i)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 3
    won[0].release()
    nxt = runs.Lease("s3://lease/out", cfg, "next", heartbeat_s=5).acquire()
    assert nxt.generation == 2


def test_leftovers_of_a_dead_local_ray_are_stopped(tmp_path):
    session = str(tmp_path / "session_2026-11-25_00-00-00_000000_1")
    os.makedirs(session)
    log = open(os.path.join(session, "worker.out"), "w")
    # A worker renames itself (no session in its command line) but logs into the session folder.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=log, stderr=log)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        here = runs._process_space()
        assert runs.stop_leftovers({"run_id": "x", **here, "host": "another-host", "ray_session": session}) == 0
        assert runs.stop_leftovers({"run_id": "x", **here, "pid_ns": "pid:[1]", "ray_session": session}) == 0
        n = runs.stop_leftovers({"run_id": "x", **here, "ray_session": session})
        assert n == 1 and proc.wait(5) == -9
        assert other.poll() is None
    finally:
        other.kill()
        proc.kill()


def test_a_live_process_that_stopped_renewing_does_not_hold_the_output_forever(tmp_path):
    stuck = runs.Lease(str(tmp_path), CFG, "stuck", heartbeat_s=0.2).acquire()  # alive, never renews
    t0 = time.monotonic()
    lease = runs.Lease(str(tmp_path), CFG, "next", heartbeat_s=0.2).acquire()
    assert lease.generation == 2 and lease.takeover == "stale" and time.monotonic() - t0 >= 0.6
    stuck.renew()
    assert stuck.lost.is_set()


def test_a_pid_from_another_pid_namespace_is_not_judged_from_here(tmp_path):
    """Same hostname, other container: its pid means nothing here; its lease is watched, not declared dead."""
    _holder(tmp_path, 1, **{**runs._process_space(), "pid_ns": "pid:[4026500000]"}, pid=999999, lease_s=0.6)
    lease = runs.Lease(str(tmp_path), CFG, "me", heartbeat_s=5).acquire()
    assert lease.takeover == "stale"


def test_an_older_versions_live_run_is_respected_and_a_dead_one_marked(tmp_path):
    rec = {"run_id": "old", "state": "running", "heartbeat_at": "x", "config": {"cluster": {"heartbeat_s": 0.1}}}
    runs.write_record(str(tmp_path), rec, CFG)
    with _beating(lambda k: runs.write_record(str(tmp_path), {**rec, "heartbeat_at": str(k)}, CFG), 0.05):
        with pytest.raises(StorageError, match="earlier version is still running"):
            runs.Lease(str(tmp_path), CFG, "me", heartbeat_s=5).acquire()
    runs.Lease(str(tmp_path), CFG, "me", heartbeat_s=5).acquire()
    assert runs.read_records(str(tmp_path), CFG)[0]["state"] == "killed"


def test_damaged_or_foreign_lock_files_give_a_clear_error_not_a_traceback(tmp_path):
    (tmp_path / "_lock").mkdir()
    (tmp_path / "_lock" / "gen-old.json").write_text("{}")  # not a generation: ignored
    (tmp_path / "_lock" / "gen-000000000001.json").write_text("")  # emptied by a crash
    with pytest.raises(StorageError, match="damaged"):
        runs.Lease(str(tmp_path), CFG, "me", heartbeat_s=5).acquire()


@pytest.mark.integration
def test_a_store_that_ignores_conditional_writes_is_refused(s3_endpoint, s3fs_client):
    from s3_fault_proxy import FaultProxy

    s3fs_client.mkdir("unconditional")
    with FaultProxy(s3_endpoint, drop_headers=("If-None-Match",)) as proxy:
        cfg = StorageConfig(s3_endpoint_url=proxy.url, retries=1)
        with pytest.raises(StorageError, match="does not honour conditional writes"):
            runs.Lease("s3://unconditional/out", cfg, "me", heartbeat_s=5).acquire()
