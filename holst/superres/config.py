"""SuperResConfig: Real-ESRGAN's RRDBNet configuration, built from two small typed parts.

:class:`RRDBOptions` (trunk width, depth, growth and upscale factor) is shared with
``holst.train.config.SuperResTrainConfig``, which builds a fresh net from the same fields, so the two
agree on names, defaults and limits. :class:`RRDBChannels` holds the image channels in and out.
"""

from __future__ import annotations

import dataclasses

from holst.config import ConfigBase, check_choice, check_int

SUPERRES_SCALES = (1, 2, 4, 8)


@dataclasses.dataclass
class RRDBChannels:
    """Image channels into and out of the net: 3 (RGB) for every model holst trains."""

    num_in_ch: int = 3
    num_out_ch: int = 3

    def check_rrdb_channels(self) -> None:
        """Raise ConfigError naming the first channel count outside [1, 16]."""
        for name in ("num_in_ch", "num_out_ch"):
            check_int(name, getattr(self, name), 1, 16)


@dataclasses.dataclass
class RRDBOptions:
    """The RRDBNet trunk: ``num_feat`` channels, ``num_block`` RRDB blocks of ``num_grow_ch`` growth channels.

    ``scale`` is the upscale factor, one of :data:`SUPERRES_SCALES`. Defaults are RealESRGAN_x4plus.
    """

    num_feat: int = 64
    num_block: int = 23
    num_grow_ch: int = 32
    scale: int = 4

    def check_rrdb_options(self) -> None:
        """Raise ConfigError naming the first trunk size out of range or an unsupported scale."""
        for name in ("num_feat", "num_grow_ch"):
            check_int(name, getattr(self, name), 1, 4096)
        check_int("num_block", self.num_block, 0, 1024)
        check_choice("scale", self.scale, SUPERRES_SCALES)


@dataclasses.dataclass
class SuperResConfig(RRDBOptions, RRDBChannels, ConfigBase):
    """Real-ESRGAN's RRDBNet (``research/reference.md`` §6): :class:`RRDBChannels` + :class:`RRDBOptions`.

    ``scale`` 2 (and 1) fold the input with pixel_unshuffle as upstream basicsr does; 8 adds a third
    upsampling conv (``conv_up3``, ru-dalle's x8 model).
    """

    def __post_init__(self) -> None:
        self.check_rrdb_channels()
        self.check_rrdb_options()
