"""The VQGAN image tokenizer (Sber-compatible taming GumbelVQ, plus trainable small presets)."""

from holst.config import VQGANConfig
from holst.vqgan.model import VQGAN
from holst.vqgan.presets import VQGAN_PRESETS, get_vqgan_preset, vqgan_preset_names

__all__ = ["VQGAN", "VQGANConfig", "VQGAN_PRESETS", "get_vqgan_preset", "vqgan_preset_names"]
