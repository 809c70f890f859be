"""Super-resolution: Real-ESRGAN's RRDBNet, tiled upscaling, and the Lanczos fallback."""

from holst.superres.config import SuperResConfig
from holst.superres.rrdbnet import RRDB, ResidualDenseBlock, RRDBNet
from holst.superres.tiling import SuperResOutput, lanczos_upscale, super_resolve, upscale

__all__ = ["RRDB", "RRDBNet", "ResidualDenseBlock", "SuperResConfig", "SuperResOutput", "lanczos_upscale",
           "super_resolve", "upscale"]
