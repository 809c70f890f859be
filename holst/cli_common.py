"""What every ``holst`` command shares.

Flags derived from config dataclasses, the runtime flags, the one pipeline loader and the
output-folder check.

Flags come from dataclass fields: ``--top-k`` is the field ``top_k``, its type the field's, its help
the field's ``metadata["help"]`` (for :class:`holst.sampling.SamplingSettings` also its range; ``{default}``
in it is the field's default, ``{other_field}`` that field's), its choices ``metadata["choices"]``. The
default of a derived flag is ``None`` ("not given"), so that a value left out falls back to the
layer below (pipeline.json, a YAML config) instead of to a second copy of the default here.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from holst.errors import ConfigError, InputError
from holst.utils.runtime import get_logger, resolve_device, resolve_dtype

logger = get_logger("holst.cli")
DEFAULT_MODEL = "models/default"
FALLBACK_PRESET = "tiny"
RANDOM_PREFIX = "random:"

FALLBACK_WARNING = """
==============================================================================================
 WARNING: {path} holds no pipeline (no pipeline.json), so this is an UNTRAINED tiny random
 pipeline: the images are noise. Build the shipped model with scripts/build_default_model.sh,
 or pass --model DIR.
==============================================================================================
"""


# --------------------------------------------------------------------------------------------
# Flags from dataclass fields
# --------------------------------------------------------------------------------------------


def flag_name(field: str) -> str:
    """``top_k`` -> ``--top-k``."""
    return "--" + field.replace("_", "-")


def _field_type(cls: type, name: str) -> type:
    """int / float / str / bool of a field annotated ``T`` or ``T | None``."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kind = args[0]
    if kind not in (int, float, str, bool):
        raise TypeError(f"{cls.__name__}.{name}: no command-line flag for type {hint}")
    return kind


def _help(cls: type, field: dataclasses.Field) -> str:
    from holst.sampling import SamplingSettings, setting_help

    if cls is SamplingSettings:
        return setting_help(field.name)
    text = field.metadata.get("help", "")
    for other in dataclasses.fields(cls):  # "{default}" = this field's default, "{min_steps}" = that field's
        if other.default is not dataclasses.MISSING:
            text = text.replace("{" + other.name + "}", str(other.default))
    return text.replace("{default}", str(field.default))


def add_dataclass_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                            names: tuple[str, ...] | list[str], *, flags: dict[str, list[str]] | None = None,
                            default_note: str = "", helps: dict[str, str] | None = None) -> None:
    """Add one flag per field of the dataclass ``cls`` named in ``names`` (default None = not given).

    Args:
        parser: the command's parser (or an argument group of it).
        cls: the config dataclass, e.g. SamplingSettings or ServeConfig.
        names: the fields to expose, in the order ``--help`` shows them.
        flags: other spellings per field, e.g. {"num_images": ["--num-images", "-n"]} or
            {"batch_size": ["--sample-batch-size"]} where the command's own --batch-size means another thing.
        default_note: appended to each help, e.g. " (default: the model's)".
        helps: help texts that replace the field's own.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        field = fields[name]
        kind = _field_type(cls, name)
        spellings = (flags or {}).get(name, [flag_name(name)])
        text = (helps or {}).get(name) or _help(cls, field)
        if kind is bool:
            parser.add_argument(*spellings, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=text + default_note)
        else:
            choices = field.metadata.get("choices")
            parser.add_argument(*spellings, dest=name, type=kind, default=None, choices=choices,
                                metavar=None if choices else "INT" if kind is int else "NUM" if kind is float
                                else "TEXT", help=text + default_note)


def given_values(args: argparse.Namespace, names: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """{field: value} for the derived flags the user gave (those still None are left out)."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def add_sampling_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None, *,
                           flags: dict[str, list[str]] | None = None, default_note: str = " (default: the model's)"
                           ) -> None:
    """The :class:`holst.sampling.SamplingSettings` flags (``--num-images/-n``, ``--top-k``, ...)."""
    from holst.sampling import SamplingSettings, setting_names

    spellings = {"num_images": ["--num-images", "-n"], **(flags or {})}
    names = names or setting_names()
    add_dataclass_arguments(parser, SamplingSettings, [n for n in names if n != "seed"], flags=spellings,
                            default_note=default_note)
    if "seed" in names:  # per call, never a model default
        add_dataclass_arguments(parser, SamplingSettings, ["seed"], flags=spellings,
                                default_note=" (default: random, recorded)")


def check_sampling_flags(args: argparse.Namespace, names: tuple[str, ...] | None = None) -> None:
    """Check each sampling flag given on its own range before anything is loaded (ConfigError naming it).

    The checks that need the model's defaults (rerank <= num_images) run in :func:`sampling_settings`.
    """
    from holst.sampling import check_setting, setting_names

    for name, value in given_values(args, names or setting_names()).items():
        check_setting(name, value)


