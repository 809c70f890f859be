"""Pipeline directories: one sub-folder per component plus ``pipeline.json``, laid out as below.

```
models/default/
  pipeline.json        PipelineConfig: components, sampling defaults, model card fields
  README.md            the model card, written from pipeline.json
  tokenizer/           bpe.model (+ config.json)
  vqgan/  dalle/       config.json + model.safetensors each
  clip/                config.json + model.safetensors, clip/tokenizer/bpe.model   (optional)
  superres/            config.json + model.safetensors                              (optional)
```
Nothing is downloaded: a pipeline directory is a local path. Weights load through safetensors only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from holst.config import ConfigError, PipelineConfig
from holst.rerank.ranker import CLIP_TOKENIZER_DIR, ClipRanker
from holst.utils.persist import WEIGHTS_NAME, CheckpointError, atomic_write_bytes
from holst.utils.runtime import get_logger

logger = get_logger("holst.hub")

PIPELINE_CONFIG_NAME = "pipeline.json"
OPTIONAL_COMPONENTS = ("superres",)  # may be absent although listed (converted at set-up, not committed)


@dataclasses.dataclass
class PipelineComponents:
    """The modules a pipeline bundles. ``clip`` and ``clip_tokenizer`` come together or not at all."""

    tokenizer: Any  # holst.text.BPETokenizer
    vqgan: Any  # holst.vqgan.VQGAN
    dalle: Any  # holst.dalle.DalleModel
    clip: Any | None = None  # holst.rerank.clip.CLIPModel
    clip_tokenizer: Any | None = None  # holst.text.BPETokenizer
    superres: Any | None = None  # holst.superres.RRDBNet

    def names(self) -> tuple[str, ...]:
        """Component names present, in the canonical order of ``pipeline.json``."""
        names = ["tokenizer", "vqgan", "dalle"]
        if self.clip is not None:
            names.append("clip")
        if self.superres is not None:
            names.append("superres")
        return tuple(names)

    def check(self) -> None:
        """Raise ConfigError when the components do not fit together (sizes named in the message)."""
        dcfg = self.dalle.config
        n_embed = self.vqgan.config.n_embed
        if n_embed != dcfg.image_vocab_size:
            raise ConfigError(f"vqgan n_embed={n_embed} differs from dalle image_vocab_size={dcfg.image_vocab_size}: "
                              "the transformer was trained on another VQGAN's codes")
        if self.tokenizer.vocab_size > dcfg.bpe_vocab_size:
            raise ConfigError(f"tokenizer vocab_size={self.tokenizer.vocab_size} exceeds the transformer's "
                              f"{dcfg.bpe_vocab_size} BPE rows (vocab_size - text_seq_length)")
        if (self.clip is None) != (self.clip_tokenizer is None):
            raise ConfigError("clip and clip_tokenizer must be given together")
        if self.clip is not None and self.clip_tokenizer.vocab_size > self.clip.config.vocab_size:
            raise ConfigError(f"clip tokenizer vocab_size={self.clip_tokenizer.vocab_size} exceeds the CLIP "
                              f"model's vocab_size={self.clip.config.vocab_size}")


def is_pipeline_dir(path: str | Path) -> bool:
    """True if ``path`` holds a ``pipeline.json``."""
    return (Path(path) / PIPELINE_CONFIG_NAME).is_file()


def read_pipeline_config(directory: str | Path) -> PipelineConfig:
    """Read ``pipeline.json``; errors name the directory and what is missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"pipeline directory {directory} does not exist")
    path = directory / PIPELINE_CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a holst pipeline directory: {PIPELINE_CONFIG_NAME} is missing "
                              "(make one with Text2ImagePipeline.save_pretrained or scripts/build_default_model.sh)")
    return PipelineConfig.load_json(path)


