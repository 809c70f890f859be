"""Where training checkpoints live, how ``--resume`` finds them, and the shared train-command options.

Every trainer writes ``<out_dir>/checkpoint.pt`` (atomically, through ``Engine.save_checkpoint``)
every ``save_every`` steps, at SIGTERM and at the end, and its final model to ``<out_dir>/final/``.
``holst train <stage> --config x.yaml [--set key=value ...] [--resume [PATH]]`` is parsed by
:func:`add_train_arguments` + :func:`load_train_config`, so all stages accept the same options.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TypeVar

import yaml

from holst.config import ConfigBase, ConfigError

CHECKPOINT_NAME = "checkpoint.pt"
FINAL_DIR = "final"

C = TypeVar("C", bound=ConfigBase)


def checkpoint_path(out_dir: str | Path) -> Path:
    """``<out_dir>/checkpoint.pt``."""
    return Path(out_dir) / CHECKPOINT_NAME


def resolve_resume(out_dir: str | Path, resume: str | bool | None) -> Path | None:
    """Which checkpoint to continue from.

    Args:
        out_dir: the run directory.
        resume: None/False = fresh start; True or 'auto' = ``<out_dir>/checkpoint.pt`` if it exists
            (else a fresh start, so the same command can be re-submitted after preemption);
            a path = that file (must exist).
    Returns:
        The checkpoint file, or None for a fresh start.
    """
    if resume in (None, False, ""):
        return None
    if resume is True or resume == "auto":
        path = checkpoint_path(out_dir)
        return path if path.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = checkpoint_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no checkpoint at {path}")
    return path


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--set key=value`` (repeatable), ``--resume [PATH]`` for a train command."""
    parser.add_argument("--config", type=str, default=None, help="YAML file of option values (configs/train/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one option; VALUE is parsed as YAML (e.g. lr=1e-4, codes=[a.pt,b.pt], "
                             "model_overrides.num_layers=4); repeatable")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                        help="continue from <out_dir>/checkpoint.pt (or PATH) with model, optimizer, schedule, "
                             "data position and RNG states")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``['lr=1e-4', 'model_overrides.num_layers=4']`` -> ``{'lr': 1e-4, 'model_overrides': {'num_layers': 4}}``."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from e
        target = out
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a mapping")
        target[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def _coerce_numbers(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads '1e-4' as a string; turn such values into floats where the field is a float."""
    import dataclasses

    floats = {f.name for f in dataclasses.fields(cls) if str(f.type) == "float"}
    out = dict(data)
    for k, v in data.items():
        if k in floats and isinstance(v, str):
            try:
                out[k] = float(v)
            except ValueError:
                raise ConfigError(f"{k}={v!r} must be a number") from None
        elif k in floats and isinstance(v, int) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def load_train_config(cls: type[C], path: str | Path | None, overrides: list[str] | None = None) -> C:
    """Defaults <- YAML file <- ``--set`` overrides, validated by ``cls``.

    Raises:
        ConfigError naming the file or the option.
    """
    data: dict[str, Any] = {}
    if path:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must hold a mapping of option: value")
    data = _coerce_numbers(cls, _merge(data, parse_overrides(overrides or [])))
    try:
        return cls.from_dict(data)
    except TypeError as e:  # e.g. a list where a number is expected
        raise ConfigError(f"{cls.__name__}: {e}") from e


def set_threads(num_threads: int) -> None:
    """Set PyTorch's intra-op CPU threads; called by train entry points only (never at import)."""
    import torch

    if num_threads > 0:
        torch.set_num_threads(num_threads)
