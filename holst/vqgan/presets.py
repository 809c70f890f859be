"""Named VQGANConfig presets: kept importable here; they live in :mod:`holst.vqgan.config`."""

from __future__ import annotations

from holst.vqgan.config import VQGAN_PRESETS, get_vqgan_preset, vqgan_preset_names

__all__ = ["VQGAN_PRESETS", "get_vqgan_preset", "vqgan_preset_names"]