def save_pipeline(directory: str | Path, components: PipelineComponents, config: PipelineConfig,
                  dtype: torch.dtype | None = None) -> None:
    """Write every component into its sub-folder, then ``pipeline.json`` and a model card.

    Args:
        directory: created if missing; existing component files are overwritten (each atomically).
        components: the modules (their own ``save_pretrained`` writes config.json + weights).
        config: sampling defaults and model card; its ``components`` field is set from ``components``.
        dtype: cast the transformer's and CLIP's floating weights (e.g. torch.float16 halves the files);
            the VQGAN and the super-resolution net are always saved as they are.
    """
    components.check()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = config.replace(components=components.names())
    components.tokenizer.save_pretrained(directory / "tokenizer")
    components.vqgan.save_pretrained(directory / "vqgan")
    components.dalle.save_pretrained(directory / "dalle", dtype=dtype)
    if components.clip is not None:
        ClipRanker(components.clip, components.clip_tokenizer).save_pretrained(directory / "clip", dtype=dtype)
    if components.superres is not None:
        components.superres.save_pretrained(directory / "superres")
    atomic_write_bytes(directory / "README.md", model_card(config, components).encode("utf-8"))
    # pipeline.json last: a directory without it is recognisably incomplete.
    text = json.dumps(config.to_dict(), indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(directory / PIPELINE_CONFIG_NAME, text.encode("utf-8"))


def load_pipeline(directory: str | Path, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> tuple[PipelineComponents, PipelineConfig]:
    """Load every component listed in ``pipeline.json``.

    Args:
        directory: a pipeline directory.
        device: where all modules go.
        dtype: floating dtype of the transformer and CLIP (None keeps the files' dtype); the VQGAN and
            super-resolution stay float32 (16-bit VQGAN decoders produce artefacts).
    Returns:
        (components, config).
    """
    from holst.dalle import DalleModel
    from holst.text import BPETokenizer
    from holst.vqgan import VQGAN

    directory = Path(directory)
    config = read_pipeline_config(directory)
    for name in config.components:
        if name not in OPTIONAL_COMPONENTS and not (directory / name).is_dir():
            raise CheckpointError(f"{directory / PIPELINE_CONFIG_NAME} lists component {name!r} but "
                                  f"{directory / name} does not exist")
    parts = PipelineComponents(
        tokenizer=BPETokenizer.from_pretrained(directory / "tokenizer"),
        vqgan=VQGAN.from_pretrained(directory / "vqgan", device=device, dtype=torch.float32),
        dalle=DalleModel.from_pretrained(directory / "dalle", device=device, dtype=dtype),
    )
    if "clip" in config.components:
        ranker = ClipRanker.from_pretrained(directory / "clip", device=device, dtype=dtype)
        parts.clip, parts.clip_tokenizer = ranker.model, ranker.tokenizer
    # The super-resolution weights of the shipped model are converted by setup.sh (not committed):
    # load them whenever they are there; when pipeline.json lists them but they are missing, upscaling
    # falls back to Lanczos and says so.
    if (directory / "superres" / WEIGHTS_NAME).is_file():
        from holst.superres import RRDBNet

        parts.superres = RRDBNet.from_pretrained(directory / "superres", device=device, dtype=torch.float32)
    elif "superres" in config.components:
        logger.warning("%s lists 'superres' but %s is missing (run ./setup.sh); upscaling uses Lanczos",
                       directory / PIPELINE_CONFIG_NAME, directory / "superres" / WEIGHTS_NAME)
    parts.check()
    return parts, config


def model_card(config: PipelineConfig, components: PipelineComponents) -> str:
    """A short Markdown model card: what is inside, how to use it, sampling defaults."""
    dcfg = components.dalle.config
    size = dcfg.image_tokens_per_dim * components.vqgan.downsample_factor
    n_params = sum(p.numel() for p in components.dalle.parameters())
    lines = [
        f"# {config.name or 'holst text-to-image pipeline'}",
        "",
        config.description or "A ruDALL-E-style text-to-image pipeline made with holst.",
        "",
        f"- components: {', '.join(components.names())}",
        f"- transformer: {dcfg.num_layers} layers, hidden {dcfg.hidden_size}, {n_params / 1e6:.1f}M parameters",
        f"- images: {size}x{size} px from {dcfg.image_tokens_per_dim}x{dcfg.image_tokens_per_dim} codes "
        f"of a {dcfg.image_vocab_size}-entry codebook; captions up to {dcfg.text_seq_length} tokens",
        f"- language: {config.language}; license: {config.license}",
        f"- training data: {config.training_data or 'not recorded'}",
        f"- sampling defaults: top_k={config.top_k}, top_p={config.top_p}, temperature={config.temperature}, "
        f"guidance_scale={config.guidance_scale}",
        "",
        "```python",
        "from holst import Text2ImagePipeline",
        "pipe = Text2ImagePipeline.from_pretrained('path/to/this/dir')",
        "out = pipe('your caption', num_images=4, seed=0)",
        "out.images[0].save('best.png')",
        "```",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# `holst prepare pipeline`: assemble a pipeline directory from trained component directories
# --------------------------------------------------------------------------------------------


def assemble_pipeline(out: str | Path, *, tokenizer: str | Path, vqgan: str | Path, dalle: str | Path,
                      clip: str | Path | None = None, clip_tokenizer: str | Path | None = None,
                      superres: str | Path | None = None, config: PipelineConfig | None = None,
                      dtype: torch.dtype | None = None) -> PipelineComponents:
    """Load trained component directories, check that they fit, and write one pipeline directory.

    Args:
        out: the pipeline directory (e.g. models/default); may already hold some components
            (e.g. ``superres/`` from setup.sh): each is read fully before it is rewritten.
        tokenizer: a tokenizer directory (bpe.model) or a ``.model`` file.
        vqgan: a VQGAN ``save_pretrained`` directory (``holst train vqgan``'s ``<out_dir>/final``).
        dalle: a transformer ``save_pretrained`` directory (``holst train dalle``'s ``<out_dir>/final``).
        clip: a CLIP directory.
        clip_tokenizer: the CLIP's tokenizer (default ``<clip>/tokenizer``).
        superres: an RRDBNet directory.
        config: sampling defaults and model card (default PipelineConfig()).
        dtype: cast the transformer and CLIP weights when saving (None keeps them).
    Returns:
        The loaded components.
    """
    from holst.dalle import DalleModel
    from holst.text import BPETokenizer
    from holst.vqgan import VQGAN

    def load_tokenizer(path: str | Path) -> Any:
        path = Path(path)
        return BPETokenizer.load(path) if path.is_file() else BPETokenizer.from_pretrained(path)

    parts = PipelineComponents(tokenizer=load_tokenizer(tokenizer), vqgan=VQGAN.from_pretrained(vqgan),
                               dalle=DalleModel.from_pretrained(dalle))
    if clip is not None:
        from holst.rerank.clip import CLIPModel

        parts.clip = CLIPModel.from_pretrained(clip)
        parts.clip_tokenizer = load_tokenizer(clip_tokenizer or Path(clip) / CLIP_TOKENIZER_DIR)
    if superres is not None:
        from holst.superres import RRDBNet

        parts.superres = RRDBNet.from_pretrained(superres)
    save_pipeline(out, parts, config or PipelineConfig(), dtype=dtype)
    return parts
