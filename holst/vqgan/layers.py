"""Building blocks of the taming-transformers VQGAN encoder/decoder (reference.md §4.2).

Module and parameter names equal taming's (``conv_in``, ``down.{i}.block.{j}``, ``mid.attn_1``,
``up.{i}.upsample.conv``, ...) so that official checkpoints load by a prefix strip.

Axis legend: B batch, C channels, H/W spatial size at the current level, N = H*W positions,
K codebook size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from holst.utils.attention import attention


def Normalize(channels: int, groups: int = 32) -> nn.GroupNorm:
    """taming's ``Normalize``: GroupNorm(32 groups, eps 1e-6, affine)."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """swish x * sigmoid(x) (taming's ``nonlinearity``)."""
    return F.silu(x)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> dropout -> conv3x3, plus a (1x1) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # taming names the 1x1 channel-changing shortcut ``nin_shortcut`` (no temb_proj: temb_ch = 0).
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H, W): two norm-swish-conv steps plus the (1x1-projected) input."""
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions (scale C^-1/2), residual."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = Normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W): single-head self-attention over the H*W positions, plus the input."""
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, 1, N, C): one head; SDPA's default scale is C^-1/2 as in taming.
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(y), self.k(y), self.v(y)))
        out = attention(q, k, v)  # (B, 1, N, C); scores written out where a CPU backward follows
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad (0,1,0,1) with zeros then conv3x3 stride 2 (taming's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2): pad right and bottom by one, 3x3 conv with stride 2 (taming's)."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W): nearest-neighbour upsampling, then a 3x3 conv."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` list, ``attn`` list, optional ``downsample``/``upsample``."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Each ResnetBlock (then its AttnBlock, where the level has attention), then the resampling conv."""
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                h = getattr(self, name)(h)
        return h


class _Mid(nn.Module):
    """``block_1`` -> ``attn_1`` -> ``block_2`` at the lowest resolution."""

    def __init__(self, channels: int, dropout: float, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) in [-1, 1] -> latents (B, z_channels[*2], H/f, W/f), f = 2**(levels-1).

    Attention placement follows taming: a level gets attention when its *nominal* resolution
    (``resolution / 2**level``) is in ``attn_resolutions``; the layout is fixed at build time,
    so any input size divisible by f runs through the same weights.
    """

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = False, dropout: float = 0.0,
                 groups: int = 32):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            level = _Level()
            block_in, block_out = ch * in_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout, groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, groups))
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, dropout, groups)
        self.norm_out = Normalize(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in_channels, H, W) -> latents (B, z_channels or 2 * z_channels, H/f, W/f)."""
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f), unbounded (callers clamp).

    ``up`` is indexed by level like taming (``up.0`` = full resolution, executed last).
    """

    def __init__(self, *, ch: int, out_ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], resolution: int, z_channels: int, dropout: float = 0.0,
                 groups: int = 32):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, dropout, groups)
        levels: list[_Level] = []
        for i_level in reversed(range(self.num_resolutions)):
            level = _Level()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, dropout, groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, groups))
            if i_level != 0:
                level.upsample = Upsample(block_in)
                curr_res *= 2
            levels.insert(0, level)  # keep index == level, as taming's ``self.up.insert(0, up)``
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the last conv (the adaptive GAN weight balances gradients here)."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, z_channels, h, w) -> (B, out_ch, h*f, w*f), unbounded (callers clamp)."""
        h = self.mid(self.conv_in(z))
        for i_level in reversed(range(self.num_resolutions)):
            h = self.up[i_level](h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class InverseHaarDWT(nn.Module):
    """Single-level inverse 2-D Haar (db1) DWT, mode 'zero' (reference.md §4.4).

    Buffers ``g0_col, g1_col`` (1,1,2,1) and ``g0_row, g1_row`` (1,1,1,2) hold the synthesis filters
    g0 = (1/sqrt2, 1/sqrt2), g1 = (1/sqrt2, -1/sqrt2) under the names of the reference's checkpoint.
    """

    def __init__(self):
        super().__init__()
        s = 1.0 / math.sqrt(2.0)
        self.register_buffer("g0_col", torch.tensor([s, s]).reshape(1, 1, 2, 1))
        self.register_buffer("g1_col", torch.tensor([s, -s]).reshape(1, 1, 2, 1))
        self.register_buffer("g0_row", torch.tensor([s, s]).reshape(1, 1, 1, 2))
        self.register_buffer("g1_row", torch.tensor([s, -s]).reshape(1, 1, 1, 2))

    @staticmethod
    def _synth(a: torch.Tensor, b: torch.Tensor, g0: torch.Tensor, g1: torch.Tensor, stride: tuple[int, int]):
        # synth(a, b)[2i + t] = a[i] g0[t] + b[i] g1[t]: a stride-2 transposed conv without padding.
        c = a.shape[1]
        g0 = g0.to(a.dtype).expand(c, 1, *g0.shape[2:])
        g1 = g1.to(a.dtype).expand(c, 1, *g1.shape[2:])
        return F.conv_transpose2d(a, g0, stride=stride, groups=c) + F.conv_transpose2d(b, g1, stride=stride, groups=c)

    def forward(self, ll: torch.Tensor, highs: torch.Tensor) -> torch.Tensor:
        """Args: ll (B, C, H, W); highs (B, C, 3, H, W) bands (LH, HL, HH). Returns (B, C, 2H, 2W)."""
        lh, hl, hh = highs.unbind(2)
        lo = self._synth(ll, lh, self.g0_col, self.g1_col, (2, 1))  # along H
        hi = self._synth(hl, hh, self.g0_col, self.g1_col, (2, 1))
        return self._synth(lo, hi, self.g0_row, self.g1_row, (1, 2))  # along W


class DecoderDWT(nn.Module):
    """The reference's DWT decoder: own ``post_quant_conv``, a 12-channel ``decoder``, Haar ``idwt``.

    Latents (B, embed_dim, h, w) -> image (B, 3, 2*h*f, 2*w*f), unbounded (callers clamp).
    """

    def __init__(self, *, embed_dim: int, z_channels: int, **ddconfig):
        super().__init__()
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.decoder = Decoder(z_channels=z_channels, **{**ddconfig, "out_ch": 12})
        self.idwt = InverseHaarDWT()

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the last conv (the adaptive GAN weight balances gradients here)."""
        return self.decoder.conv_out.weight

    def forward(self, quant: torch.Tensor) -> torch.Tensor:
        """Quantized latents (B, embed_dim, h, w) -> images (B, 3, 2*h*f, 2*w*f) through the inverse Haar DWT."""
        y = self.decoder(self.post_quant_conv(quant))  # (B, 12, H, W)
        b, _, h, w = y.shape
        # channels 0-2 = LL per RGB; 3-11 viewed (B, 3 colour, 3 band, H, W)
        return self.idwt(y[:, :3], y[:, 3:].reshape(b, 3, 3, h, w))
