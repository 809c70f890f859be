"""Ranking generated images: CLIP (ruCLIP layout)."""

from holst.rerank.clip import CLIPModel, contrastive_loss, preprocess_images, retrieval_recall
from holst.rerank.config import CLIP_PRESETS, ClipConfig, clip_preset
from holst.rerank.ranker import ClipRanker, clip_text_ids

__all__ = ["CLIP_PRESETS", "CLIPModel", "ClipConfig", "ClipRanker", "clip_preset", "clip_text_ids", "contrastive_loss",
           "preprocess_images", "retrieval_recall"]
