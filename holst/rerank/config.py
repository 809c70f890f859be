"""ClipConfig, the ranking CLIP's configuration (ruCLIP's ``config.json`` keys), and CLIP presets as data."""

from __future__ import annotations

import dataclasses
from typing import Any

from holst.config import ConfigBase, ConfigError, _check, check_int

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass
class ClipConfig(ConfigBase):
    """The ruCLIP / OpenAI-CLIP ViT model (``research/reference.md`` §5).

    Field names are the official ``config.json`` keys of ruCLIP, so that file maps 1:1 (plus
    ``mean``/``std``, which ruCLIP's processor reads from the same file). ``vision_heads`` 0 means
    the official rule ``vision_width // 64``. Defaults are ruclip-vit-base-patch32-384.
    """

    embed_dim: int = 512
    image_resolution: int = 384
    vision_layers: int = 12
    vision_width: int = 768
    vision_patch_size: int = 32
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12
    vision_heads: int = 0
    eos_id: int = 3
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        for name, high in (("embed_dim", 16384), ("image_resolution", 4096), ("vision_layers", 256),
                           ("vision_width", 16384), ("vision_patch_size", 1024), ("context_length", 8192),
                           ("vocab_size", 1 << 22), ("transformer_width", 16384), ("transformer_heads", 1024),
                           ("transformer_layers", 256)):
            check_int(name, getattr(self, name), 1, high)
        _check(self.image_resolution % self.vision_patch_size == 0,
               f"image_resolution={self.image_resolution} must be divisible by "
               f"vision_patch_size={self.vision_patch_size}")
        check_int("vision_heads", self.vision_heads, 0, 1024)  # 0 = vision_width // 64
        _check(self.num_vision_heads > 0 and self.vision_width % self.num_vision_heads == 0,
               f"vision_width={self.vision_width} must be divisible by the vision head count {self.num_vision_heads} "
               "(set vision_heads, or use a width that is a multiple of 64)")
        _check(self.transformer_width % self.transformer_heads == 0,
               f"transformer_width={self.transformer_width} must be divisible by "
               f"transformer_heads={self.transformer_heads}")
        check_int("eos_id", self.eos_id, 0, self.vocab_size - 1)
        for name in ("mean", "std"):
            value = tuple(getattr(self, name))
            _check(len(value) == 3 and all(isinstance(v, (int, float)) for v in value),
                   f"{name}={value!r} must be three numbers (one per RGB channel)")
            setattr(self, name, tuple(float(v) for v in value))
        _check(all(s > 0 for s in self.std), f"std={self.std!r} must be positive")

    @property
    def num_vision_heads(self) -> int:
        """Vision attention heads: ``vision_heads``, or the official ``vision_width // 64``."""
        return self.vision_heads or self.vision_width // 64

    @property
    def grid_size(self) -> int:
        """Patches per side: image_resolution // vision_patch_size."""
        return self.image_resolution // self.vision_patch_size


# Our small presets, as data. 'tiny': unit tests. 'emoji64': ranks the shipped default's 64 px
# images; sized so that `holst train clip` learns useful retrieval on a 2-core CPU in ~10 minutes.
CLIP_PRESETS: dict[str, dict[str, Any]] = {
    "ruclip-vit-base-patch32-384": {},
    "ruclip-vit-base-patch32-224": dict(image_resolution=224),
    "ruclip-vit-base-patch16-224": dict(image_resolution=224, vision_patch_size=16),
    "ruclip-vit-base-patch16-384": dict(image_resolution=384, vision_patch_size=16),
    "ruclip-vit-large-patch14-224": dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024,
                                         vision_patch_size=14, transformer_width=768, transformer_heads=12),
    "ruclip-vit-large-patch14-336": dict(embed_dim=768, image_resolution=336, vision_layers=24, vision_width=1024,
                                         vision_patch_size=14, transformer_width=768, transformer_heads=12),
    "tiny": dict(embed_dim=32, image_resolution=16, vision_layers=2, vision_width=32, vision_patch_size=4,
                 vision_heads=2, context_length=12, vocab_size=300, transformer_width=32, transformer_heads=2,
                 transformer_layers=2),
    "emoji64": dict(embed_dim=256, image_resolution=64, vision_layers=4, vision_width=256, vision_patch_size=8,
                    context_length=32, vocab_size=2048, transformer_width=256, transformer_heads=4,
                    transformer_layers=4),
}


def clip_preset(name: str, **overrides: Any) -> ClipConfig:
    """A new ClipConfig for a named preset (see ``CLIP_PRESETS``) with optional field overrides."""
    if name not in CLIP_PRESETS:
        raise ConfigError(f"unknown CLIP preset {name!r}; choose one of {sorted(CLIP_PRESETS)}")
    return ClipConfig.from_dict({**CLIP_PRESETS[name], **overrides})
