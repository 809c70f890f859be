"""The base of every holst config dataclass, its validators, and one import place for them all.

Each component has one dataclass, validated in ``__post_init__`` with messages that name the
option and its allowed values. Configs are saved with every checkpoint (``config.json``) and can
be read from / written to YAML. YAML holds values only, never import paths.

Each stage owns its config and presets, beside its model or trainer::

    holst/dalle/config.py     DalleConfig, DALLE_PRESETS, get_preset
    holst/vqgan/config.py     VQGANConfig, VQGAN_PRESETS, get_vqgan_preset
    holst/rerank/config.py    ClipConfig, CLIP_PRESETS, clip_preset
    holst/superres/config.py  SuperResConfig (RRDBChannels, RRDBOptions), SUPERRES_SCALES
    holst/text/config.py      TokenizerConfig
    holst/data/config.py      DataConfig
    holst/eval/config.py      EvalConfig
    holst/train/config.py     TrainConfig (EngineOptions = RuntimeOptions + engine fields, OptimOptions,
                              ScheduleOptions, LogOptions), DalleTrainConfig, VQGANTrainConfig,
                              ClipTrainConfig, SuperResTrainConfig (+ RRDBOptions)

This module keeps :class:`ConfigBase`, the ``check_*`` validators, the pipeline and server configs,
and re-exports the stage configs (imported on first use, so ``import holst.config`` stays light and
inference never imports ``holst.train``): ``from holst.config import DalleConfig`` keeps working.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from holst.errors import ConfigError  # re-exported here

C = TypeVar("C", bound="ConfigBase")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def check_choice(name: str, value: Any, allowed: tuple | list) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is one of ``allowed`` (True is not 1)."""
    is_bool = isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed)
    _check(value in allowed and not is_bool, f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is > 0 (or >= 0 with allow_zero)."""
    ok = value >= 0 if allow_zero else value > 0
    _check(ok, f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def check_int(name: str, value: Any, low: int, high: int) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is an int (not a bool) in [low, high].

    Model sizes are bounded so that a typo (2**30 hidden units, 10**6 layers) is an error message,
    not minutes of allocation or an out-of-memory kill.
    """
    _check(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
           f"{name}={value!r} must be an integer in [{low}, {high}]")


def check_bool(name: str, value: Any) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is True or False (not 0/1, not 'yes')."""
    _check(isinstance(value, bool), f"{name}={value!r} must be true or false")


def check_prob(name: str, value: float) -> None:
    """Raise ConfigError naming ``name`` unless 0 <= value <= 1."""
    _check(0.0 <= value <= 1.0, f"{name}={value!r} must lie in [0, 1]")


@dataclasses.dataclass
class ConfigBase:
    """Shared (de)serialisation for config dataclasses: dict, JSON and YAML round trips.

    ``deprecated_names`` maps an old option name to its new name (or to None for an option that is
    no longer used): :meth:`from_dict` (and so YAML files and ``--set``) still reads it, with a
    FutureWarning, so configs written before the rename keep loading.
    """

    deprecated_names: ClassVar[dict[str, str | None]] = {}

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (tuples become lists), JSON/YAML serialisable."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def part_values(self, part: type) -> dict[str, Any]:
        """The fields of ``part``, a typed part this config is built from, as keyword arguments.

        E.g. ``SuperResConfig(**cfg.part_values(RRDBOptions))``.
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(part)}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from a dict; unknown keys raise ConfigError naming them and the known keys."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
        data = cls._rename_deprecated(data)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown option(s) {unknown}; known options: {sorted(names)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                value = data[f.name]
                if isinstance(value, list) and "tuple" in str(f.type):
                    value = tuple(value)
                kwargs[f.name] = value
        return cls(**kwargs)

    @classmethod
    def _rename_deprecated(cls, data: dict[str, Any]) -> dict[str, Any]:
        """``data`` with old option names (``deprecated_names``) read as the new ones, each with a warning."""
        out = dict(data)
        for old, new in cls.deprecated_names.items():
            if old not in out:
                continue
            value = out.pop(old)
            if new is None:
                warnings.warn(f"{cls.__name__}: option {old!r} is no longer used and is ignored; remove it",
                              FutureWarning, stacklevel=3)
                continue
            if new in out:
                raise ConfigError(f"{cls.__name__}: give {new!r} or its old name {old!r}, not both")
            warnings.warn(f"{cls.__name__}: option {old!r} is now called {new!r}", FutureWarning, stacklevel=3)
            out[new] = value
        return out

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def save_json(self, path: str | Path) -> None:
        """Write the config as indented JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load_json(cls: type[C], path: str | Path) -> C:
        """Read a config written by :meth:`save_json`; errors name the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        return cls.from_dict(data)

    def save_yaml(self, path: str | Path) -> None:
        """Write the config as YAML."""
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), allow_unicode=True, sort_keys=False), encoding="utf-8")

    @classmethod
    def load_yaml(cls: type[C], path: str | Path) -> C:
        """Read a YAML file of values (safe loader: YAML never constructs objects)."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        return cls.from_dict(data)


# --------------------------------------------------------------------------------------------
# Pipeline (pipeline.json) and server
# --------------------------------------------------------------------------------------------

PIPELINE_COMPONENTS = ("tokenizer", "vqgan", "dalle", "clip", "superres")
REQUIRED_COMPONENTS = ("tokenizer", "vqgan", "dalle")


@dataclasses.dataclass
class PipelineConfig(ConfigBase):
    """``pipeline.json`` of a pipeline directory: its components, sampling defaults and model card.

    The sampling defaults are the fields of :class:`holst.sampling.SamplingSettings` but ``seed``
    (same names, defaults and ranges; validated by it): ``top_k`` 0 and ``top_p`` 1.0 switch the
    filters off; ``guidance_scale`` None (or 1.0) means no classifier-free guidance; ``rerank`` 0
    keeps every image; ``upscale`` 1 keeps the VQGAN size.
    """

    format_version: int = 1
    components: tuple[str, ...] = REQUIRED_COMPONENTS
    num_images: int = 4
    top_k: int = 2048  # the reference's README / Emojich settings (holst.sampling.REFERENCE_TOP_K/P)
    top_p: float = 0.995
    temperature: float = 1.0
    guidance_scale: float | None = None
    rerank: int = 0
    upscale: int = 1
    batch_size: int = 8
    # Model card: plain facts shown by `holst serve` and written to the README of the directory.
    name: str = ""
    description: str = ""
    language: str = "ru"
    license: str = "Apache-2.0"
    training_data: str = ""
    created_by: str = "holst"

    def __post_init__(self) -> None:
        _check(self.format_version == 1, f"format_version={self.format_version!r} is not supported; this holst reads 1")
        self.components = tuple(self.components)
        for name in self.components:
            check_choice("components entry", name, PIPELINE_COMPONENTS)
        for name in REQUIRED_COMPONENTS:
            _check(name in self.components, f"components={list(self.components)} must include {name!r}")
        from holst.sampling import SamplingSettings  # here, not at the top: sampling imports the models

        settings = SamplingSettings(**self.sampling_defaults())  # one set of ranges for every entry point
        for name in self.sampling_defaults():
            setattr(self, name, getattr(settings, name))  # normalised, e.g. top_p=1 -> 1.0

    def sampling_defaults(self) -> dict[str, Any]:
        """The sampling settings stored here: {name: value} for ``holst.sampling.PIPELINE_SETTINGS``."""
        from holst.sampling import PIPELINE_SETTINGS

        return {name: getattr(self, name) for name in PIPELINE_SETTINGS}


@dataclasses.dataclass
class ServeConfig(ConfigBase):
    """``holst serve``: binding, batching, limits (``holst/serve/``, ``docs/serve.md``).

    A host other than loopback needs ``token`` (sent as ``Authorization: Bearer <token>``).
    Jobs beyond ``max_queue`` are answered 503 with ``Retry-After: retry_after_s``. Slow clients: each
    request's headers must arrive within ``header_timeout_s`` and its body within ``body_timeout_s``;
    one client address holds at most ``max_connections_per_client`` connections (its oldest idle one
    is closed for a new one), all clients together ``max_connections``. ``workers`` > 1 runs that
    many server processes, each with its own copy of the model and its own queue.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_queue: int = 64
    max_batch_images: int = 16
    batch_window_ms: float = 25.0
    max_images_per_request: int = 16
    max_prompt_chars: int = 500
    max_body_bytes: int = 262144  # room for a base64 image prompt
    max_upscale: int = 4
    request_timeout_s: float = 600.0
    retry_after_s: int = 5
    preview_every: int = 0
    max_stored_images: int = 512
    max_connections: int = 256
    max_connections_per_client: int = 64
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    workers: int = 1

    def __post_init__(self) -> None:
        _check(isinstance(self.host, str) and self.host != "", "host must be a non-empty string")
        _check(isinstance(self.port, int) and 0 <= self.port < 65536, f"port={self.port!r} must lie in [0, 65535]")
        for name in ("max_queue", "max_batch_images", "max_images_per_request", "max_prompt_chars",
                     "max_body_bytes", "max_upscale", "retry_after_s", "max_stored_images", "max_connections",
                     "max_connections_per_client", "workers"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                   f"{name}={getattr(self, name)!r} must be a positive integer")
        check_positive("batch_window_ms", self.batch_window_ms, allow_zero=True)
        check_positive("request_timeout_s", self.request_timeout_s)
        check_positive("header_timeout_s", self.header_timeout_s)
        check_positive("body_timeout_s", self.body_timeout_s)
        _check(isinstance(self.preview_every, int) and self.preview_every >= 0,
               f"preview_every={self.preview_every!r} must be an integer >= 0 (0 = once per image row)")
        if self.token is not None:
            _check(isinstance(self.token, str) and len(self.token) >= 8, "token must be a string of >= 8 characters")
        loopback = self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")
        _check(loopback or self.token is not None,
               f"host={self.host!r} is not loopback: set a token (--token or HOLST_TOKEN) so that "
               "strangers cannot use the server")


# --------------------------------------------------------------------------------------------
# Re-exports: each stage's config lives beside the stage (imported on first use)
# --------------------------------------------------------------------------------------------

_STAGE_CONFIGS: dict[str, tuple[str, ...]] = {
    "holst.dalle.config": ("DalleConfig", "MAX_MODEL_PARAMETERS"),
    "holst.vqgan.config": ("VQGANConfig",),
    "holst.rerank.config": ("ClipConfig", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"),
    "holst.superres.config": ("SuperResConfig", "SUPERRES_SCALES"),
    "holst.text.config": ("TokenizerConfig",),
    "holst.data.config": ("DataConfig",),
    "holst.eval.config": ("EvalConfig",),
    "holst.train.config": ("TrainConfig", "DalleTrainConfig", "VQGANTrainConfig", "ClipTrainConfig",
                           "SuperResTrainConfig", "TRAIN_BACKENDS", "TRAIN_PRECISIONS", "SUPERRES_DEGRADATIONS"),
}
_REEXPORTS = {name: module for module, names in _STAGE_CONFIGS.items() for name in names}


def __getattr__(name: str) -> Any:
    """``holst.config.DalleConfig`` and the other stage configs, imported from their stage on first use."""
    module = _REEXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_REEXPORTS))
