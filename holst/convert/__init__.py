"""Official checkpoints -> holst: ruDALL-E transformer, Sber VQGAN, ruCLIP, Real-ESRGAN.

Loaders are imported lazily so that one converter's optional dependencies never affect another.
"""

from __future__ import annotations

import importlib

_LOADERS = {
    "load_rudalle_transformer": "holst.convert.rudalle",
    "load_sber_vqgan": "holst.convert.vqgan",
    "load_ruclip": "holst.convert.ruclip",
    "load_realesrgan": "holst.convert.realesrgan",
}

__all__ = sorted(_LOADERS)


def __getattr__(name: str):
    if name in _LOADERS:
        return getattr(importlib.import_module(_LOADERS[name]), name)
    raise AttributeError(f"module 'holst.convert' has no attribute {name!r}")
