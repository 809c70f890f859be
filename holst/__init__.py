"""holst: ruDALL-E text-to-image, complete and fast.

Importing holst has no side effects (no downloads, no thread or precision settings).
"""

from __future__ import annotations

from holst.config import ConfigError, DalleConfig
from holst.presets import get_preset, preset_names

__version__ = "0.1.0"

__all__ = ["ConfigError", "DalleConfig", "Text2ImagePipeline", "__version__", "get_preset", "preset_names"]


def __getattr__(name: str):
    # Lazy: the pipeline pulls every stage; `import holst` alone should stay light.
    if name == "Text2ImagePipeline":
        from holst.pipeline import Text2ImagePipeline

        return Text2ImagePipeline
    raise AttributeError(f"module 'holst' has no attribute {name!r}")
