"""Timing helpers shared by the bench scripts (run as ``python bench/<name>.py``, so this imports as ``timing``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_device(requested: str, threads: int) -> str:
    """'cuda' when ``requested`` ('auto' or 'cuda') and a GPU is there, else 'cpu'; first sets torch's CPU
    threads to ``threads`` (0: torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)
    return "cuda" if torch.cuda.is_available() and requested in ("auto", "cuda") else "cpu"


def device_label(device: str) -> str:
    """The benchmark JSON's ``device``: the GPU's name, or 'cpu (N threads)'."""
    return torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def timed(fn: Callable[[], object], steps: int, device: torch.device) -> float:
    """Median seconds of ``steps`` calls after one warm-up call."""
    return timed_steps(fn, steps, 1, device)["step_s"]


def timed_steps(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> dict:
    """``warmup`` untimed calls (compilation happens there), then ``steps`` timed ones.

    Returns {"step_s": median wall seconds, "cpu_s": median process CPU seconds (all threads; less
    sensitive than wall time to other jobs on a shared CPU), "warmup_s": seconds of the warm-up calls,
    "last": the last call's result}.
    """
    return interleaved_steps([fn], steps, warmup, device)[0]


def interleaved_steps(fns: list[Callable[[], object]], steps: int, warmup: int, device: torch.device) -> list[dict]:
    """:func:`timed_steps` of several set-ups at once: each warmed up in turn, then timed round-robin.

    Step i of every function runs before step i + 1 of any, so slow phases of a shared machine fall on
    all of them alike. Returns one :func:`timed_steps`-style dict per function, in order.
    """
    out = []
    for fn in fns:
        t_warm = time.perf_counter()
        for _ in range(warmup):
            fn()
        sync(device)
        out.append({"warmup_s": time.perf_counter() - t_warm, "times": [], "cpu": [], "last": None})
    for _ in range(steps):
        for fn, o in zip(fns, out):
            t0, c0 = time.perf_counter(), time.process_time()
            o["last"] = fn()
            sync(device)
            o["times"].append(time.perf_counter() - t0)
            o["cpu"].append(time.process_time() - c0)
    return [{"step_s": sorted(o["times"])[steps // 2], "cpu_s": sorted(o["cpu"])[steps // 2],
             "warmup_s": o["warmup_s"], "last": o["last"]} for o in out]
