"""Ranking generated images: CLIP (ruCLIP layout)."""

from holst.rerank.clip import (
    CLIP_PRESETS,
    CLIPModel,
    clip_preset,
    contrastive_loss,
    preprocess_images,
    retrieval_recall,
)

__all__ = ["CLIP_PRESETS", "CLIPModel", "clip_preset", "contrastive_loss", "preprocess_images", "retrieval_recall"]
