"""Named DalleConfig presets: kept importable here; they live in :mod:`holst.dalle.config`."""

from __future__ import annotations

from holst.dalle.config import DALLE_PRESETS, OFFICIAL_DALLE_PRESETS, get_preset, preset_names

__all__ = ["DALLE_PRESETS", "OFFICIAL_DALLE_PRESETS", "get_preset", "preset_names"]
