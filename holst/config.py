"""Typed configuration dataclasses for every holst component.

Each component has one dataclass, validated in ``__post_init__`` with messages that name the
option and its allowed values. Configs are saved with every checkpoint (``config.json``) and can
be read from / written to YAML. YAML holds values only, never import paths.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C", bound="ConfigBase")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def check_choice(name: str, value: Any, allowed: tuple | list) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is one of ``allowed``."""
    _check(value in allowed, f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is > 0 (or >= 0 with allow_zero)."""
    ok = value >= 0 if allow_zero else value > 0
    _check(ok, f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def check_prob(name: str, value: float) -> None:
    """Raise ConfigError naming ``name`` unless 0 <= value <= 1."""
    _check(0.0 <= value <= 1.0, f"{name}={value!r} must lie in [0, 1]")


@dataclasses.dataclass
class ConfigBase:
    """Shared (de)serialisation for config dataclasses: dict, JSON and YAML round trips."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (tuples become lists), JSON/YAML serialisable."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from a dict; unknown keys raise ConfigError naming them and the known keys."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
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
# Transformer
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DalleConfig(ConfigBase):
    """The ruDALL-E transformer (``research/reference.md`` §1).

    Field names follow the reference's ``model_params`` so that its model table maps 1:1.
    ``vocab_size`` counts the text embedding rows: BPE ids plus ``text_seq_length`` position-specific
    pad ids (16384 + 128 = 16512 for the official models).
    """

    num_layers: int = 24
    hidden_size: int = 2048
    num_attention_heads: int = 16
    embedding_dropout_prob: float = 0.1
    attention_dropout_prob: float = 0.1
    output_dropout_prob: float = 0.1
    text_seq_length: int = 128
    image_tokens_per_dim: int = 32
    vocab_size: int = 16384 + 128
    image_vocab_size: int = 8192
    loss_img_weight: float = 7.0
    cogview_sandwich_layernorm: bool = True
    cogview_pb_relax: bool = True
    mlp_activation: str = "gelu_jit"
    hf_version: str = "v3"
    layernorm_eps: float = 1e-5
    # v3's reference loss scores image[0] against the *text* vocabulary (reference.md §1.6).
    # Off by default: the last text position then predicts image[0] in the image vocabulary.
    v3_reference_loss: bool = False
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "text_seq_length",
                     "image_tokens_per_dim", "vocab_size", "image_vocab_size", "mlp_ratio"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                   f"{name}={getattr(self, name)!r} must be a positive integer")
        _check(self.hidden_size % self.num_attention_heads == 0,
               f"hidden_size={self.hidden_size} must be divisible by num_attention_heads={self.num_attention_heads}")
        for name in ("embedding_dropout_prob", "attention_dropout_prob", "output_dropout_prob"):
            check_prob(name, getattr(self, name))
        check_positive("loss_img_weight", self.loss_img_weight, allow_zero=True)
        check_positive("layernorm_eps", self.layernorm_eps)
        check_choice("mlp_activation", self.mlp_activation, ("gelu_jit", "gelu", "gelu_tanh"))
        check_choice("hf_version", self.hf_version, ("v2", "v3"))
        _check(self.vocab_size > self.text_seq_length,
               f"vocab_size={self.vocab_size} must exceed text_seq_length={self.text_seq_length} "
               "(the last text_seq_length rows are the position-specific pad ids)")

    # Derived sizes -------------------------------------------------------------------------
    @property
    def image_seq_length(self) -> int:
        """Number of image tokens N = image_tokens_per_dim ** 2."""
        return self.image_tokens_per_dim**2

    @property
    def total_seq_length(self) -> int:
        """text_seq_length + N (1152 for the official models)."""
        return self.text_seq_length + self.image_seq_length

    @property
    def total_vocab_size(self) -> int:
        """Logit width: text vocabulary then image vocabulary (24704 for the official models)."""
        return self.vocab_size + self.image_vocab_size

    @property
    def bpe_vocab_size(self) -> int:
        """Number of real BPE ids (vocab_size minus the position-specific pad ids)."""
        return self.vocab_size - self.text_seq_length

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self) -> int:
        """Parameter count of a model with this config (masks excluded)."""
        h, L = self.hidden_size, self.num_layers
        emb = (self.vocab_size + self.image_vocab_size + self.text_seq_length + 1 + 2 * self.image_tokens_per_dim) * h
        r = self.mlp_ratio
        per_layer = (3 * h * h + 3 * h) + (h * h + h) + 2 * (r * h * h) + r * h + h + 4 * 2 * h
        head = 2 * h + self.total_vocab_size * h + self.total_vocab_size + 2 * h
        return emb + L * per_layer + head
