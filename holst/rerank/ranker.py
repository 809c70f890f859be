"""ClipRanker: a CLIP model and its tokenizer, scoring images against caption strings.

Axis legend: B images, T texts, L context_length, E embed_dim.

This is the one place that turns captions into CLIP ``text_ids``: ruCLIP's convention
``[bos] + ids + [eos]``, 0-padded, and a caption that is too long keeps its eos
(``keep_eos=True``; the text tower reads the feature at the eos position, reference.md §5).
The pipeline, the evaluation reports, the data filters and ``holst train clip`` all encode
through :func:`clip_text_ids` / :class:`ClipRanker`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from holst.config import ConfigError
from holst.rerank.clip import CLIPModel

CLIP_TOKENIZER_DIR = "tokenizer"  # a CLIP directory keeps its tokenizer in <clip>/tokenizer/


def clip_text_ids(tokenizer: Any, texts: Sequence[str], context_length: int, *, dropout: float = 0.0,
                  generator: torch.Generator | None = None, trim: bool = False) -> torch.Tensor:
    """Captions -> CLIP ``text_ids`` with ruCLIP's truncation convention (the eos is always kept).

    Args:
        tokenizer: a :class:`holst.text.BPETokenizer`.
        texts: T captions.
        context_length: L, the CLIP's ``config.context_length``.
        dropout: BPE-dropout probability (training only).
        generator: randomness for dropout.
        trim: cut trailing all-pad columns (exact: the text tower is causal and reads the eos
            position), which makes short captions cheaper to encode.
    Returns:
        (T, L) long ids, or (T, l <= L) with ``trim``.
    """
    ids = tokenizer.encode_batch(list(texts), context_length, dropout=dropout, generator=generator, keep_eos=True)
    if not trim:
        return ids
    used = int((ids != 0).any(dim=0).nonzero().max().item()) + 1 if ids.numel() else 1
    return ids[:, :used]


class ClipRanker:
    """Scores images against captions with a CLIP and the tokenizer it was trained with.

    ``score(images, texts)`` gives one score per (image, caption) pair, ``similarity(images, texts)``
    the full matrix; both are ``exp(logit_scale) * cosine`` (ruCLIP's ``logits_per_image``), higher =
    closer. The ranker runs on the device and in the dtype of its CLIP's weights.
    """

    def __init__(self, model: CLIPModel, tokenizer: Any) -> None:
        """Wrap a CLIP and its tokenizer.

        Args:
            model: a :class:`holst.rerank.clip.CLIPModel` (put into eval mode by the caller).
            tokenizer: the :class:`holst.text.BPETokenizer` the model was trained with; its
                ``vocab_size`` must not exceed the model's.
        Raises:
            ConfigError: the tokenizer has more ids than the model's text embedding has rows.
        """
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ConfigError(f"CLIP tokenizer vocab_size={tokenizer.vocab_size} exceeds the CLIP model's "
                             f"vocab_size={model.config.vocab_size}: not this CLIP's tokenizer")
        self.model, self.tokenizer = model, tokenizer

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, tokenizer: str | Path | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> ClipRanker:
        """Load a CLIP directory (``config.json`` + ``model.safetensors``) and its tokenizer.

        Args:
            directory: a CLIP directory, e.g. a pipeline's ``clip/`` or ``holst train clip``'s ``final/``.
            tokenizer: a tokenizer directory or ``bpe.model`` file (default ``<directory>/tokenizer``).
            device: where the model goes.
            dtype: floating dtype of the weights (None keeps the file's).
        Returns:
            A ClipRanker with the model in eval mode.
        Raises:
            FileNotFoundError: the tokenizer is missing.
        """
        from holst.text import BPETokenizer

        path = Path(tokenizer) if tokenizer is not None else Path(directory) / CLIP_TOKENIZER_DIR
        if not path.exists():
            raise FileNotFoundError(f"CLIP tokenizer not found: expected {path}/bpe.model")
        tok = BPETokenizer.load(path) if path.is_file() else BPETokenizer.from_pretrained(path)
        model = CLIPModel.from_pretrained(directory, device=device, dtype=dtype).eval()
        return cls(model, tok)

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write the model (``config.json`` + ``model.safetensors``) and ``<directory>/tokenizer``."""
        self.model.save_pretrained(directory, dtype=dtype)
        self.tokenizer.save_pretrained(Path(directory) / CLIP_TOKENIZER_DIR)

    @property
    def config(self) -> Any:
        """The CLIP's :class:`holst.rerank.config.ClipConfig`."""
        return self.model.config

    @property
    def device(self) -> torch.device:
        """Device of the CLIP's weights."""
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the CLIP's weights."""
        return self.model.dtype

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale): the factor between cosine similarity and score."""
        return float(self.model.logit_scale.exp())

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions -> (T, L) long ``text_ids`` on the CPU (see :func:`clip_text_ids`)."""
        return clip_text_ids(self.tokenizer, texts, self.config.context_length)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Caption embeddings.

        Args:
            texts: T captions.
            batch_size: captions per forward pass.
        Returns:
            (T, E) float32 L2-normalised, on the CPU.
        """
        ids = self.encode_texts(texts)
        out = [self.model.encode_text(ids[i:i + batch_size].to(self.device)).float().cpu()
               for i in range(0, ids.shape[0], batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.config.embed_dim)

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Image embeddings.

        Args:
            images: (B, 3, H, W) float in [0, 1], any size (centre-cropped and resized by the CLIP).
            batch_size: images per forward pass.
        Returns:
            (B, E) float32 L2-normalised, on the CPU.
        """
        out = [self.model.encode_image(images[i:i + batch_size].to(self.device, self.dtype)).float().cpu()
               for i in range(0, images.shape[0], batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.config.embed_dim)

    @torch.no_grad()
    def similarity(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Every image against every caption.

        Args:
            images: (B, 3, H, W) float in [0, 1].
            texts: T captions.
        Returns:
            (B, T) float32 on the CPU: exp(logit_scale) * cos(image_b, text_t).
        """
        return self.logit_scale * self.image_embeddings(images) @ self.text_embeddings(texts).t()

    @torch.no_grad()
    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """One score per (image, caption) pair.

        Args:
            images: (B, 3, H, W) float in [0, 1].
            texts: B captions (image b against texts[b]), or 1 caption scored against every image.
        Returns:
            (B,) float32 on the CPU: exp(logit_scale) * cos(image_b, text_b); higher = better match.
        Raises:
            ValueError: the number of captions is neither 1 nor B.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of captions, not one str (wrap it in a list)")
        if len(texts) not in (1, images.shape[0]):
            raise ValueError(f"score: {images.shape[0]} images but {len(texts)} captions (need 1 or equal)")
        ids = self.encode_texts(texts).to(self.device)
        return self.model.score(images.to(self.device, self.dtype), ids).float().cpu()
