"""Faster ways to run an inference forward (torch.compile, CUDA graphs), each with a fallback to eager.

Both specialise on the input shape, so the caller feeds one fixed micro-batch shape (padding the last one)
instead of recompiling or re-capturing for every tail size. A failure on first use (no compiler
toolchain, an op that cannot be captured) logs once and runs eagerly from then on; out-of-memory is not
a failure of the method and propagates, so the caller can shrink its micro-batch.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]


class CudaGraphed:
    """Replays one captured CUDA graph per input shape: one launch instead of hundreds of small kernels.

    The input is copied into the captured buffer and the output cloned out of it, because the next replay
    overwrites both. All graphs share one memory pool: replays never overlap (one stream), and nothing but
    the cloned outputs outlives a replay.
    """

    def __init__(self, fn: Forward, warmup: int = 2):
        self.fn, self.warmup = fn, warmup
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:
            raise RuntimeError("CUDA graphs need a CUDA device")
        key = (tuple(x.shape), x.dtype, x.stride(), x.device)
        if key not in self.graphs:
            self.graphs[key] = self._capture(x)
            log.info("captured a CUDA graph for input %s %s", tuple(x.shape), x.dtype)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()

    def _capture(self, x: torch.Tensor):
        static_in = x.clone()  # keeps x's memory format
        # Lazy initialisation and cuDNN's algorithm search must happen before capture, on a side stream.
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.fn(static_in)
        self.pool = graph.pool()
        return graph, static_in, static_out


class WithFallback:
    """Calls ``fast``; the first time it fails for any reason but out-of-memory, calls ``eager`` for good."""

    def __init__(self, fast: Forward, eager: Forward, what: str):
        self.fast: Forward | None = fast
        self.eager, self.what = eager, what

    @property
    def active(self) -> bool:
        return self.fast is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast is not None:
            try:
                return self.fast(x)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure of the method; eager re-raises real errors
                log.warning("%s failed (%s: %s); running eagerly from now on", self.what, type(e).__name__, e)
                self.fast = None
        return self.eager(x)


def accelerate(model: torch.nn.Module, compile: bool, cuda_graphs: bool) -> tuple[Forward, bool]:
    """The forward to call, and whether it wants one fixed input shape."""
    if not (compile or cuda_graphs):
        return model, False
    fast: Forward = model
    what = []
    if compile:
        fast = torch.compile(model, dynamic=False)
        what.append("torch.compile")
    if cuda_graphs:
        fast = CudaGraphed(fast)
        what.append("CUDA graphs")
    return WithFallback(fast, model, " + ".join(what)), True
