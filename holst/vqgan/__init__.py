"""The VQGAN image tokenizer (Sber-compatible taming GumbelVQ, plus trainable small presets)."""

from holst.vqgan.config import VQGAN_PRESETS, VQGANConfig, get_vqgan_preset, vqgan_preset_names
from holst.vqgan.model import VQGAN

__all__ = ["VQGAN", "VQGANConfig", "VQGAN_PRESETS", "get_vqgan_preset", "vqgan_preset_names"]
