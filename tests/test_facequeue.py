"""Faces of concurrent Restore calls restored together by one device thread (pipeline/facequeue.py)."""

import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from pipeline.facequeue import FaceQueue


@dataclass
class Out:
    faces: np.ndarray
    similarity: np.ndarray


class Device:
    """A stand-in restore_fn: face i comes back as crop i + 1; records who called and with how many faces.
    A crop whose first value is 99 makes any chunk holding it fail. ``gate`` holds the first call until
    set, so that the calls behind it queue up."""

    def __init__(self, gate: threading.Event | None = None):
        self.calls, self.threads, self.gate = [], set(), gate
        self.entered = threading.Event()

    def __call__(self, crops, mats):
        self.entered.set()
        if self.gate is not None and not self.calls:
            self.gate.wait(10)
        self.calls.append(len(crops))
        self.threads.add(threading.current_thread().name)
        if (crops[:, 0] == 99).any():
            raise ValueError("a bad face")
        return Out(crops + 1, mats[:, 0].astype(np.float32))


def _req(value: int, n: int):
    return np.full((n, 3), value, np.int64), np.full((n, 2), value, np.int64)


def _until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _in_threads(queue, requests, device, alone=False):
    """Each request from its own thread, in order: the first held on the device by its gate, the others
    queued behind it (waited for, not slept for: the order must not depend on the machine's load)."""
    results, errors = {}, {}

    def call(k, crops, mats):
        try:
            results[k] = queue.restore(crops, mats, alone)
        except Exception as e:  # noqa: BLE001
            errors[k] = e

    threads = [threading.Thread(target=call, args=(k, *r)) for k, r in enumerate(requests)]
    for k, t in enumerate(threads):
        t.start()
        _until(device.entered.is_set if k == 0 else lambda: sum(r.taken == 0 for r in queue._queue) == k)
    return threads, results, errors


def _join(threads):
    for t in threads:
        t.join(10)
        assert not t.is_alive()


def test_faces_go_to_the_device_in_whole_micro_batches_across_calls_and_each_call_gets_its_own():
    gate = threading.Event()
    device = Device(gate)
    q = FaceQueue(device, micro_batch=4, chunk=16)
    requests = [_req(10, 5), _req(20, 3), _req(30, 7), _req(40, 9), _req(50, 2)]
    threads, results, errors = _in_threads(q, requests, device)
    gate.set()
    _join(threads)
    assert not errors
    # 4 of the first call's 5 while it was alone; then 16 from four calls (the first's last face, all of
    # the next two, 5 of the fourth's 9), the fourth's next 4, and the last 2 (nothing more to wait for)
    assert device.calls == [4, 16, 4, 2] and list(q.chunks) == device.calls
    assert device.threads == {"face-queue"}  # one thread touches the device
    for k, (crops, mats) in enumerate(requests):
        out, seconds, cpu = results[k]
        assert np.array_equal(out.faces, crops + 1) and np.array_equal(out.similarity, mats[:, 0])
        assert seconds >= 0 and cpu >= 0
    single = q.restore(*_req(7, 3))[0]  # one chunk: handed back as a view of the device's output
    assert np.array_equal(single.faces, _req(7, 3)[0] + 1)


def test_calls_marked_alone_are_neither_combined_nor_split():
    gate = threading.Event()
    device = Device(gate)
    q = FaceQueue(device, micro_batch=4, chunk=8)
    threads, results, errors = _in_threads(q, [_req(1, 1), _req(2, 11), _req(3, 1)], device, alone=True)
    gate.set()
    _join(threads)
    assert device.calls == [1, 11, 1] and len(results) == 3 and not errors


def test_a_failing_chunk_is_restored_again_call_by_call_so_only_the_culprit_fails():
    gate = threading.Event()
    device = Device(gate)
    q = FaceQueue(device, micro_batch=2, chunk=16)
    threads, results, errors = _in_threads(q, [_req(1, 2), _req(2, 3), _req(99, 2), _req(4, 4)], device)
    gate.set()
    _join(threads)
    assert device.calls == [2, 8, 3, 2, 3, 1]  # the chunk of three calls' faces, then each piece alone
    assert set(errors) == {2} and isinstance(errors[2], ValueError)
    assert np.array_equal(results[3][0].faces, _req(4, 4)[0] + 1) and np.array_equal(results[1][0].faces, _req(2, 3)[0] + 1)


def test_a_failed_chunks_device_time_counts_for_the_calls_it_held():
    """The calls whose faces were in a chunk that failed spent that device time too: their seconds include
    their share of it (the failing chunk here takes at least 0.3 s; a lower bound, whatever the machine)."""
    gate = threading.Event()
    device = Device(gate)

    def slow_to_fail(crops, mats):
        if (crops[:, 0] == 99).any() and len(crops) > 2:
            time.sleep(0.3)
            c0 = time.thread_time()
            while time.thread_time() - c0 < 0.2:  # 0.2 s of CPU, however long the machine takes to give it
                pass
        return device(crops, mats)

    q = FaceQueue(slow_to_fail, micro_batch=2, chunk=16, cpu_clock=time.thread_time)
    threads, results, errors = _in_threads(q, [_req(1, 2), _req(2, 3), _req(99, 2), _req(4, 4)], device)
    gate.set()
    _join(threads)
    assert device.calls == [2, 8, 3, 2, 3, 1] and set(errors) == {2}
    assert results[1][1] >= 0.3 * 3 / 8  # its 3 of the failed chunk's 8 faces
    assert results[3][1] >= 0.3 * 3 / 8
    assert results[1][2] >= 0.2 * 3 / 8 and results[3][2] >= 0.2 * 3 / 8  # and of its CPU


