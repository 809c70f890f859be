"""Real-ESRGAN's generator: RRDBNet (ESRGAN, Wang et al. 2018; basicsr ``rrdbnet_arch.py``).

Axis legend: B batch, C image channels (3), H/W low-resolution height/width, s scale (1, 2, 4, 8),
F num_feat (64), G num_grow_ch (32), u pixel-unshuffle factor (4 for s=1, 2 for s=2, else 1).

State-dict names are basicsr's (``conv_first``, ``body.{i}.rdb{1,2,3}.conv{1..5}``, ``conv_body``,
``conv_up1``, ``conv_up2``, [``conv_up3`` for x8, ru-dalle's extension], ``conv_hr``, ``conv_last``), so
upstream ``RealESRGAN_x*.pth`` files load with no renaming (``research/reference.md`` §6).

Like upstream, x2 (and x1) models fold the input with ``pixel_unshuffle`` and then always upsample
x4 inside the network: an x2 model sees (B, 4C, H/2, W/2) and returns (B, C, 2H, 2W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from holst.superres.config import SuperResConfig
from holst.utils.persist import PretrainedMixin


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, negative_slope=0.2)


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs with dense connections; output ``conv5 * 0.2 + x`` (residual scaling 0.2)."""

    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        f, g = num_feat, num_grow_ch
        self.conv1 = nn.Conv2d(f, g, 3, 1, 1)
        self.conv2 = nn.Conv2d(f + g, g, 3, 1, 1)
        self.conv3 = nn.Conv2d(f + 2 * g, g, 3, 1, 1)
        self.conv4 = nn.Conv2d(f + 3 * g, g, 3, 1, 1)
        self.conv5 = nn.Conv2d(f + 4 * g, f, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_feat, H, W) -> (B, num_feat, H, W): ``conv5 * 0.2 + x``."""
        x1 = _lrelu(self.conv1(x))  # (B, G, H, W)
        x2 = _lrelu(self.conv2(torch.cat((x, x1), 1)))  # (B, G, H, W); input (B, F+G, H, W)
        x3 = _lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = _lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))  # (B, F, H, W)
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three ResidualDenseBlocks, output ``out * 0.2 + x``."""

    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_feat, H, W) -> (B, num_feat, H, W): three dense blocks, scaled by 0.2, plus the input."""
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module, PretrainedMixin):
    """The Real-ESRGAN generator.

    ``forward(x)``: x (B, C, H, W) float in [0, 1] -> (B, C, s*H, s*W), not clamped (upstream clamps
    after the network; :func:`holst.superres.upscale` does). For s=2, H and W must be even; for s=1,
    multiples of 4 (``upscale`` pads as needed).
    """

    config_class = SuperResConfig

    def __init__(self, config: SuperResConfig) -> None:
        super().__init__()
        self.config = config
        f = config.num_feat
        self.conv_first = nn.Conv2d(config.num_in_ch * self.unshuffle_factor**2, f, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(f, config.num_grow_ch) for _ in range(config.num_block)])
        self.conv_body = nn.Conv2d(f, f, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(f, f, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(f, f, 3, 1, 1)
        if config.scale == 8:
            self.conv_up3 = nn.Conv2d(f, f, 3, 1, 1)
        self.conv_hr = nn.Conv2d(f, f, 3, 1, 1)
        self.conv_last = nn.Conv2d(f, config.num_out_ch, 3, 1, 1)

    @property
    def scale(self) -> int:
        """Output size / input size (1, 2, 4 or 8)."""
        return self.config.scale

    @property
    def unshuffle_factor(self) -> int:
        """Input sides must be multiples of this (pixel_unshuffle before conv_first)."""
        return {1: 4, 2: 2}.get(self.config.scale, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float in [0, 1] -> (B, C, scale*H, scale*W), unclamped."""
        u = self.unshuffle_factor
        if u > 1:
            x = F.pixel_unshuffle(x, u)  # (B, C, H, W) -> (B, C*u*u, H/u, W/u)
        feat = self.conv_first(x)  # (B, F, h, w)
        feat = feat + self.conv_body(self.body(feat))
        # Nearest-neighbour x2 then conv, twice (three times for x8): (B, F, h, w) -> (B, F, 4h, 4w)
        feat = _lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = _lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        if self.config.scale == 8:
            feat = _lrelu(self.conv_up3(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(_lrelu(self.conv_hr(feat)))  # (B, C_out, s*H, s*W)

    @classmethod
    def from_pretrained(cls, directory, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = torch.float32, strict: bool = True) -> RRDBNet:
        """Load a directory written by ``save_pretrained`` (the converted Real-ESRGAN weights are stored fp16).

        Unlike other components, ``dtype`` defaults to float32: the file is fp16 (lossless for the ncnn
        weights, half the size) but fp16 convolutions are slow or missing on CPUs. Pass
        ``dtype=None`` to keep the file's dtype, or ``torch.bfloat16``/``torch.float16`` on a GPU.
        """
        return super().from_pretrained(directory, device=device, dtype=dtype, strict=strict)