def sampling_settings(args: argparse.Namespace, defaults: Any = None, names: tuple[str, ...] | None = None) -> Any:
    """SamplingSettings from the flags the user gave, the rest from ``defaults`` (e.g. a PipelineConfig).

    Raises:
        ConfigError naming the flag's setting and its range.
    """
    from holst.sampling import SamplingSettings, setting_names

    return SamplingSettings.resolve(defaults, **given_values(args, names or setting_names()))


# --------------------------------------------------------------------------------------------
# Runtime flags and the pipeline loader
# --------------------------------------------------------------------------------------------


def add_runtime_arguments(parser: argparse.ArgumentParser, *, device: str | None = "auto",
                          dtype: str | None = "auto", dtype_flag: bool = True) -> None:
    """``--device``, ``--dtype`` and ``--threads`` (the same words in every command).

    Args:
        parser: the command's parser.
        device: the ``--device`` default (None: the command's config decides, e.g. ServeConfig.device).
        dtype: the ``--dtype`` default (None: the command's config decides).
        dtype_flag: False for commands whose models always run in float32.
    """
    parser.add_argument("--device", default=device, help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, mps"
                                                         + (f" (default {device})" if device else ""))
    if dtype_flag:
        text = "transformer/CLIP dtype: auto (bf16 on CUDA, else fp32), fp32, bf16, fp16"
        parser.add_argument("--dtype", default=dtype, help=text + (f" (default {dtype})" if dtype else ""))
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")


def default_model_dir() -> Path:
    """``models/default`` under the current directory, else under the source checkout holst runs from."""
    from holst.hub import is_pipeline_dir

    here, checkout = Path(DEFAULT_MODEL), Path(__file__).resolve().parents[1] / DEFAULT_MODEL
    for candidate in (here, checkout):
        if is_pipeline_dir(candidate):
            return candidate
    return here


def load_pipeline(model: str | None, device: str = "auto", dtype: str = "auto", *, cuda_graph: bool = False) -> Any:
    """The pipeline a command runs: a directory, ``random:<preset>[:<seed>]``, or None = the shipped one.

    ``model`` None means ``models/default``; only when that is missing does this fall back (loudly,
    on stderr) to an untrained tiny pipeline, so the README's first command always runs.

    Raises:
        ConfigError for a bad device/dtype/preset, InputError / CheckpointError for a model that
        is missing or cannot be read (every one a HolstError: one line and exit 2 in the CLI).
    """
    from holst.hub import is_pipeline_dir
    from holst.pipeline import Text2ImagePipeline

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if model is not None and model.startswith(RANDOM_PREFIX):
        pipe = _random_pipeline(model).to(dev, dt)
    else:
        path = Path(model) if model is not None else default_model_dir()
        if model is None and not is_pipeline_dir(path):
            print(FALLBACK_WARNING.format(path=path), file=sys.stderr)
            pipe = Text2ImagePipeline.from_random(FALLBACK_PRESET, seed=0).to(dev, dt)
        elif not path.exists():
            raise InputError(f"--model {path} does not exist (give a pipeline directory, e.g. {DEFAULT_MODEL}, "
                             f"or {RANDOM_PREFIX}tiny)")
        else:
            pipe = Text2ImagePipeline.from_pretrained(path, device=dev, dtype=dt)
    if cuda_graph:
        if pipe.device.type != "cuda":
            raise ConfigError(f"--cuda-graph needs a CUDA device; the pipeline is on {pipe.device}")
        pipe.enable_cuda_graph()
    return pipe


def _random_pipeline(model: str) -> Any:
    """``random:<preset>[:<seed>]`` -> an untrained pipeline (smoke tests, demos)."""
    from holst.pipeline import Text2ImagePipeline

    preset, _, seed = model[len(RANDOM_PREFIX):].partition(":")
    if not seed.isdigit() and seed != "":
        raise ConfigError(f"--model {model}: the seed after the preset must be an integer, e.g. random:tiny:0")
    return Text2ImagePipeline.from_random(preset or FALLBACK_PRESET, seed=int(seed or 0))  # ConfigError if unknown


# --------------------------------------------------------------------------------------------
# Output folders
# --------------------------------------------------------------------------------------------


def check_out_dir(path: str | Path, flag: str = "--out", *, create: bool = True) -> Path:
    """Create the output folder (and its parents); InputError if it is a file or cannot be made.

    Commands call it with ``create=False`` before any work (a file in the way is refused at once),
    then with ``create=True`` once there is something to write.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is a file, not a folder: give a folder (it is created if missing)")
    if not create:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot create the folder: {e.strerror or e}") from None
    return path
