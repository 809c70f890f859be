"""VQGANConfig, the image tokenizer's configuration, and named VQGAN presets as data.

Presets: the official Sber model (and its DWT decoder) and small presets of our own.
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


@dataclasses.dataclass
class VQGANConfig(ConfigBase):
    """The taming-style VQGAN image tokenizer (``research/reference.md`` §4).

    The ``ddconfig`` field names and defaults are those of the Sber yml (ch 128, ch_mult 1,1,2,4,
    2 res blocks, attention at 32x32, z 256, 8192 codes of width 256), so the official checkpoint
    and smaller models in the same layout map 1:1. ``quantizer``: 'gumbel' (Sber's GumbelQuantize,
    logits ``quantize.proj`` + table ``quantize.embed``), 'vq' (nearest neighbour + commitment loss)
    or 'ema' (nearest neighbour, EMA codebook updates, dead-code restarts; trains most easily on
    small data). ``decoder``: 'plain' or 'dwt' (12-channel decoder + Haar IDWT, output twice the size).
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (32,)
    z_channels: int = 256
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    double_z: bool = False
    n_embed: int = 8192
    embed_dim: int = 256
    quantizer: str = "gumbel"
    decoder: str = "plain"
    norm_groups: int = 32
    kl_weight: float = 1e-8
    beta: float = 0.25
    ema_decay: float = 0.99

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        for name, high in (("ch", 4096), ("num_res_blocks", 64), ("z_channels", 16384), ("resolution", 16384),
                           ("in_channels", 16), ("out_ch", 16), ("n_embed", 1 << 20), ("embed_dim", 16384),
                           ("norm_groups", 4096)):
            check_int(name, getattr(self, name), 1, high)
        _check(1 <= len(self.ch_mult) <= 12 and all(isinstance(m, int) and not isinstance(m, bool) and 0 < m <= 64
                                                     for m in self.ch_mult),
               f"ch_mult={self.ch_mult!r} must be 1 to 12 integers in [1, 64]")
        check_bool("double_z", self.double_z)
        for m in (1, *self.ch_mult):
            _check((self.ch * m) % self.norm_groups == 0,
                   f"ch={self.ch} x ch_mult {m} is not divisible by norm_groups={self.norm_groups} (GroupNorm)")
        check_prob("dropout", self.dropout)
        check_choice("quantizer", self.quantizer, ("gumbel", "vq", "ema"))
        check_choice("decoder", self.decoder, ("plain", "dwt"))
        check_positive("kl_weight", self.kl_weight, allow_zero=True)
        check_positive("beta", self.beta, allow_zero=True)
        _check(0.0 < self.ema_decay < 1.0, f"ema_decay={self.ema_decay!r} must lie in (0, 1)")
        _check(self.in_channels == 3 and self.out_ch == 3,
               f"in_channels={self.in_channels}, out_ch={self.out_ch}: holst images are RGB (3 channels)")

    @property
    def downsample_factor(self) -> int:
        """f: the side of the image patch one code stands for (8 for Sber)."""
        return 2 ** (len(self.ch_mult) - 1)


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
