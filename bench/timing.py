"""Timing helpers shared by the bench scripts (run as ``python bench/<name>.py``, so this imports as ``timing``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], steps: int, device: torch.device) -> float:
    """Median seconds of ``steps`` calls after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
