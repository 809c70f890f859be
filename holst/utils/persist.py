"""Component persistence: a directory holding ``config.json`` + ``model.safetensors``.

Loading never executes code from a file: safetensors by default; legacy PyTorch pickles only
through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from holst.errors import CheckpointError  # re-exported here

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

M = TypeVar("M", bound="PretrainedMixin")


def load_state_dict_file(path: str | Path, *, mmap: bool = True) -> dict[str, Any]:
    """Read tensors from a ``.safetensors`` file or a legacy pickle (``weights_only=True``).

    Args:
        path: the file.
        mmap: memory-map legacy zip pickles so a 1.3B checkpoint is not read into RAM twice.
    Returns:
        The loaded mapping (tensors, or nested dicts as Lightning checkpoints hold them).
    Raises:
        CheckpointError naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises several types for corrupt headers
            raise CheckpointError(f"checkpoint {path} is not a valid safetensors file: {e}") from e
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if mmap and "mmap" in str(e):  # old (non-zip) pickle format cannot be memory-mapped
                return torch.load(str(path), map_location="cpu", weights_only=True)
            raise
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} could not be loaded safely (weights_only=True refuses code objects; "
            f"the file may be corrupt or not a PyTorch checkpoint): {type(e).__name__}: {_reason(e)}"
        ) from e


def _reason(error: Exception) -> str:
    """The line of torch's multi-line load error that says what was refused ('unsupported GLOBAL posix.system')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [""])[0]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same directory and rename, so readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _chmod_default(tmp)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Atomically save tensors (made contiguous, shared storage untied) as safetensors."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().contiguous().clone() if _shares_storage(v, state) else v.detach().contiguous()
               for k, v in state.items()}
    save_file(tensors, str(tmp), metadata=metadata)
    _chmod_default(tmp)
    os.replace(tmp, path)


def _chmod_default(path: str | Path) -> None:
    """Give a temp file the permissions of any file the user writes (0666 minus the umask, not 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _shares_storage(t: torch.Tensor, state: dict[str, torch.Tensor]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return sum(1 for v in state.values() if v.untyped_storage().data_ptr() == ptr) > 1


class PretrainedMixin:
    """``save_pretrained(dir)`` / ``from_pretrained(dir)`` for an nn.Module with a ``config``.

    Subclasses set ``config_class`` and build themselves from ``cls(config)``.
    """

    config_class: type = None  # type: ignore[assignment]

    @property
    def device(self) -> torch.device:
        """Device of the module's weights (its first parameter)."""
        return next(self.parameters()).device  # type: ignore[attr-defined]

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the module's weights (its first parameter)."""
        return next(self.parameters()).dtype  # type: ignore[attr-defined]

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write ``config.json`` + ``model.safetensors`` (optionally cast to ``dtype``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in self.state_dict().items() if not k.endswith("_mask_buffer")}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        self.config.save_json(directory / CONFIG_NAME)
        save_safetensors(state, directory / WEIGHTS_NAME, metadata={"format": "pt", "holst_class": type(self).__name__})

    @classmethod
    def from_pretrained(cls: type[M], directory: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, strict: bool = True) -> M:
        """Build from a directory written by :meth:`save_pretrained`; the model is in eval mode.

        Args:
            directory: component directory.
            device: where the weights go.
            dtype: cast floating weights (None keeps what the file holds, except fp32 buffers).
            strict: missing or unexpected keys raise CheckpointError listing them.
        """
        directory = Path(directory)
        cfg_path = directory / CONFIG_NAME
        if not cfg_path.is_file():
            raise CheckpointError(f"{directory} is not a holst {cls.__name__} directory: {CONFIG_NAME} is missing")
        config = cls.config_class.load_json(cfg_path)
        state = load_state_dict_file(directory / WEIGHTS_NAME)
        with torch.device("meta"):
            model = cls(config)
        load_into(model, state, strict=strict, source=str(directory / WEIGHTS_NAME))
        model.to(device=device)
        if dtype is not None:
            model.to(dtype=dtype)
        return model.eval()


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True,
              source: str = "state dict") -> None:
    """Load ``state`` into ``model`` (possibly on the meta device) with ``assign=True``.

    Shapes are checked first; every problem is listed in one CheckpointError. Non-persistent
    buffers of a meta model are materialised by calling ``model.reset_buffers()`` if it has one.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                       for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    bad_dtype = sorted(f"{k}: file {state[k].dtype} vs model {expected[k].dtype}"
                       for k in set(state) & set(expected) if not _dtype_fits(state[k].dtype, expected[k].dtype))
    problems = []
    if bad_shape:
        problems.append(f"mis-shaped keys: {bad_shape}")
    if bad_dtype:
        problems.append(f"keys of the wrong kind of dtype: {bad_dtype[:10]}{' ...' if len(bad_dtype) > 10 else ''}")
    if strict and missing:
        problems.append(f"missing keys: {missing}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    state = {k: v for k, v in state.items() if k in expected}
    # Keep each parameter's dtype as in the file unless the model param is already materialised.
    model.load_state_dict(state, strict=strict, assign=True)
    if hasattr(model, "reset_buffers"):
        model.reset_buffers()


WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_fits(file: torch.dtype, model: torch.dtype) -> bool:
    """Floating weights load from fp16 / bf16 / fp32 / fp64 (not int8, fp8, bool); integer buffers from integers."""
    if model.is_floating_point:
        return file in WEIGHT_DTYPES
    return not file.is_floating_point and not file.is_complex


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON file; errors name the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
