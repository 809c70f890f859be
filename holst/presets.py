"""Named presets as data: the official ruDALL-E model table and small presets of our own.

``get_preset(name)`` returns a fresh config each call (no shared mutable state, unlike the
reference's ``get_rudalle_model`` which mutates its global table; reference.md §1.1).
"""

from __future__ import annotations

from typing import Any

from holst.config import ConfigError, DalleConfig

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
