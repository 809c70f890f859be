"""Device, dtype and logging helpers. Nothing here changes global state at import."""

from __future__ import annotations

import logging

import torch

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps if available, else cpu; other strings pass through."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


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
        raise ValueError(f"dtype={dtype!r} is not allowed; choose one of {sorted(set(_DTYPES))} or 'auto'") from None


def get_logger(name: str = "holst") -> logging.Logger:
    """The package logger (handlers are configured by the CLI entry point, not here)."""
    return logging.getLogger(name)


def setup_cli_logging(level: int = logging.INFO) -> None:
    """Configure a simple stderr handler; called by entry points only."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
