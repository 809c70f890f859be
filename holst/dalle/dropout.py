"""Dropout whose random bits are cheap on a CPU.

torch's CPU dropout draws one MT19937 number per element through ``bernoulli_`` (single-threaded,
~7 ns an element on the dev CPU): for the emoji preset at batch 32 that is ~4.8 ms a call and 31 calls
a training step. Here one 64-bit draw from the same generator gives four 16-bit fields, each
compared with a threshold, so the keep probability is rounded to a multiple of 1/65536 (p = 0.1
becomes 6554/65536 = 0.1000061) and the kept values are scaled by exactly 1 / (1 - that p).
Under ``torch.compile`` on a CPU the mask comes from the same draws through an opaque custom op
(``holst::keep_mask``) and the select and scale fuse into the neighbouring kernels; inductor's own
CPU random numbers would cost more. On CUDA, ``F.dropout`` (fused random numbers), eager or compiled.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16  # one 16-bit field per element


def quantized_p(p: float) -> float:
    """The drop probability the CPU path applies for ``p``: the nearest multiple of 1/65536."""
    return round(p * _LEVELS) / _LEVELS


def keep_mask(shape: torch.Size | list[int], threshold: int, generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """bool tensor of ``shape``, each element False with probability ``threshold`` / 65536.

    One 64-bit draw of ``generator`` (default: torch's global one) gives four 16-bit fields.
    """
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None, generator=generator)
    fields = bits.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    return fields >= threshold - _LEVELS // 2


@torch.library.custom_op("holst::keep_mask", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _keep_mask_op(like: torch.Tensor, threshold: int) -> torch.Tensor:
    """:func:`keep_mask` of ``like``'s shape from torch's global generator, for compiled graphs.

    Opaque to the compiler: inductor's own CPU random numbers cost more than torch's eager ones, and
    a bool mask keeps the fused kernels that use it vectorised (int16 fields do not). ``like`` is a
    fresh ``torch.empty``: AOTAutograd's common-subexpression pass would merge two calls with equal
    arguments (it ignores the ``nondeterministic_seeded`` tag but never merges ``empty``). The tag
    marks it as a random op, as torch's own are; tests check that the backward pass, with and without
    activation checkpointing, uses the forward's mask.
    """
    return keep_mask(like.shape, threshold)


@_keep_mask_op.register_fake
def _(like: torch.Tensor, threshold: int) -> torch.Tensor:
    return torch.empty(like.shape, dtype=torch.bool)


def dropout(x: torch.Tensor, p: float, training: bool = True, generator: torch.Generator | None = None
            ) -> torch.Tensor:
    """Inverted dropout: zero each element with probability ``p``, scale the rest by 1 / (1 - p).

    Args:
        x: any shape and floating dtype.
        p: drop probability in [0, 1] (on a CPU rounded by :func:`quantized_p`).
        training: False returns ``x`` itself.
        generator: CPU generator of the random bits (default: torch's global one, as ``F.dropout``; compiled
            graphs always draw from the global one).
    Returns:
        A tensor like ``x``; gradients flow through the kept elements, scaled the same way.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:  # CUDA: torch's fused RNG (eager and compiled)
        return F.dropout(x, p, True)
    threshold = round(p * _LEVELS)
    if threshold == 0:
        return x
    if torch.compiler.is_compiling():
        keep = torch.ops.holst.keep_mask(torch.empty(x.shape, dtype=torch.int8), threshold)
    else:
        keep = keep_mask(x.shape, threshold, generator)  # P(drop) = threshold / 65536
    return torch.where(keep, x * (_LEVELS / (_LEVELS - threshold)), 0.0)


class Dropout(nn.Module):
    """``nn.Dropout`` with :func:`dropout` (same attribute ``p``, no state-dict entries)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply :func:`dropout` in training mode; identity in eval mode."""
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        """``p=...`` in the module's repr."""
        return f"p={self.p}"


__all__ = ["Dropout", "dropout", "quantized_p"]
