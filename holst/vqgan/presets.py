"""Named VQGAN configurations as data: the official Sber model and small presets of our own."""

from __future__ import annotations

from typing import Any

from holst.config import ConfigError, VQGANConfig

VQGAN_PRESETS: dict[str, dict[str, Any]] = {
    # reference.md §4.1: the ruDALL-E tokenizer (f8, 8192 codes, 256-d), and its 512 px DWT decoder.
    "sber": {},
    "sber_dwt": dict(decoder="dwt"),
    # Small presets that train on a CPU in minutes (f8 like Sber: 4 levels).
    # 'emoji64': the shipped default's tokenizer, 64 px clip-art -> 8x8 codes of 512 (2.95M parameters;
    # channels 32, 32, 64, 128: the 64 px and 32 px levels stay thin, they dominate the CPU cost).
    "emoji64": dict(ch=32, ch_mult=(1, 1, 2, 4), num_res_blocks=1, attn_resolutions=(), z_channels=64,
                    resolution=64, n_embed=512, embed_dim=64, quantizer="ema", norm_groups=16),
    "small128": dict(ch=48, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(16,), z_channels=128,
                     resolution=128, n_embed=1024, embed_dim=128, quantizer="ema", norm_groups=16),
    # A few-k-parameter model for unit tests.
    "tiny": dict(ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=(4,), z_channels=16,
                 resolution=32, n_embed=64, embed_dim=16, quantizer="ema", norm_groups=8),
}


def vqgan_preset_names() -> list[str]:
    """Names accepted by :func:`get_vqgan_preset`."""
    return sorted(VQGAN_PRESETS)


def get_vqgan_preset(name: str, **overrides: Any) -> VQGANConfig:
    """A new VQGANConfig for a named preset with optional field overrides."""
    key = name.lower().replace("-", "_")
    if key not in VQGAN_PRESETS:
        raise ConfigError(f"unknown VQGAN preset {name!r}; choose one of {vqgan_preset_names()}")
    return VQGANConfig.from_dict({**VQGAN_PRESETS[key], **overrides})
