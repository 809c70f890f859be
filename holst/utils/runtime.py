"""Device, dtype and logging helpers. Nothing here changes global state at import."""

from __future__ import annotations

import logging

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


def get_logger(name: str = "holst") -> logging.Logger:
    """The package logger (handlers are configured by the CLI entry point, not here)."""
    return logging.getLogger(name)


def setup_cli_logging(level: int = logging.INFO) -> None:
    """Configure a simple stderr handler; called by entry points only."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
