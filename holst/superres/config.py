"""SuperResConfig: Real-ESRGAN's RRDBNet configuration."""

from __future__ import annotations

import dataclasses

from holst.config import ConfigBase, check_choice, check_int

SUPERRES_SCALES = (1, 2, 4, 8)


@dataclasses.dataclass
class SuperResConfig(ConfigBase):
    """Real-ESRGAN's RRDBNet (``research/reference.md`` §6); defaults are RealESRGAN_x4plus.

    ``scale`` 2 (and 1) fold the input with pixel_unshuffle as upstream basicsr does; 8 adds a third
    upsampling conv (``conv_up3``, ru-dalle's x8 model).
    """

    num_in_ch: int = 3
    num_out_ch: int = 3
    num_feat: int = 64
    num_block: int = 23
    num_grow_ch: int = 32
    scale: int = 4

    def __post_init__(self) -> None:
        for name, high in (("num_in_ch", 16), ("num_out_ch", 16), ("num_feat", 4096), ("num_grow_ch", 4096)):
            check_int(name, getattr(self, name), 1, high)
        check_int("num_block", self.num_block, 0, 1024)
        check_choice("scale", self.scale, SUPERRES_SCALES)
