"""VQGAN image tokenizer: images <-> grids of codebook indices (reference.md §4).

Layout and state-dict names are taming's GumbelVQ (``encoder.*``, ``quant_conv``, ``quantize.proj``,
``quantize.embed``, ``post_quant_conv``, ``decoder.*``), so the Sber checkpoint loads by stripping
its prefix (``holst.convert.load_sber_vqgan``).

Axis legend: B batch, H/W image size (divisible by f), f downsample factor (8 for Sber),
h = H/f, w = W/f code grid, D embed_dim, K n_embed.
"""

from __future__ import annotations

import torch
from torch import nn

from holst.utils.persist import PretrainedMixin
from holst.vqgan.config import VQGANConfig
from holst.vqgan.layers import Decoder, DecoderDWT, Encoder
from holst.vqgan.quantizer import GumbelQuantizer, VectorQuantizer


def _ddconfig(config: VQGANConfig) -> dict:
    return dict(ch=config.ch, ch_mult=config.ch_mult, num_res_blocks=config.num_res_blocks,
                attn_resolutions=config.attn_resolutions, resolution=config.resolution, dropout=config.dropout,
                groups=config.norm_groups)


class VQGAN(nn.Module, PretrainedMixin):
    """Encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder.

    Public API (what the pipeline and trainers use): ``encode(images) -> codes_grid``, ``decode(codes_grid) -> images``,
    ``downsample_factor``, ``config.n_embed``. ``forward`` is the differentiable training path.
    """

    config_class = VQGANConfig

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        dd = _ddconfig(config)
        self.encoder = Encoder(in_channels=config.in_channels, z_channels=config.z_channels,
                               double_z=config.double_z, **dd)
        z_out = 2 * config.z_channels if config.double_z else config.z_channels
        self.quant_conv = nn.Conv2d(z_out, config.embed_dim, 1)
        if config.quantizer == "gumbel":
            # taming builds proj from z_channels, which only runs when z_channels == embed_dim; we
            # feed it quant_conv's output (embed_dim channels): the same shapes for every runnable model.
            self.quantize = GumbelQuantizer(config.embed_dim, config.n_embed, config.embed_dim, config.kl_weight)
        else:
            self.quantize = VectorQuantizer(config.n_embed, config.embed_dim, beta=config.beta,
                                            ema=config.quantizer == "ema", decay=config.ema_decay)
        # The DWT variant keeps this (unused) conv too: the reference's checkpoint holds it (§4.4).
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        if config.decoder == "dwt":
            self.decoder = DecoderDWT(embed_dim=config.embed_dim, z_channels=config.z_channels, out_ch=config.out_ch,
                                      **dd)
        else:
            self.decoder = Decoder(out_ch=config.out_ch, z_channels=config.z_channels, **dd)

    # Sizes ----------------------------------------------------------------------------------
    @property
    def downsample_factor(self) -> int:
        """f: image pixels per code along each side (8 for Sber)."""
        return self.config.downsample_factor

    @property
    def output_factor(self) -> int:
        """Output pixels per code along each side: f, or 2f for the DWT decoder."""
        return self.downsample_factor * (2 if self.config.decoder == "dwt" else 1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last conv weight (for the adaptive GAN weight)."""
        return self.decoder.last_layer

    def _check_images(self, images: torch.Tensor) -> None:
        f = self.downsample_factor
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"images must be (B, {self.config.in_channels}, H, W); got {tuple(images.shape)}")
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"image size {tuple(images.shape[2:])} must be divisible by the downsample factor {f}")

    # Inference ------------------------------------------------------------------------------
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> pre-quantization latents (B, D, h, w)."""
        self._check_images(images)
        dtype = self.quant_conv.weight.dtype
        return self.quant_conv(self.encoder(images.to(dtype) * 2 - 1))

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, gumbel: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images -> code grid.

        Args:
            images: (B, 3, H, W) float in [0, 1], H and W divisible by ``downsample_factor``.
            gumbel: add Gumbel noise before the argmax (the reference's stochastic default;
                Gumbel quantizer only, ignored by nearest-neighbour quantizers).
            generator: RNG for the Gumbel noise.
        Returns:
            codes_grid (B, H/f, W/f) long in [0, n_embed).
        """
        return self.quantize.codes(self.encode_latents(images), gumbel=gumbel, generator=generator)

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latents (B, D, h, w) -> raw decoder output (B, 3, h*F, w*F), about [-1, 1]."""
        if self.config.decoder == "dwt":
            return self.decoder(z_q)
        return self.decoder(self.post_quant_conv(z_q))

    @torch.no_grad()
    def decode(self, codes_grid: torch.Tensor) -> torch.Tensor:
        """Code grid -> images.

        Args:
            codes_grid: (B, h, w) long, or (B, h*w) for a square grid (row-major, as ruDALL-E's codes).
        Returns:
            images (B, 3, h*F, w*F) float in [0, 1], F = ``output_factor`` (f, or 2f with DWT).
        """
        codes_grid = self._as_grid(codes_grid)
        z_q = self.quantize.lookup(codes_grid).to(self.quant_conv.weight.dtype)
        x = self.decode_latents(z_q)
        return (x.clamp(-1, 1) + 1) / 2

    def decode_chunk(self) -> int:
        """Grids per :meth:`decode_chunked` call by default: 8 on CUDA, 4 on a CPU.

        On the 2-core dev CPU 13 ms an image at 64 px in fours, against 17 one at a time.
        """
        return 8 if self.device.type == "cuda" else 4

    @torch.no_grad()
    def decode_chunked(self, codes_grid: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """:meth:`decode` in calls of exactly ``chunk`` grids, the last padded with copies of its last grid.

        Convolutions pick their kernels by batch size (on a 2-core Zen 4 a batch of 3 rounds some pixels
        differently from a batch of 2 or 4), so with one call shape an image's pixels depend only on its
        codes, however many images are decoded with it.

        Args:
            codes_grid: (B, h, w) or (B, h*w) long.
            chunk: grids per decoder call (default :meth:`decode_chunk`).
        Returns:
            images (B, 3, h*F, w*F) float in [0, 1].
        """
        chunk = chunk or self.decode_chunk()
        grids = self._as_grid(codes_grid)
        n = grids.shape[0]
        pad = -n % chunk
        if pad:
            grids = torch.cat([grids, grids[-1:].expand(pad, *grids.shape[1:])])  # (ceil(B / chunk) * chunk, h, w)
        return torch.cat([self.decode(part) for part in grids.split(chunk)])[:n]

    def _as_grid(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() == 2:  # (B, N) -> (B, sqrt N, sqrt N)
            side = int(round(codes.shape[1] ** 0.5))
            if side * side != codes.shape[1]:
                raise ValueError(f"flat codes of length {codes.shape[1]} are not a square grid; pass (B, h, w)")
            codes = codes.reshape(codes.shape[0], side, side)
        if codes.dim() != 3:
            raise ValueError(f"codes_grid must be (B, h, w) or (B, N); got {tuple(codes.shape)}")
        codes = codes.long()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.n_embed):
            lo, hi = int(codes.min()), int(codes.max())
            raise ValueError(f"codes must lie in [0, {self.config.n_embed}); got values in [{lo}, {hi}]")
        return codes

    # Training -------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, *, temperature: float = 1.0, hard: bool = False,
                restart_threshold: float = 0.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Differentiable reconstruction for training.

        Args:
            images: (B, 3, H, W) in [0, 1].
            temperature: Gumbel-softmax temperature (Gumbel quantizer only).
            hard: straight-through one-hot codes (Gumbel quantizer only).
            restart_threshold: dead-code restart threshold (nearest-neighbour quantizers, training mode).
            generator: RNG for Gumbel noise / code restarts.
        Returns:
            recon (B, 3, H*F/f, W*F/f) in about [-1, 1] (not clamped), quantizer loss (scalar), codes (B, h, w).
        """
        z = self.encode_latents(images)
        z_q, q_loss, codes = self.quantize(z, temperature=temperature, hard=hard,
                                           restart_threshold=restart_threshold, generator=generator)
        return self.decode_latents(z_q), q_loss, codes
