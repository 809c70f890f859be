"""The ruDALL-E transformer: model, attention, masks, KV cache."""

from holst.dalle.masks import build_layer_masks, build_mask, layer_mask_kind
from holst.dalle.model import DalleModel

__all__ = ["DalleModel", "build_layer_masks", "build_mask", "layer_mask_kind"]
