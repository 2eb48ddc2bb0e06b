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
TAKEOVER_GRACE = 1   # heartbeats a taker waits before planning, for writes that passed their fence check


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
        if name.startswith("gen-") and name.endswith(".json"):
            out.append(int(name[4:-5]))
    return sorted(out)


def _read_json(uri: str, cfg: StorageConfig) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri, cfg))
    except FileNotFoundError:
        return None


def _proc_start(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot): with the pid, it names one process for good."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive_here(holder: dict) -> bool | None:
    """Whether the holder's process is alive, when it ran on this host; None when that cannot be known."""
    if holder.get("host") != socket.gethostname() or not holder.get("pid"):
        return None
    start = _proc_start(int(holder["pid"]))
    if start is None:
        return False if os.path.isdir("/proc") else None
    return start == holder.get("pid_start")


class Fence:
    """Picklable check for the run's tasks: raises Fenced once a later generation holds the output.

    A passed check is trusted for ``ttl_s`` (on S3 a check costs a HEAD and a LIST): a takeover of a
    live-looking run only happens after its lease lapsed, and the taker then waits ``TAKEOVER_GRACE``
    heartbeats more (see Lease.settle), far longer than that."""

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

    def settle(self) -> None:
        """After taking the output from a run on another host (whose tasks may outlive it), wait until a write
        that passed its fence check just before our generation existed has landed, so planning sees it.
        A dead holder on this host needs no wait: its leftover processes were stopped (stop_leftovers)."""
        if self.taken_over and _alive_here(self.taken_over) is None:
            time.sleep(TAKEOVER_GRACE * float(self.taken_over.get("lease_s") or self.lease_s) / LEASE_HEARTBEATS)

    def _body(self, state: str = "held") -> bytes:
        return json.dumps({"generation": self.generation, "run_id": self.run_id, "host": socket.gethostname(),
                           "pid": os.getpid(), "pid_start": _proc_start(os.getpid()), "counter": self._counter,
                           "state": state, "lease_s": self.lease_s, "renewed_at": now_iso(), **self._info},
                          indent=1).encode()

    def acquire(self) -> "Lease":
        """Take the output, or raise StorageError when another run holds it and is alive."""
        while True:
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
            # "exists" for our own object, and a store that ignores If-None-Match would let a racer's
            # object replace ours (the one read back wins; the other run sees a live holder).
            if (_read_json(uri, self.cfg) or {}).get("run_id") == self.run_id:
                self._last_renewal = time.monotonic()
                if holder and holder.get("state") != "released":
                    self.taken_over = holder
                return self

    def _dead(self, holder: dict, n: int) -> bool:
        """True when ``holder`` (generation n) is provably dead or its lease is stale; raise if it is alive;
        False when the output changed hands meanwhile (the caller looks again)."""
        alive = _alive_here(holder)
        if alive is True:
            raise StorageError(f"run {holder.get('run_id')} is still running on this output (pid {holder.get('pid')} "
                               "on this host); wait for it to finish or stop it first")
        if alive is False:
            log.warning("run %s (pid %s on this host) died without releasing the output; taking over",
                        holder.get("run_id"), holder.get("pid"))
            return True
        lease_s = float(holder.get("lease_s") or self.lease_s)
        seen, t0 = holder.get("counter"), time.monotonic()
        log.warning("run %s holds this output (host %s); watching its lease for up to %.0f s",
                    holder.get("run_id"), holder.get("host"), lease_s)
        while time.monotonic() - t0 < lease_s:
            time.sleep(min(1.0, lease_s / 10))
            now = _read_json(gen_uri(self.output_root, n), self.cfg)
            if now is None or now.get("state") == "released" or storage.exists(gen_uri(self.output_root, n + 1),
                                                                                 self.cfg):
                return now is not None and now.get("state") == "released" and \
                    not storage.exists(gen_uri(self.output_root, n + 1), self.cfg)
            if now.get("counter") != seen:
                raise StorageError(f"run {holder.get('run_id')} is still running on this output (host "
                                   f"{holder.get('host')}, lease renewed while we watched); wait for it to finish "
                                   "or stop it first")
        log.warning("run %s has not renewed its lease for %.0f s; taking over the output", holder.get("run_id"),
                    lease_s)
        return True

    def update(self, **info) -> None:
        """Facts to publish in the lease file from the next renewal on (e.g. the local Ray session)."""
        self._info.update(info)

    def renew(self) -> None:
        """Bump the counter in our generation file (from the heartbeat thread, or at once after ``update``)."""
        with self._renewing:
            try:
                Fence(self.output_root, self.generation, self.cfg, ttl_s=0).check()
            except Fenced:
                log.error("run %s has lost the output to a later run", self.run_id)
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
            r = _read_json(uri, cfg)
            if r is not None:
                out.append(r)
    return sorted(out, key=lambda r: str(r.get("run_id")))


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
    if not session or holder.get("host") != socket.gethostname() or not os.path.isdir("/proc"):
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
