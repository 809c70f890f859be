"""DalleConfig, the ruDALL-E transformer's configuration, and its named presets as data.

``get_preset(name)`` returns a fresh config each call (no shared mutable state, unlike the
reference's ``get_rudalle_model`` which mutates its global table; reference.md §1.1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from holst.config import (
    ConfigBase,
    ConfigError,
    _check,
    check_bool,
    check_choice,
    check_int,
    check_positive,
    check_prob,
)

# The largest ruDALL-E (Kandinsky) has 12B parameters; a config far beyond is a typo, not a model.
MAX_MODEL_PARAMETERS = 200 * 10**9


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
        for name, high in (("num_layers", 512), ("hidden_size", 32768), ("num_attention_heads", 1024),
                           ("text_seq_length", 8192), ("image_tokens_per_dim", 256), ("vocab_size", 1 << 22),
                           ("image_vocab_size", 1 << 20), ("mlp_ratio", 64)):
            check_int(name, getattr(self, name), 1, high)
        for name in ("cogview_sandwich_layernorm", "cogview_pb_relax", "v3_reference_loss"):
            check_bool(name, getattr(self, name))
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
        _check(self.num_parameters() <= MAX_MODEL_PARAMETERS,
               f"this DalleConfig has {self.num_parameters() / 1e9:.0f}B parameters, more than "
               f"{MAX_MODEL_PARAMETERS / 1e9:.0f}B: check num_layers / hidden_size")

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
        """Size of one attention head: ``hidden_size // num_attention_heads``."""
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self) -> int:
        """Parameter count of a model with this config (masks excluded)."""
        h, L = self.hidden_size, self.num_layers
        emb = (self.vocab_size + self.image_vocab_size + self.text_seq_length + 1 + 2 * self.image_tokens_per_dim) * h
        r = self.mlp_ratio
        per_layer = (3 * h * h + 3 * h) + (h * h + h) + 2 * (r * h * h) + r * h + h + 4 * 2 * h
        head = 2 * h + self.total_vocab_size * h + self.total_vocab_size + 2 * h
        return emb + L * per_layer + head


# The reference's model table (reference.md §1.1); values not listed use DalleConfig defaults,
# which are the reference's constructor defaults.
DALLE_PRESETS: dict[str, dict[str, Any]] = {
    "malevich": dict(num_layers=24, hidden_size=2048, num_attention_heads=16, hf_version="v3"),
    "malevich_v2": dict(num_layers=24, hidden_size=2048, num_attention_heads=16, hf_version="v2"),
    "emojich": dict(num_layers=24, hidden_size=2048, num_attention_heads=16, hf_version="v2"),
    "surrealist": dict(num_layers=24, hidden_size=2048, num_attention_heads=16, hf_version="v3"),
    "kandinsky": dict(num_layers=64, hidden_size=3840, num_attention_heads=60, hf_version="v3"),
    "dummy": dict(num_layers=12, hidden_size=768, num_attention_heads=12, hf_version="v3"),
    # Our own small presets (CPU work and tests). 'tiny': unit tests; 'small': a CPU model
    # over 16x16 codes; 'emoji': the shipped default's shape (8x8 codes of a 64 px VQGAN).
    "tiny": dict(num_layers=3, hidden_size=64, num_attention_heads=4, text_seq_length=16,
                 image_tokens_per_dim=4, vocab_size=256 + 16, image_vocab_size=64,
                 embedding_dropout_prob=0.0, attention_dropout_prob=0.0, output_dropout_prob=0.0),
    "small": dict(num_layers=8, hidden_size=256, num_attention_heads=8, text_seq_length=32,
                  image_tokens_per_dim=16, vocab_size=4096 + 32, image_vocab_size=1024),
    "emoji": dict(num_layers=8, hidden_size=384, num_attention_heads=6, text_seq_length=24,
                  image_tokens_per_dim=8, vocab_size=2048 + 24, image_vocab_size=512),
}

OFFICIAL_DALLE_PRESETS = ("malevich", "malevich_v2", "emojich", "surrealist", "kandinsky", "dummy")


def preset_names() -> list[str]:
    """Names accepted by :func:`get_preset`."""
    return sorted(DALLE_PRESETS)


def get_preset(name: str, **overrides: Any) -> DalleConfig:
    """A new DalleConfig for a named preset, with optional field overrides.

    Args:
        name: one of :func:`preset_names` (case-insensitive; '-' and '_' are equivalent).
        overrides: DalleConfig fields to change.
    Returns:
        A validated DalleConfig.
    """
    key = name.lower().replace("-", "_")
    aliases = {"malevich_v3": "malevich", "surrealist_xl": "surrealist", "xl": "malevich", "xxl": "kandinsky"}
    key = aliases.get(key, key)
    if key not in DALLE_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {preset_names()}")
    return DalleConfig.from_dict({**DALLE_PRESETS[key], **overrides})
