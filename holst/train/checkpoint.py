"""Training checkpoints: where they live, how they are written and read safely, RNG states, ``--resume``.

Every trainer writes ``<out_dir>/checkpoint.pt`` (atomically: temp file + rename) every
``save_every`` steps, when a signal asks it to stop, and at the end; ``<out_dir>/final/`` only
when the run completed. A checkpoint is a ``torch.save`` dict of plain state (tensors, numbers,
strings, lists, dicts) tagged with :data:`CHECKPOINT_FORMAT` and the stage that wrote it; it is
read with ``weights_only=True``, so a file that carries pickled code is refused, never run.

The collective parts (gathering FSDP shards, DeepSpeed's own files) stay in
:class:`holst.train.engine.Engine`; this module holds the file format and the RNG states.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import torch

from holst.utils.persist import CheckpointError, atomic_write_bytes

CHECKPOINT_NAME = "checkpoint.pt"
FINAL_DIR = "final"
CHECKPOINT_FORMAT = "holst-train-checkpoint-v1"
DEEPSPEED_MARKER = "stored in the .deepspeed checkpoint directory next to this file"
RESUME_IF_PRESENT = "if-present"


def checkpoint_path(out_dir: str | Path) -> Path:
    """``<out_dir>/checkpoint.pt``."""
    return Path(out_dir) / CHECKPOINT_NAME


def resolve_resume(out_dir: str | Path, resume: str | bool | None) -> Path | None:
    """Which checkpoint to continue from.

    Args:
        out_dir: the run directory.
        resume: None/False/'' = fresh start; True or 'auto' = ``<out_dir>/checkpoint.pt``, which must
            exist; ``'if-present'`` = that file when it exists, else a fresh start (a job script
            re-submitted after preemption); any other string = that file or run directory.
    Returns:
        The checkpoint file, or None for a fresh start.
    Raises:
        CheckpointError when the asked-for checkpoint does not exist.
    """
    if resume in (None, False, ""):
        return None
    if resume is True or resume in ("auto", RESUME_IF_PRESENT):
        path = checkpoint_path(out_dir)
        if path.is_file() or resume == RESUME_IF_PRESENT:
            return path if path.is_file() else None
        raise CheckpointError(f"--resume: no checkpoint at {path} (run without --resume to start fresh, "
                              f"or --resume {RESUME_IF_PRESENT} to continue only when one exists)")
    path = Path(resume)
    if path.is_dir():
        path = checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no checkpoint at {path}")
    return path


def write_checkpoint(path: str | Path, payload: dict[str, Any], *, stage: str | None = None) -> None:
    """Atomically write ``payload`` (plain state only) as a holst training checkpoint.

    Args:
        path: the file (parent directories are created).
        payload: entries such as ``model`` (state dict), ``step``, ``data`` (loader position).
        stage: the trainer that wrote it ('dalle', 'vqgan', ...), checked by :func:`read_checkpoint`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({**payload, "__format__": CHECKPOINT_FORMAT, "__stage__": stage}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_checkpoint(path: str | Path, *, stage: str | None = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`write_checkpoint`, refusing anything else.

    Args:
        path: the file.
        stage: when given, the checkpoint must have been written by this trainer.
    Returns:
        The payload without the format keys.
    Raises:
        CheckpointError (one line) when the file is missing, empty, truncated, corrupt, carries
        pickled objects, is not a holst training checkpoint, or belongs to another stage.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"training checkpoint {path} is empty (0 bytes)")
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled code: torch raises many types
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"training checkpoint {path} cannot be read safely (corrupt, truncated or "
                              f"holding pickled objects): {type(e).__name__}: {reason}") from None
    if not isinstance(payload, dict) or payload.get("__format__") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a holst training checkpoint ({CHECKPOINT_FORMAT})")
    written_by = payload.pop("__stage__", None)
    payload.pop("__format__")
    if stage is not None and written_by is not None and written_by != stage:
        raise CheckpointError(f"{path} was written by `holst train {written_by}`, not `holst train {stage}`")
    return payload


def load_entry(path: str | Path, key: str, load: Any, value: Any) -> None:
    """Call ``load(value)`` (a ``load_state_dict``) and turn a mismatch into a one-line CheckpointError."""
    try:
        load(value)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"training checkpoint {path}: entry {key!r} does not fit this run "
                              f"(another model or config?): {first}") from None


# --------------------------------------------------------------------------------------------- RNG states


def rng_state(device: torch.device) -> dict[str, Any]:
    """Python, NumPy, torch CPU (and the CUDA device's) RNG states as checkpoint-safe values."""
    import numpy as np

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype("int64")),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` captured."""
    import numpy as np

    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _to_tuple(x: Any) -> Any:
    """random.setstate wants nested tuples; checkpoints may hold lists."""
    if isinstance(x, (list, tuple)):
        return tuple(_to_tuple(v) for v in x)
    return x
