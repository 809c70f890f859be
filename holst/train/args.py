"""The options every ``holst train <stage>`` command takes, and the one place they are handled.

``holst train <stage> --config x.yaml [--set key=value ...] [--resume [PATH|if-present]]``:
defaults <- YAML file <- ``--set`` overrides, validated by the stage's config class; user
mistakes (a bad option, a missing file, a foreign checkpoint) are raised as ``HolstError`` / ``OSError``,
which :func:`holst.cli.run_command` ends in one line and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from holst.config import ConfigBase, ConfigError
from holst.utils.runtime import set_threads  # the one for every command (0 = torch's choice)

C = TypeVar("C", bound=ConfigBase)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--set key=value`` (repeatable), ``--resume [PATH|if-present]`` for a train command."""
    parser.add_argument("--config", type=str, default=None, help="YAML file of option values (configs/train/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one option; VALUE is parsed as YAML (e.g. lr=1e-4, codes=[a.pt,b.pt], "
                             "model_overrides.num_layers=4); repeatable")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                        help="continue from <out_dir>/checkpoint.pt (an error if there is none), PATH, or "
                             "'if-present' (continue when a checkpoint exists, else start fresh)")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``['lr=1e-4', 'model_overrides.num_layers=4']`` -> ``{'lr': 1e-4, 'model_overrides': {'num_layers': 4}}``."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from e
        target = out
        parts = key.strip().split(".")
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
    floats = {f.name for f in dataclasses.fields(cls) if str(f.type) in ("float", "float | None")}
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


def run_train_command(cls: type[C], train: Callable[..., Any], args: argparse.Namespace) -> int:
    """The body of every ``holst train <stage>``: config, threads, train, one summary line.

    Args:
        cls: the stage's config class.
        train: ``train(cfg, resume=...) -> TrainResult``.
        args: parsed :func:`add_train_arguments` options.
    Returns:
        0 when the run finished or was stopped by a signal (its checkpoint is saved).

    Raises:
        HolstError: a user mistake (a bad option, a foreign checkpoint); ``OSError``: a missing file.
            :func:`holst.cli.run_command` prints either as one line and exits 2.
    """
    cfg = load_train_config(cls, args.config, args.overrides)
    set_threads(cfg.num_threads)
    result = train(cfg, resume=args.resume)
    if result.interrupted:
        print(f"interrupted at step {result.step}; continue with --resume (checkpoint {result.checkpoint})")
        return 0
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(result.data.get("skipped", {}).items())) or "none"
    print(f"done: {result.step} steps, {result.skipped_steps} skipped (inf/NaN); {result.data.get('kept')} of "
          f"{result.data.get('read')} samples used (skipped: {skipped}); model in {result.final_dir}")
    if result.metrics:
        print(json.dumps(result.metrics, ensure_ascii=False, default=str))
    return 0
