"""Codebook quantizers: Sber's Gumbel-softmax quantizer and a nearest-neighbour (plain / EMA) one.

Both keep the code table under ``embed.weight`` (K, D) so decoding is the same lookup.

Axis legend: B batch, D embed_dim, K n_embed (codebook size), h/w code grid, M = B*h*w vectors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _all_mean(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    torch.distributed.all_reduce(t)
    return t / torch.distributed.get_world_size()


def gumbel_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel samples shaped like ``like`` (-log Exp(1)), drawn from ``generator``."""
    e = torch.empty_like(like, dtype=torch.float32).exponential_(generator=generator)
    return e.log().neg().to(like.dtype)


class GumbelQuantizer(nn.Module):
    """taming's ``GumbelQuantize`` (reference.md §4.3): 1x1 ``proj`` to K logits, table ``embed``.

    Training uses a (soft, or straight-through hard) Gumbel-softmax sample at ``temperature`` and a
    KL term ``kl_weight * sum q log(q K)`` towards the uniform prior; inference uses argmax.
    """

    def __init__(self, in_channels: int, n_embed: int, embed_dim: int, kl_weight: float = 1e-8):
        super().__init__()
        self.n_embed, self.embed_dim, self.kl_weight = n_embed, embed_dim, kl_weight
        self.proj = nn.Conv2d(in_channels, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embed_dim)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> code logits (B, K, h, w)."""
        return self.proj(z)

    def codes(self, z: torch.Tensor, *, gumbel: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, C, h, w) -> codes (B, h, w) long: argmax, or argmax after Gumbel noise (the reference default)."""
        logits = self.logits(z).float()
        if gumbel:  # == F.gumbel_softmax(logits, tau=1, hard=True).argmax(1), with an explicit generator
            logits = logits + gumbel_noise(logits, generator)
        return logits.argmax(dim=1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) long -> quantized latents (B, D, h, w) (the reference's one_hot @ embed)."""
        return self.embed(codes).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor, *, temperature: float = 1.0, hard: bool = False,
                generator: torch.Generator | None = None,
                **_: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Differentiable quantization for training.

        Returns:
            z_q (B, D, h, w), the KL loss (scalar, already times kl_weight), codes (B, h, w) long.
        """
        logits = self.logits(z)
        y = F.softmax((logits + gumbel_noise(logits, generator)) / temperature, dim=1)  # (B, K, h, w)
        codes = y.argmax(dim=1)
        if hard:  # straight-through: forward one-hot, backward soft
            y = F.one_hot(codes, self.n_embed).permute(0, 3, 1, 2).to(y.dtype) - y.detach() + y
        z_q = torch.einsum("bkhw,kd->bdhw", y, self.embed.weight.to(y.dtype))
        q = F.softmax(logits.float(), dim=1)
        kl = self.kl_weight * (q * torch.log(q * self.n_embed + 1e-10)).sum(dim=1).mean()
        return z_q, kl, codes


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantizer (VQ-VAE), optionally with EMA codebook updates (``ema=True``).

    ``cluster_size`` keeps an exponential moving average of how many vectors each code receives per
    batch (both modes); training calls with ``restart_threshold > 0`` re-seed codes whose average
    falls below it with random encoder outputs of the batch (dead-code restart). The first training
    batch initialises the whole table from encoder outputs (``initted`` flag).
    """

    def __init__(self, n_embed: int, embed_dim: int, *, beta: float = 0.25, ema: bool = False,
                 decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.ema, self.decay, self.eps = ema, decay, eps
        self.embed = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embed.weight, -1.0 / n_embed, 1.0 / n_embed)
        self.embed.weight.requires_grad_(not ema)
        self.register_buffer("cluster_size", torch.zeros(n_embed))
        self.register_buffer("embed_avg", self.embed.weight.detach().clone())
        self.register_buffer("initted", torch.tensor(False))
        self._initted_flag = False  # the buffer as a Python bool, for compiled graphs (see _is_initted)

    def _is_initted(self) -> bool:
        """Whether the table was initialised from data.

        Eager calls read the ``initted`` buffer (the truth: checkpoints, direct writes); compiled ones
        read its Python copy, a guard rather than a data-dependent branch that would split the graph
        (one recompile when it turns True).
        """
        if not torch.compiler.is_compiling():
            self._initted_flag = bool(self.initted)
        return self._initted_flag

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initted_flag = bool(self.initted)

    def _flat(self, z: torch.Tensor) -> torch.Tensor:
        return z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim).float()  # (B, D, h, w) -> (M, D)

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """(M, D) float -> index of the nearest code (M,) long (squared L2, fp32)."""
        w = self.embed.weight.float()
        with torch.autocast(device_type=flat.device.type, enabled=False):
            d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ w.t() + w.pow(2).sum(1)[None]  # (M, K)
        return d.argmin(dim=1)

    def codes(self, z: torch.Tensor, **_: object) -> torch.Tensor:
        """(B, D, h, w) -> codes (B, h, w) long."""
        b, _, h, w = z.shape
        return self.nearest(self._flat(z)).reshape(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) long -> latents (B, D, h, w)."""
        return self.embed(codes).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor, *, restart_threshold: float = 0.0, generator: torch.Generator | None = None,
                **_: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize with a straight-through gradient; in training mode also update the codebook stats.

        Returns:
            z_q (B, D, h, w), the commitment (+ codebook) loss (scalar), codes (B, h, w) long.
        """
        b, _, h, w = z.shape
        flat = self._flat(z)
        if self.training and not self._is_initted():
            self._init_from(flat, generator)
        idx = self.nearest(flat)
        z_q = self.lookup(idx.reshape(b, h, w)).to(z.dtype)
        loss = self.beta * F.mse_loss(z, z_q.detach())
        if not self.ema:
            loss = loss + F.mse_loss(z_q, z.detach())
        if self.training:
            self._update(flat, idx, restart_threshold, generator)
        z_q = z + (z_q - z).detach()
        return z_q, loss, idx.reshape(b, h, w)

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor, generator: torch.Generator | None) -> None:
        pick = torch.randint(flat.shape[0], (self.n_embed,), generator=generator, device=flat.device)
        init = flat[pick]
        if _distributed():
            torch.distributed.broadcast(init, src=0)
        self.embed.weight.data.copy_(init)
        self.embed_avg.copy_(init)
        self.cluster_size.fill_(1.0)
        self.initted.fill_(True)
        self._initted_flag = True

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, idx: torch.Tensor, restart_threshold: float,
                generator: torch.Generator | None) -> None:
        onehot = F.one_hot(idx, self.n_embed).float()  # (M, K)
        counts = onehot.sum(0)
        sums = onehot.t() @ flat if self.ema else None  # (K, D)
        if _distributed():  # data-parallel: every rank applies the same (global-mean) statistics
            counts = _all_mean(counts)
            sums = _all_mean(sums) if sums is not None else None
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.ema:
            self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            n = self.cluster_size.sum()
            # Laplace smoothing keeps rarely used codes from dividing by ~0.
            size = (self.cluster_size + self.eps) / (n + self.n_embed * self.eps) * n
            self.embed.weight.data.copy_(self.embed_avg / size[:, None])
        if restart_threshold > 0:
            self.restart_dead_codes(flat, restart_threshold, generator)

    @torch.no_grad()
    def restart_dead_codes(self, flat: torch.Tensor, threshold: float, generator: torch.Generator | None = None) -> int:
        """Re-seed codes with ``cluster_size < threshold`` from random rows of ``flat`` (M, D).

        Returns:
            The number of codes restarted.
        """
        dead = (self.cluster_size < threshold).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        pick = torch.randint(flat.shape[0], (dead.numel(),), generator=generator, device=flat.device)
        new = flat[pick]
        if _distributed():  # rank 0's picks everywhere, so the codebooks stay identical
            torch.distributed.broadcast(new, src=0)
        self.embed.weight.data[dead] = new
        self.embed_avg[dead] = new
        self.cluster_size[dead] = 1.0
        return int(dead.numel())
