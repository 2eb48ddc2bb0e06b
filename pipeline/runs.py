"""One run at a time per output: the lease in ``<output>/_lock/``, fencing, run records, and what a killed
run left behind.

The lease is a series of generation files ``_lock/gen-<n>.json``. A run takes the output by creating
generation n+1 with an atomic create-if-absent (hard link of a finished file locally, a conditional PUT
``If-None-Match: *`` on S3): of several runs starting together exactly one succeeds, before any of them
plans. It may do so only when generation n is released, or its holder is provably dead (same host,
process gone), or its lease is stale: the holder rewrites its own file every ``heartbeat_s`` with an
incremented counter, and a taker calls it stale only after watching that counter stand still for the
holder's lease time (3x its heartbeat) on the taker's own monotonic clock. No two hosts' clocks are
ever compared.

Fencing: a run's tasks check, before every derivative and every result file they write, that no later
generation exists. Tasks of a killed run that outlive their driver, or of a run whose lease lapsed, can
therefore never write after another run has taken the output. A holder that finds a later generation,
or cannot renew for a whole lease, knows it has lost the output and stops.

Run records (``_runs/<run_id>.json``) are written by the driver's main thread only: when the lease is
taken, after planning, with progress, and at the end; the heartbeat thread touches only its own lease
file, and is stopped before the final record is written. A run that takes over from a dead or stale
one marks that run's record ``killed``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
from datetime import datetime, timezone

from . import storage
from .config import StorageConfig
from .errors import Fenced, StorageError

log = logging.getLogger(__name__)

LEASE_HEARTBEATS = 3  # a lease lapses after this many missed renewals


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def lock_dir(output_root: str) -> str:
    return storage.join(output_root, "_lock")


def runs_dir(output_root: str) -> str:
    return storage.join(output_root, "_runs")


def gen_uri(output_root: str, n: int) -> str:
    return storage.join(lock_dir(output_root), f"gen-{n:012d}.json")


def _generations(output_root: str, cfg: StorageConfig) -> list[int]:
    out = []
    for uri in storage.list_files(lock_dir(output_root), cfg):
        name = uri.rsplit("/", 1)[-1]
        if name.startswith("gen-") and name.endswith(".json") and name[4:-5].isdigit():
            out.append(int(name[4:-5]))
    return sorted(out)


def holder(output_root: str, cfg: StorageConfig) -> dict | None:
    """The latest lease generation's content when it is held (not released), else None: which run says it
    works on the output now (it may have died without releasing; see ``Lease`` for how that is judged)."""
    gens = _generations(output_root, cfg)
    if not gens:
        return None
    latest = _read_json(gen_uri(output_root, gens[-1]), cfg)
    return latest if latest and latest.get("state") != "released" else None


def _read_json(uri: str, cfg: StorageConfig) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri, cfg))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:  # e.g. emptied by a crash of the machine that wrote it
        raise StorageError(f"{uri} is damaged ({e}); if no run is working on this output, delete it and run again")


def _proc_start(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot): with the pid, it names one process for good."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _process_space() -> dict:
    """What makes a pid meaningful: the host, its boot, and the pid namespace (containers share hostnames)."""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    return {"host": socket.gethostname(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_ns": pid_ns}


def _alive_here(holder: dict) -> bool | None:
    """Whether the holder's process is alive, when its pid can be looked up from here (same host, boot and
    pid namespace); None when that cannot be known."""
    space = _process_space()
    if not holder.get("pid") or space["boot_id"] is None or space["pid_ns"] is None or \
            any(holder.get(k) != v for k, v in space.items()):
        return None
    start = _proc_start(int(holder["pid"]))
    return start is not None and start == holder.get("pid_start")


class Fence:
    """Picklable check for the run's tasks: raises Fenced once a later generation holds the output.

    A passed check is trusted for ``ttl_s`` (on S3 a check costs a HEAD and a LIST): a takeover of a
    live-looking run only happens after its lease lapsed, and the taker then waits
    ``cluster.takeover_grace_s`` more (see Lease.settle), far longer than that."""

    def __init__(self, output_root: str, generation: int, cfg: StorageConfig, ttl_s: float = 1.0):
        self.next_uri = gen_uri(output_root, generation + 1)
        self.cfg, self.ttl_s = cfg, ttl_s
        self._ok_until = 0.0

    def check(self) -> None:
        if time.monotonic() < self._ok_until:
            return
        if storage.exists(self.next_uri, self.cfg):
            raise Fenced("this run no longer holds its output (another run has taken it over); "
                         "nothing more is written")
        self._ok_until = time.monotonic() + self.ttl_s


class Lease:
    """The output's lease for one run: ``acquire``, then ``start`` the heartbeat; ``stop`` and ``release``."""

    def __init__(self, output_root: str, cfg: StorageConfig, run_id: str, heartbeat_s: float):
        self.output_root, self.cfg, self.run_id, self.heartbeat_s = output_root, cfg, run_id, heartbeat_s
        self.generation = 0
        self.lost = threading.Event()
        self.taken_over: dict | None = None
        self.takeover: str | None = None  # "dead" (its process gone, on this host) or "stale" (lease lapsed)
        self._counter = 0
        self._info: dict = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_renewal = time.monotonic()
        self._renewing = threading.Lock()

    @property
    def lease_s(self) -> float:
        return LEASE_HEARTBEATS * self.heartbeat_s

    def fence(self) -> Fence:
        return Fence(self.output_root, self.generation, self.cfg, ttl_s=min(1.0, self.heartbeat_s / 2))

    def settle(self, grace_s: float) -> None:
        """After taking the output from a run whose lease lapsed (its tasks may outlive it, on any host), wait
        ``grace_s`` so that a write that passed its fence check just before our generation existed lands
        before we plan. A holder that died on this host needs no wait: its leftovers were stopped."""
        if self.taken_over and self.takeover == "stale" and grace_s > 0:
            log.warning("waiting %.0f s for writes of run %s that may still be in flight", grace_s,
                        self.taken_over.get("run_id"))
            time.sleep(grace_s)

    def _body(self, state: str = "held") -> bytes:
        return json.dumps({"generation": self.generation, "run_id": self.run_id, **_process_space(),
                           "pid": os.getpid(), "pid_start": _proc_start(os.getpid()), "counter": self._counter,
                           "state": state, "lease_s": self.lease_s, "renewed_at": now_iso(), **self._info},
                          indent=1).encode()

    def _check_store(self) -> None:
        """An object store that ignores If-None-Match would let two runs create one generation: find out first
        (two conditional creates of one probe key; the second must be refused), and refuse such a store."""
        if not storage.is_remote(self.output_root):
            return
        probe = storage.join(lock_dir(self.output_root), f".probe-{self.run_id}")
        first = storage.create_exclusive(probe, b"first", self.cfg)
        second = storage.create_exclusive(probe, b"second", self.cfg)
        kept = storage.read_bytes(probe, self.cfg)
        storage.delete(probe, self.cfg)
        if not first or second or kept != b"first":
            raise StorageError(f"the object store of {self.output_root!r} does not honour conditional writes "
                               "(If-None-Match: *), so one run per output cannot be guaranteed there; use a store "
                               "that does (AWS S3, MinIO) for the output")

    def acquire(self) -> "Lease":
        """Take the output, or raise StorageError when another run holds it and is alive, or the store cannot
        be reached."""
        try:
            return self._acquire()
        except OSError as e:
            raise StorageError(f"cannot take the output's lease in {self.output_root!r}: {type(e).__name__}: "
                               f"{e}") from None

    def _acquire(self) -> "Lease":
        self._check_store()
        wait_for_legacy_runs(self.output_root, self.cfg, self.run_id)
        for attempt in range(100):
            if attempt:
                time.sleep(min(1.0, 0.05 * attempt))
            gens = _generations(self.output_root, self.cfg)
            n = gens[-1] if gens else 0
            holder = _read_json(gen_uri(self.output_root, n), self.cfg) if n else None
            if n and holder is None:
                continue  # pruned between listing and reading: look again
            if holder and holder.get("state") != "released" and not self._dead(holder, n):
                continue  # someone else moved first while we watched
            self.generation = n + 1
            uri = gen_uri(self.output_root, n + 1)
            storage.create_exclusive(uri, self._body(), self.cfg)
            # Read back rather than trust the answer: a conditional PUT retried after a lost response says
            # "exists" for our own object.
            if (_read_json(uri, self.cfg) or {}).get("run_id") == self.run_id:
                self._last_renewal = time.monotonic()
                if holder and holder.get("state") != "released":
                    self.taken_over = holder
                return self
        raise StorageError(f"could not take the output's lease in {lock_dir(self.output_root)!r}: it keeps "
                           "changing hands, or a generation file is unreadable")

    def retire_prior(self) -> str | None:
        """After a takeover: mark the run we took the output from as killed in its record, and stop what it
        left behind when it died on this host. Returns its run id (None when the output was free)."""
        prior = self.taken_over
        if not prior:
            return None
        mark_killed(self.output_root, prior, self.run_id, self.cfg)
        if self.takeover == "dead":
            stop_leftovers(prior)
        return prior.get("run_id")

    def _dead(self, holder: dict, n: int) -> bool:
        """True when ``holder`` (generation n) is provably dead or its lease is stale; raise if it is alive;
        False when the output changed hands meanwhile (the caller looks again)."""
        if _alive_here(holder) is False:
            log.warning("run %s (pid %s on this host) died without releasing the output; taking over",
                        holder.get("run_id"), holder.get("pid"))
            self.takeover = "dead"
            return True
        lease_s = float(holder.get("lease_s") or self.lease_s)
        seen, t0 = holder.get("counter"), time.monotonic()
        log.warning("run %s holds this output (host %s); watching its lease for up to %.0f s",
                    holder.get("run_id"), holder.get("host"), lease_s)
        while time.monotonic() - t0 < lease_s:
            time.sleep(min(1.0, lease_s / 10))
            now = _read_json(gen_uri(self.output_root, n), self.cfg)
            if now is None or storage.exists(gen_uri(self.output_root, n + 1), self.cfg):
                return False  # the output changed hands meanwhile: the caller looks again
            if now.get("state") == "released":
                return True
            if now.get("counter") != seen:
                raise StorageError(f"run {holder.get('run_id')} is still running on this output (host "
                                   f"{holder.get('host')}, pid {holder.get('pid')}, lease renewed while we "
                                   "watched); wait for it to finish or stop it first")
        log.warning("run %s has not renewed its lease for %.0f s; taking over the output", holder.get("run_id"),
                    lease_s)
        self.takeover = "stale"
        return True

    def update(self, **info) -> None:
        """Facts to publish in the lease file from the next renewal on (e.g. the local Ray session)."""
        self._info.update(info)

    def renew(self) -> None:
        """Bump the counter in our generation file (from the heartbeat thread, or at once after ``update``)."""
        with self._renewing:
            try:
                Fence(self.output_root, self.generation, self.cfg, ttl_s=0).check()
                mine = (_read_json(gen_uri(self.output_root, self.generation), self.cfg) or {}).get("run_id")
                if mine != self.run_id:
                    raise Fenced(f"generation {self.generation} now names run {mine}")
            except Fenced as e:
                log.error("run %s has lost the output to a later run (%s)", self.run_id, e)
                self.lost.set()
                return
            self._counter += 1
            storage.write_bytes(gen_uri(self.output_root, self.generation), self._body(), self.cfg)
            self._last_renewal = time.monotonic()

    def _loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except Exception as e:  # a storage hiccup must not kill the heartbeat; a lapsed lease must stop us
                log.warning("lease renewal failed: %s: %s", type(e).__name__, e)
            if time.monotonic() - self._last_renewal > self.lease_s:
                log.error("run %s could not renew its lease for %.0f s; another run may take the output over",
                          self.run_id, self.lease_s)
                self.lost.set()
            if self.lost.is_set():
                return

    def start(self) -> "Lease":
        self._thread = threading.Thread(target=self._loop, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def begin(self, record: dict, grace_s: float) -> None:
        """What every lease holder (run, review, compaction) does once it has the output: retire a lapsed
        holder (noted in ``record``), write ``record``, start the heartbeat, wait out the lapsed holder's
        writes (``settle``)."""
        if self.taken_over:
            record["took_over_from"] = self.retire_prior()
        write_record(self.output_root, record, self.cfg)
        self.start()
        self.settle(grace_s)

    def end(self, record: dict) -> None:
        """Stop the heartbeat, write the final ``record``, give the output back (even if the write fails)."""
        self.stop()  # no renewal may land after the final record
        try:
            write_record(self.output_root, record, self.cfg)
        finally:
            self.release()

    def release(self) -> None:
        """Give the output back, unless it was lost (then it is another run's)."""
        self.stop()
        if self.lost.is_set():
            return
        try:
            Fence(self.output_root, self.generation, self.cfg, ttl_s=0).check()
            storage.write_bytes(gen_uri(self.output_root, self.generation), self._body("released"), self.cfg)
        except Exception as e:
            log.warning("could not release the output's lease (%s); the next run waits for it to lapse", e)


# ------------------------------------------------------------------------------------------ run records

def record_uri(output_root: str, run_id: str) -> str:
    return storage.join(runs_dir(output_root), f"{run_id}.json")


def write_record(output_root: str, record: dict, cfg: StorageConfig) -> str:
    uri = record_uri(output_root, record["run_id"])
    storage.write_bytes(uri, json.dumps(record, indent=2, default=str).encode(), cfg)
    return uri


def read_records(output_root: str, cfg: StorageConfig) -> list[dict]:
    """Every run record, oldest first (run ids start with their UTC start time)."""
    out = []
    for uri in storage.list_files(runs_dir(output_root), cfg):
        if uri.endswith(".json") and not uri.rsplit("/", 1)[-1].startswith("."):
            try:
                r = _read_json(uri, cfg)
            except StorageError as e:  # one damaged record must not hide the others
                log.warning("%s", e)
                continue
            if r is not None:
                out.append(r)
    return sorted(out, key=lambda r: str(r.get("run_id")))


def wait_for_legacy_runs(output_root: str, cfg: StorageConfig, run_id: str) -> None:
    """Runs of versions before the lease kept a heartbeat in their record (``heartbeat_at``). One whose record
    still says running is watched for three of its heartbeats: if it moves, that run is alive (refused);
    if not, it is dead and its record says so from now on."""
    legacy = [r for r in read_records(output_root, cfg)
              if r.get("state") == "running" and "lease_generation" not in r and r.get("run_id") != run_id]
    for r in legacy:
        every = float(((r.get("config") or {}).get("cluster") or {}).get("heartbeat_s") or 10.0)
        seen, t0 = r.get("heartbeat_at"), time.monotonic()
        log.warning("run %s of an earlier version says it is running; watching its heartbeat for %.0f s",
                    r.get("run_id"), LEASE_HEARTBEATS * every)
        while time.monotonic() - t0 < LEASE_HEARTBEATS * every:
            time.sleep(min(1.0, every / 2))
            now = _read_json(record_uri(output_root, r["run_id"]), cfg) or {}
            if now.get("state") != "running":
                break
            if now.get("heartbeat_at") != seen:
                raise StorageError(f"run {r['run_id']} of an earlier version is still running on this output; "
                                   "wait for it to finish or stop it first")
        else:
            mark_killed(output_root, r, run_id, cfg)


def mark_killed(output_root: str, holder: dict, by_run: str, cfg: StorageConfig) -> None:
    """The record of a run whose lease we took over says it was killed (it cannot say so itself)."""
    run_id = holder.get("run_id")
    rec = _read_json(record_uri(output_root, run_id), cfg) if run_id else None
    if rec is None or rec.get("state") not in (None, "running"):
        return
    rec.update(state="killed", ended_by=f"lease lapsed or holder died; output taken over by run {by_run}",
               noticed_at=now_iso())
    write_record(output_root, rec, cfg)


def stop_leftovers(holder: dict) -> int:
    """Stop the processes of a dead run's local Ray on this host (a driver killed with SIGKILL leaves some
    workers behind). Found by the Ray session folder in their command line or in their open log files;
    returns how many were signalled. Linux only (reads /proc); elsewhere does nothing."""
    session = holder.get("ray_session")
    if not session or not os.path.isdir("/proc") or any(holder.get(k) != v for k, v in _process_space().items()):
        return 0
    killed = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                mine = session.encode() in f.read()
            if not mine:
                mine = any(session in os.readlink(f"/proc/{pid}/fd/{fd}") for fd in ("1", "2")
                           if os.path.exists(f"/proc/{pid}/fd/{fd}"))
            if mine:
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
        except OSError:  # gone meanwhile, or not ours to inspect
            continue
    if killed:
        log.warning("stopped %d leftover process(es) of run %s's local Ray (%s)", killed, holder.get("run_id"), session)
    return killed
