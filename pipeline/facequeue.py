"""Batching by faces across Ray batches: one device thread restores what concurrent Restore calls hand it.

Ray Data gives a Restore actor a batch of images; how many faces that is varies from none to hundreds, so
restoring each batch on its own leaves a part-filled micro-batch at the end of every batch, and the device
waits while the actor builds one batch's output and reads the next. With several calls in flight on the
actor (``cluster.restore_calls_in_flight``), each call parses its batch and queues its faces here; the
device thread takes queued faces in whole micro-batches, across calls (a call's faces may go to the
device in several chunks, and a chunk may hold several calls' faces), and hands each call its own
restorations back. So micro-batches stay full across Ray batches, and the next batch's faces are queued
while the device works on this one's. A part-filled micro-batch goes to the device only when no more
faces are queued and no other call is on its way (``coming``), or after ``WAIT_S``.

Only this thread touches the device (a call without faces never queues). A chunk that fails is restored
again call by call, so a call fails only with what fails on its own; a call marked ``alone`` (the caller's
image-by-image retry) is never combined with others.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class _Request:
    crops: np.ndarray
    mats: np.ndarray
    alone: bool
    taken: int = 0                      # faces handed to the device so far
    left: int = 0                       # faces not yet restored (or given up on)
    parts: list = field(default_factory=list)  # (start, chunk output, offset in it, faces), by start
    error: BaseException | None = None
    seconds: float = 0.0                # this call's share of the device thread's time
    cpu: float = 0.0                    # ... and of the CPU time meanwhile (FaceQueue's cpu_clock)
    done: threading.Event = field(default_factory=threading.Event)


class FaceQueue:
    """``restore(crops, mats)`` from any number of threads; ``restore_fn(crops, mats)`` runs in one device
    thread on chunks of up to ``chunk`` faces, whole multiples of ``micro_batch`` while enough are queued.
    ``restore_fn`` returns a dataclass of arrays with one entry per face (``restorer.Restored``); each call
    gets those of its own faces (a view when they came from one chunk). ``chunks``: faces per device call,
    in order (the last 1,000; for tests and benches)."""

    IDLE_S = 10.0  # the device thread ends after this long without work (it holds the restore function)
    WAIT_S = 0.05  # longest wait for an announced call's faces before running a part-filled micro-batch

    def __init__(self, restore_fn: Callable, micro_batch: int, chunk: int, combine: bool = True,
                 cpu_clock: Callable[[], float] = time.process_time):
        """``combine=False``: each call's faces go to the device whole and alone (one call in flight: there
        is nothing to combine them with, and cutting them would only add a wait for the device).
        ``cpu_clock``: the CPU time charged to the faces of a run: the process's (the default: a CPU device,
        whose work is torch's threads) or the device thread's own (a GPU, where the process's would also
        count the other calls' threads meanwhile)."""
        self._restore_fn, self._mb, self._combine = restore_fn, max(1, micro_batch), combine
        self._cpu_clock = cpu_clock
        self._chunk = max(self._mb, chunk // self._mb * self._mb)
        self._queue: collections.deque[_Request] = collections.deque()
        self._ready = threading.Condition()
        self._coming = 0  # calls announced (``coming``) whose faces are not queued yet
        self._running = False
        self.thread: threading.Thread | None = None
        self.chunks: collections.deque[int] = collections.deque(maxlen=1000)

    @contextlib.contextmanager
    def coming(self):
        """Around a call's work before ``restore``: the device thread may wait (``WAIT_S``) for its faces
        rather than run a part-filled micro-batch. Yields the token to pass to ``restore``."""
        token = {"queued": False}
        with self._ready:
            self._coming += 1
        try:
            yield token
        finally:
            self.arrived(token)

    def arrived(self, token: dict | None) -> None:
        """The announced call will queue no (more) faces: nobody need wait for it."""
        with self._ready:
            self._settle(token)
            self._ready.notify_all()

    def _settle(self, token: dict | None) -> None:
        """``token``'s call is no longer on its way (under the lock)."""
        if token is not None and not token["queued"]:
            token["queued"] = True
            self._coming -= 1

    def restore(self, crops: np.ndarray, mats: np.ndarray, alone: bool = False,
                token: dict | None = None) -> tuple[object, float, float]:
        """The restoration of these faces (blocks until done), the device thread's seconds on them (their
        share of their chunks': not the time spent waiting behind other calls) and the CPU seconds meanwhile
        (their share, by ``cpu_clock``); raises what restoring them on their own raised, with those two
        figures as its ``device_s`` and ``cpu_s`` (a failed attempt spent them too)."""
        req = _Request(crops, mats, alone, left=len(crops))
        if not len(crops):
            self.arrived(token)
            return self._restore_fn(crops, mats), 0.0, 0.0  # nothing for the device: no need to queue
        with self._ready:
            self._queue.append(req)
            self._settle(token)
            self._ready.notify_all()
            if not self._running:
                thread = threading.Thread(target=self._loop, name="face-queue", daemon=True)
                try:
                    thread.start()
                except BaseException:  # no thread, so nobody would ever take it
                    self._queue.remove(req)
                    raise
                self._running, self.thread = True, thread
        req.done.wait()
        if req.error is not None:
            error, req.error = req.error, None
            try:
                with contextlib.suppress(Exception):  # an exception type that takes no attributes says nothing
                    error.device_s, error.cpu_s = req.seconds, req.cpu
                raise error
            finally:  # no cycle error -> traceback -> this frame -> error keeping the crops alive
                del error, req
        if len(req.parts) == 1:
            _, out, at, n = req.parts[0]
            return _cut(out, at, at + n), req.seconds, req.cpu
        req.parts.sort(key=lambda p: p[0])
        pieces = [_cut(out, at, at + n) for _, out, at, n in req.parts]
        first = pieces[0]
        return type(first)(*(np.concatenate([getattr(p, f.name) for p in pieces])
                             for f in dataclasses.fields(first))), req.seconds, req.cpu

    def _queued(self) -> int:
        n = 0
        for r in self._queue:
            if r.alone:
                break
            n += len(r.crops) - r.taken
        return n

    def _take(self) -> list[tuple[_Request, int, int]]:
        """The next chunk as (request, first face, end) pieces, oldest request first; none after ``IDLE_S``
        without work (the thread then ends)."""
        with self._ready:
            while not self._queue:
                if not self._ready.wait(self.IDLE_S) and not self._queue:
                    self._running = False  # under the lock: a request now starts another thread
                    return []
            head = self._queue[0]
            if head.alone or not self._combine:
                self._queue.popleft()
                head.taken = len(head.crops)
                return [(head, 0, len(head.crops))]
            deadline = time.monotonic() + self.WAIT_S
            while self._queued() < self._mb and self._coming and not self._queue[-1].alone:
                if not self._ready.wait(max(0.0, deadline - time.monotonic())):
                    break
            queued = self._queued()
            want = min(queued, self._chunk)
            if want >= self._mb:
                want -= want % self._mb  # whole micro-batches; the rest waits for the next call's faces
            pieces = []
            while want and self._queue and not self._queue[0].alone:
                r = self._queue[0]
                k = min(want, len(r.crops) - r.taken)
                pieces.append((r, r.taken, r.taken + k))
                r.taken += k
                want -= k
                if r.taken == len(r.crops):
                    self._queue.popleft()
            return pieces

    def _run(self, pieces: list[tuple[_Request, int, int]]) -> None:
        if len(pieces) == 1:
            r, a, b = pieces[0]
            crops, mats = r.crops[a:b], r.mats[a:b]
        else:
            crops = np.concatenate([r.crops[a:b] for r, a, b in pieces])
            mats = np.concatenate([r.mats[a:b] for r, a, b in pieces])
        self.chunks.append(len(crops))
        t0, c0 = time.perf_counter(), self._cpu_clock()
        try:
            out = self._restore_fn(crops, mats)
        finally:  # a failed chunk's time counts too, shared by the calls it held (they are retried alone)
            seconds, cpu = time.perf_counter() - t0, self._cpu_clock() - c0
            for r, a, b in pieces:
                r.seconds += seconds * (b - a) / len(crops)
                r.cpu += cpu * (b - a) / len(crops)
        at = 0
        for r, a, b in pieces:
            r.parts.append((a, out, at, b - a))
            at += b - a

    def _try(self, pieces: list[tuple[_Request, int, int]]) -> BaseException | None:
        """Run a chunk; what it raised, without its traceback: the failed chunk's frames hold its crops and
        device tensors, which must be free before the retries (an out-of-memory would fail them too)."""
        try:
            self._run(pieces)
            return None
        except BaseException as e:  # noqa: BLE001 - handed to the callers, who record it per image
            e.__context__ = None
            return e.with_traceback(None)

    def _loop(self) -> None:
        while pieces := self._take():
            error = self._try(pieces)
            if error is not None and len(pieces) == 1:
                pieces[0][0].error = error
            elif error is not None:  # which call's faces failed it: each again on its own
                log.info("a chunk of %d calls' faces failed (%s: %s); restoring them call by call",
                         len(pieces), type(error).__name__, error)
                del error
                for piece in pieces:
                    piece[0].error = self._try([piece]) or piece[0].error
            for r, a, b in pieces:
                r.left -= b - a
                if r.left == 0:
                    r.done.set()
                elif r.error is not None and r.taken < len(r.crops):
                    self._give_up(r)
            del pieces  # nothing of this chunk stays referenced while the thread waits for the next

    def _give_up(self, r: _Request) -> None:
        """A call whose faces failed: the rest of them are not sent to the device."""
        with self._ready:
            if r in self._queue:
                self._queue.remove(r)
            r.left -= len(r.crops) - r.taken
            r.taken = len(r.crops)
        if r.left == 0:
            r.done.set()


def _cut(out, a: int, b: int):
    return type(out)(*(getattr(out, f.name)[a:b] for f in dataclasses.fields(out)))
