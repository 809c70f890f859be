"""Scaled dot-product attention whose backward is cheap on a CPU (shared by the DALL-E and CLIP models).

Axis legend: B batch (and any further leading dims), S queries, K keys, hd head dim.

torch's fused ``scaled_dot_product_attention`` on a CPU has a slow bf16 backward: on the dev CPU (2 cores,
AVX512-BF16) forward + backward of (64, 4, 65, 64) took 35 ms against 9 ms for the written-out scores
(bmm, fp32 softmax, bmm), (32, 6, 88, 64) with a causal mask 30 ms against 9 ms, the VQGAN's
(2, 1, 1024, 512) 72 ms against 43 ms. So where a gradient will flow through a CPU attention in bf16
or fp16, the scores are written out. fp32 (about even: a DALL-E emoji step was 1-3% slower written
out) and inference (the fused forward is as fast or faster) keep the fused kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def needs_written_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True for bf16/fp16 attention on a CPU whose backward autograd will run (see the module docstring)."""
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad))


class _KeyScores(torch.autograd.Function):
    """q @ k^T whose key gradient is formed as dS^T @ q, so it comes out [.., K, hd] contiguous.

    autograd's own formula gives the key gradient as the transpose of q^T @ dS (hd-major), and the
    kernels that gather it back into the fused qkv gradient then run as strided scalar loops.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, k)
        return q @ k.transpose(-1, -2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        q, k = ctx.saved_tensors
        dq = (grad @ k.to(grad.dtype)).to(q.dtype) if ctx.needs_input_grad[0] else None
        dk = (grad.transpose(-1, -2) @ q.to(grad.dtype)).to(k.dtype) if ctx.needs_input_grad[1] else None
        return dq, dk


def key_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q @ k^T: [B, S, hd] x [B, K, hd] -> [B, S, K] (equal leading dims), gradients in row-major layouts.

    The same numbers as ``q @ k.transpose(-1, -2)``; only the layout of the key gradient differs
    (see :class:`_KeyScores`). Under autocast the product runs in the autocast dtype, as ``@`` does.
    """
    if q.shape[:-2] != k.shape[:-2] or not torch.is_grad_enabled():
        return q @ k.transpose(-1, -2)
    return _KeyScores.apply(q, k)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax over the last axis of the visible (``mask`` True) scores, accumulated in fp32, in ``scores``' dtype."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


def written_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      probs_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v over the visible keys, the scores written out.

    Args:
        q: [B, S, hd] queries (any leading dims).
        k: [B, K, hd] keys.
        v: [B, K, hd] values.
        mask: bool broadcastable to [B, S, K], True = visible (every query must see a key), or None.
        probs_fn: applied to the probabilities before they weight the values (attention dropout).
    Returns:
        [B, S, hd] in q's dtype; the softmax accumulates in fp32, masked keys get probability 0.
    """
    scores = key_scores(q, k) * (1.0 / math.sqrt(q.shape[-1]))  # [B, S, K]
    probs = masked_softmax(scores, mask)
    if probs_fn is not None:
        probs = probs_fn(probs)
    return probs @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              causal: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)``, the same numbers.

    Written out (:func:`written_attention`) where :func:`needs_written_scores`, fused elsewhere.
    q, k, v: [B, S, hd] (any leading dims); mask: bool [S, K] or broadcastable, True = visible.
    """
    if not needs_written_scores(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    if causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril_()
    return written_attention(q, k, v, mask)


__all__ = ["attention", "key_scores", "masked_softmax", "needs_written_scores", "written_attention"]