def test_a_part_filled_micro_batch_waits_for_an_announced_call(monkeypatch):
    """While another call is reading its batch (``coming``), the device thread waits (up to WAIT_S, here
    long enough for any machine) for its faces instead of sending a part-filled micro-batch; unannounced,
    it does not wait."""
    monkeypatch.setattr(FaceQueue, "WAIT_S", 30.0)
    device = Device()
    q = FaceQueue(device, micro_batch=4, chunk=8)
    got = {}
    with q.coming() as token:
        first = threading.Thread(target=lambda: got.setdefault(0, q.restore(*_req(1, 2))))
        first.start()
        _until(lambda: q._queued() == 2)
        time.sleep(0.01)
        got[1] = q.restore(*_req(2, 2), token=token)
    first.join(10)
    assert device.calls == [4] and np.array_equal(got[0][0].faces, _req(1, 2)[0] + 1)
    assert q._coming == 0
    t0 = time.monotonic()
    q.restore(*_req(3, 2))
    assert device.calls == [4, 2] and time.monotonic() - t0 < 20  # nobody announced: no 30 s wait
    with q.coming() as token:  # announced, then says it brings nothing more: no wait either
        q.arrived(token)
        t0 = time.monotonic()
        q.restore(*_req(4, 2))
    assert device.calls == [4, 2, 2] and time.monotonic() - t0 < 20


def test_a_call_that_fails_on_its_own_still_says_what_it_spent():
    """A call whose faces fail alone (no retry within the queue) raises what failed, with the device thread's
    seconds and CPU on them: the caller counts a failed attempt too (a lower bound, whatever the machine)."""

    def fail_slowly(crops, mats):
        time.sleep(0.3)
        c0 = time.thread_time()
        while time.thread_time() - c0 < 0.2:
            pass
        raise ValueError("a bad face")

    for combine in (True, False):
        q = FaceQueue(fail_slowly, micro_batch=2, chunk=16, combine=combine, cpu_clock=time.thread_time)
        with pytest.raises(ValueError, match="a bad face") as e:
            q.restore(*_req(99, 3), alone=not combine)
        assert e.value.device_s >= 0.3 and e.value.cpu_s >= 0.2


def test_a_failed_chunk_holds_nothing_while_its_calls_are_retried():
    """The failed chunk's frames (in the real restorer: its crops and device tensors) are gone before the
    retries start, without waiting for Python's cycle collector: an out-of-memory would fail them too."""
    import gc
    import weakref

    class Tensor:
        pass

    alive_at_retry, refs = [], []
    gate, entered = threading.Event(), threading.Event()

    def device(crops, mats):
        held = Tensor()  # what a failed forward's frames hold
        refs.append(weakref.ref(held))
        if len(refs) == 1:
            entered.set()
            gate.wait(10)
        if (crops[:, 0] == 99).any():
            raise ValueError("a bad face")
        alive_at_retry.append(sum(r() is not None for r in refs[:-1]))
        return Out(crops + 1, mats[:, 0].astype(np.float32))

    device.entered = entered
    q = FaceQueue(device, micro_batch=2, chunk=16)
    gc.disable()
    try:
        threads, results, errors = _in_threads(q, [_req(1, 2), _req(2, 2), _req(99, 2)], device)
        gate.set()
        _join(threads)
    finally:
        gc.enable()
    assert set(errors) == {2} and len(results) == 2
    assert alive_at_retry == [0, 0]  # the first chunk; the retry of [2, 99]: nothing of the failure alive


def test_a_device_thread_that_cannot_start_fails_the_call_instead_of_hanging_it(monkeypatch):
    device = Device()
    q = FaceQueue(device, micro_batch=4, chunk=8)
    real = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda self: (_ for _ in ()).throw(RuntimeError("can't start")))
    with pytest.raises(RuntimeError, match="can't start"):
        q.restore(*_req(1, 2))
    monkeypatch.setattr(threading.Thread, "start", real)
    assert not q._queue and q.restore(*_req(2, 2))[0].faces.shape == (2, 3)


def test_the_device_thread_ends_when_idle_and_a_new_call_starts_another(monkeypatch):
    monkeypatch.setattr(FaceQueue, "IDLE_S", 0.2)
    device = Device()
    q = FaceQueue(device, micro_batch=4, chunk=8)
    assert q.restore(*_req(1, 2))[0].faces.shape == (2, 3)
    first = q.thread
    first.join(5)
    assert not first.is_alive()  # so the model is not held by it
    assert q.restore(*_req(2, 1))[0].faces.shape == (1, 3) and device.calls == [2, 1]
    assert q.thread is not first
    with pytest.raises(ValueError, match="a bad face"):
        q.restore(*_req(99, 1))


def test_without_combining_each_call_goes_to_the_device_whole():
    """One call in flight (combine=False): a call's faces are not cut into micro-batch multiples."""
    gate = threading.Event()
    device = Device(gate)
    q = FaceQueue(device, micro_batch=4, chunk=8, combine=False)
    threads, results, errors = _in_threads(q, [_req(1, 5), _req(2, 3), _req(3, 11)], device)
    gate.set()
    _join(threads)
    assert device.calls == [5, 3, 11] and not errors and len(results) == 3
