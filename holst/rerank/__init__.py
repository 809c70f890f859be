"""Ranking generated images: CLIP (ruCLIP layout)."""

from holst.rerank.clip import (
    CLIP_PRESETS,
    CLIPModel,
    clip_preset,
    contrastive_loss,
    preprocess_images,
    retrieval_recall,
)
from holst.rerank.ranker import ClipRanker, clip_text_ids

__all__ = ["CLIP_PRESETS", "CLIPModel", "ClipRanker", "clip_preset", "clip_text_ids", "contrastive_loss",
           "preprocess_images", "retrieval_recall"]
