"""Device, dtype and logging helpers. Nothing here changes global state at import."""

from __future__ import annotations

import ctypes
import logging
import os
import platform

import torch

from holst.errors import ConfigError

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps if available, else cpu; others are checked and returned.

    Raises:
        ConfigError for a name torch does not know, or a device this machine / torch build lacks
        (e.g. 'cuda' with a CPU-only torch), instead of torch's assertion deep inside a module.
    """
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device={device!r} is not a device name; use auto, cpu, cuda, cuda:1 or mps ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"device={str(device)!r} is not available: {why}; use cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={str(device)!r} is not available: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s) (cuda:0 ..)")
    elif dev.type == "mps" and not _mps_available():
        raise ConfigError(f"device={str(device)!r} is not available on this machine; use cpu or auto")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype:
    """Parse 'fp32'/'bf16'/'fp16'/'auto' (auto: bf16 on CUDA with bf16 support, else fp32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device is not None and device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"dtype={dtype!r} is not allowed; choose one of {sorted(set(_DTYPES))} or 'auto'") from None


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op CPU threads; called once by entry points (library code never does).

    Args:
        threads: >= 1, or None / 0 = leave torch's choice.
    Raises:
        ConfigError for a negative count.
    """
    if threads is None or threads == 0:
        return
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ConfigError(f"threads={threads!r} must be an integer >= 1 (or 0 / unset = torch's choice)")
    torch.set_num_threads(threads)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit machines
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    A training step on a CPU frees its activations (hundreds of MB) and allocates them again in the next
    step. By default glibc unmaps large blocks and trims the top of the heap when they are freed, so every
    step faults them back in, zero-filled: ~91k page faults and ~0.2 s of kernel time a compiled step of
    the emoji model on the 2-core dev CPU (1.10 -> 1.01 s a step with this). Here blocks of up to 32 MiB
    come from the heap and the heap is never trimmed: the process keeps the memory of its peak, which a
    training loop reaches every step anyway. Process-wide; called by the trainers' engine on a CPU.

    Returns:
        True if applied; False off Linux/glibc, or where ``MALLOC_MMAP_THRESHOLD_`` or
        ``MALLOC_TRIM_THRESHOLD_`` is set in the environment (the user's own tuning wins).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or any(k in os.environ for k in _MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # M_TRIM_THRESHOLD takes a C int here: 2**31 - 1 bytes is beyond any heap top this trims at
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def get_logger(name: str = "holst") -> logging.Logger:
    """The package logger (handlers are configured by the CLI entry point, not here)."""
    return logging.getLogger(name)


def setup_cli_logging(level: int = logging.INFO) -> None:
    """Configure a simple stderr handler; called by entry points only."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
