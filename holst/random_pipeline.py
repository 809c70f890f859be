"""Untrained pipelines from small presets, for tests, demos and the CLI's ``random:<preset>:<seed>``.

The weights and the tokenizer are a pure function of the seed; nothing is trained, read or
written (:mod:`holst.hub` persists pipelines, this module only builds random ones).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from holst.config import ConfigError, PipelineConfig
from holst.hub import PipelineComponents

# preset -> (dalle preset, vqgan preset, clip preset); 'tiny' is for unit tests, 'emoji' has the default model's shape.
RANDOM_PRESETS: dict[str, tuple[str, str, str]] = {
    "tiny": ("tiny", "tiny", "tiny"),
    "emoji": ("emoji", "emoji64", "emoji64"),
}

# A small fixed corpus so that a random pipeline's tokenizer is a pure function of the code.
_CORPUS_WORDS = (
    "красный синий зелёный жёлтый чёрный белый круг квадрат треугольник звезда кот собака дом дерево "
    "солнце луна яблоко машина цветок птица рыба большой маленький на фоне слева справа сверху снизу "
    "red blue green yellow black white circle square triangle star cat dog house tree sun moon apple "
    "car flower bird fish big small on the left right top bottom background a an of with and"
).split()


def random_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """n short pseudo-captions from a fixed word list (deterministic for a seed)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(_CORPUS_WORDS), (n, 5), generator=g).tolist()
    return [" ".join(_CORPUS_WORDS[i] for i in row) for row in idx]


def build_random_components(preset: str = "tiny", *, seed: int = 0, clip: bool = True, superres: bool = True
                            ) -> tuple[PipelineComponents, PipelineConfig]:
    """Untrained modules of matching sizes, weights a pure function of ``seed`` (no training, no files).

    Args:
        preset: a key of :data:`RANDOM_PRESETS`.
        seed: seeds a local torch.Generator for the weights (global RNGs are left alone).
        clip: include a random CLIP ranker.
        superres: include a random 2x super-resolution net.
    Returns:
        (components, config); the config's sampling defaults suit the tiny vocabularies.
    """
    from holst.dalle import DalleModel
    from holst.presets import get_preset
    from holst.text import BPETokenizer
    from holst.vqgan import VQGAN, get_vqgan_preset

    if preset not in RANDOM_PRESETS:
        raise ConfigError(f"unknown random pipeline preset {preset!r}; choose one of {sorted(RANDOM_PRESETS)}")
    dalle_name, vqgan_name, clip_name = RANDOM_PRESETS[preset]
    dcfg = get_preset(dalle_name)
    vcfg = get_vqgan_preset(vqgan_name)
    if vcfg.resolution // (2 ** (len(vcfg.ch_mult) - 1)) != dcfg.image_tokens_per_dim:
        raise ConfigError(f"random preset {preset!r}: VQGAN {vqgan_name} does not give "
                          f"{dcfg.image_tokens_per_dim}x{dcfg.image_tokens_per_dim} codes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the small corpus runs out of merges before a large vocab_size
        tokenizer = BPETokenizer.train(random_corpus(seed=seed), vocab_size=dcfg.bpe_vocab_size)
    modules: dict[str, Any] = {}
    g = torch.Generator().manual_seed(seed)
    with _seeded(g):
        modules["vqgan"] = VQGAN(vcfg).eval()
        modules["dalle"] = DalleModel(dcfg).eval()
        # Wider than the training init (0.02): logits then depend visibly on the caption and the
        # images vary, which tests (prompt / guidance sensitivity) and demos need from random weights.
        modules["dalle"].init_weights(std=0.3)
        if clip:
            from holst.rerank.clip import CLIPModel, clip_preset

            ccfg = clip_preset(clip_name, vocab_size=max(tokenizer.vocab_size, clip_preset(clip_name).vocab_size))
            modules["clip"] = CLIPModel(ccfg).eval()
        if superres:
            from holst.config import SuperResConfig
            from holst.superres import RRDBNet

            modules["superres"] = RRDBNet(SuperResConfig(num_feat=8, num_block=1, num_grow_ch=8, scale=2)).eval()
    parts = PipelineComponents(tokenizer=tokenizer, vqgan=modules["vqgan"], dalle=modules["dalle"],
                               clip=modules.get("clip"), clip_tokenizer=tokenizer if clip else None,
                               superres=modules.get("superres"))
    config = PipelineConfig(num_images=4, top_k=min(64, dcfg.image_vocab_size), top_p=0.99, batch_size=8,
                            name=f"untrained {preset} pipeline (seed {seed})",
                            description="Random weights: for tests and demos only; the images are noise.",
                            training_data="none")
    return parts, config.replace(components=parts.names())


class _seeded:
    """Run module constructors with torch's default RNG drawn from ``g``, restoring the global state after.

    Module initialisers use the global RNG; forking it keeps library code from changing the caller's
    random stream while making the weights a function of ``g``'s seed.
    """

    def __init__(self, g: torch.Generator) -> None:
        self.g = g

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.g)))

    def __exit__(self, *exc: Any) -> None:
        self._fork.__exit__(*exc)
