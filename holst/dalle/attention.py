"""Self-attention of the ruDALL-E transformer (reference.md §1.4).

Axis legend: B batch, S sequence (queries), K keys, H hidden, nh heads, hd head dim (H = nh*hd).
State-dict names follow the reference: ``query_key_value`` (output [q | k | v], contiguous chunks,
head-major inside each chunk) and ``dense``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

FP16_MAX = 65504.0  # the reference clamps attention outputs to the fp16 range (commit 3c6a6be)
PB_RELAX_ALPHA = 32.0
MASKED_SCORE = -10000.0  # the reference's masking value (not -inf)

ATTN_IMPLS = ("sdpa", "math")


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, S, H] -> [B, nh, S, hd]."""
    B, S, H = x.shape
    return x.view(B, S, num_heads, H // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, nh, S, hd] -> [B, S, H]."""
    B, nh, S, hd = x.shape
    return x.transpose(1, 2).reshape(B, S, nh * hd)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                   pb_relax: bool, dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """The reference's explicit attention, operation for operation.

    Args:
        q: [B, nh, S, hd]; k, v: [B, nh, K, hd]; mask: bool [S, K] or [B, 1, S, K], True = visible.
        pb_relax: CogView PB-relax (alpha 32, max over the whole score matrix per batch and head).
    Returns:
        [B, nh, S, hd].
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if pb_relax:
        scores = (q * scale) @ k.transpose(-1, -2)  # [B, nh, S, K]
    else:
        scores = (q @ k.transpose(-1, -2)) * scale  # [B, nh, S, K]
    m = mask.to(scores.dtype)
    scores = scores * m + MASKED_SCORE * (1.0 - m)
    if pb_relax:
        scaled = scores / PB_RELAX_ALPHA
        peak = scaled.detach().amax(dim=(-2, -1), keepdim=True)  # [B, nh, 1, 1]
        scores = (scaled - peak) * PB_RELAX_ALPHA
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0 and training:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v  # [B, nh, S, hd]


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                   dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """Fused attention: same softmax(q k^T / sqrt(hd)) over visible keys, max-subtracted per row.

    PB-relax only shifts each row by a constant, which fused kernels already do; masked keys get
    probability exactly 0 here and exp(-10000 - max) ~ 0 in the reference.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p if training else 0.0)


class DalleSelfAttention(nn.Module):
    """Multi-head self-attention with the reference's fused qkv projection and output clamp."""

    def __init__(self, hidden_size: int, num_heads: int, attention_dropout: float, output_dropout: float,
                 pb_relax: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.pb_relax = pb_relax
        self.attention_dropout = attention_dropout
        self.query_key_value = nn.Linear(hidden_size, 3 * hidden_size)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.output_dropout = nn.Dropout(output_dropout)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, S, H] -> q, k, v each [B, nh, S, hd]."""
        q, k, v = self.query_key_value(x).chunk(3, dim=-1)  # 3 x [B, S, H]
        return split_heads(q, self.num_heads), split_heads(k, self.num_heads), split_heads(v, self.num_heads)

    def project_out(self, context: torch.Tensor) -> torch.Tensor:
        """[B, nh, S, hd] -> dense -> clamp to the fp16 range -> dropout -> [B, S, H]."""
        out = self.dense(merge_heads(context)).clamp(-FP16_MAX, FP16_MAX)
        return self.output_dropout(out)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, impl: str) -> torch.Tensor:
        """Dispatch to the fused or the reference-exact kernel. Returns [B, nh, S, hd]."""
        if impl == "math":
            return attention_math(q, k, v, mask, self.pb_relax, self.attention_dropout, self.training)
        return attention_sdpa(q, k, v, mask, self.attention_dropout, self.training)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, impl: str = "sdpa") -> torch.Tensor:
        """Full-sequence attention. x [B, S, H], mask bool [S, S] -> [B, S, H]."""
        q, k, v = self.qkv(x)
        return self.project_out(self.attend(q, k, v, mask, impl))

    def attend_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    impl: str) -> torch.Tensor:
        """Attention of new queries over cached keys (incremental decoding, holst/dalle/cache.py).

        Args:
            q: [B, nh, s, hd]; k, v: [B, nh, K, hd] (only the keys this layer may see, or all of them
                with ``mask``); mask: bool broadcastable to [B, nh, s, K], or None = all visible.
        Returns:
            [B, nh, s, hd].
        """
        if impl == "math":
            if mask is None:
                mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)
            return attention_math(q, k, v, mask, self.pb_relax)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
