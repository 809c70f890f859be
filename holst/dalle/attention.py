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

from holst.dalle.dropout import Dropout, dropout
from holst.utils.attention import key_scores, masked_softmax, needs_written_scores, written_attention

FP16_MAX = 65504.0  # the reference clamps attention outputs to the fp16 range (commit 3c6a6be)
PB_RELAX_ALPHA = 32.0
MASKED_SCORE = -10000.0  # the reference's masking value (not -inf)

ATTN_IMPLS = ("sdpa", "math", "sparse")


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
        q: [B, nh, S, hd] queries.
        k: [B, nh, K, hd] keys.
        v: [B, nh, K, hd] values.
        mask: bool [S, K] or [B, 1, S, K], True = visible.
        pb_relax: CogView PB-relax (alpha 32, max over the whole score matrix per batch and head).
        dropout_p: attention dropout probability.
        training: apply the dropout (the module's training mode).
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
    probability exactly 0 here and exp(-10000 - max) ~ 0 in the reference. On a CPU the scores are
    written out when a backward pass follows (torch's fused CPU backward is 3-5x slower in bf16, see
    :mod:`holst.utils.attention`) and for attention dropout in training (torch's CPU kernel draws one
    bernoulli number a probability, :mod:`holst.dalle.dropout` a quarter of a 64-bit draw).
    """
    cpu_dropout = training and dropout_p > 0 and q.device.type == "cpu"
    if cpu_dropout or needs_written_scores(q, k, v):
        return written_attention(q, k, v, mask, lambda probs: dropout(probs, dropout_p, training))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p if training else 0.0)


# ---------------------------------------------------------------------------------- block-sparse
# The row, column and conv masks only let an image query see the text and a band of image rows
# (or columns) just before its own. ``attention_sparse`` computes exactly those scores: text
# queries against text keys, image queries against the text keys plus a window of w + 1 grid
# lines (rows, or columns for the column mask) ending at their own, i.e. T + (w + 1) D keys per
# query instead of up to T + N. The band and its small mask are read off the dense mask itself,
# so the result is the dense masked softmax (masked keys get probability 0), not an approximation.


class SparseLayout:
    """The band a dense [S, S] layer mask reduces to (see :func:`sparse_layout`).

    Attributes:
        T: text positions (the grid starts at T); D: grid side; transpose: True if the band runs
        over columns (the column mask); window: w, the number of earlier grid lines seen;
        text_mask: bool [T, T]; band_mask: bool [D, D, T + (w + 1) D] for (line, position in line, key).
    """

    def __init__(self, T: int, D: int, transpose: bool, window: int, text_mask: torch.Tensor,
                 band_mask: torch.Tensor) -> None:
        self.T, self.D, self.transpose, self.window = T, D, transpose, window
        self.text_mask, self.band_mask = text_mask, band_mask


def _band_offsets(mask: torch.Tensor, T: int, D: int, transpose: bool) -> tuple[int, int]:
    """(min, max) of query line - key line over the visible image-image pairs of ``mask``."""
    qi, ki = mask[T:, T:].nonzero(as_tuple=True)
    line = (lambda p: p % D) if transpose else (lambda p: p // D)
    off = line(qi) - line(ki)
    return int(off.min()), int(off.max())


def sparse_layout(mask: torch.Tensor, T: int, D: int, max_fraction: float = 0.75) -> SparseLayout | None:
    """The band layout of a full-sequence layer mask, or None where a band would not save work.

    Args:
        mask: bool [S, S] with S = T + D * D, True = visible; text queries must see no image key.
        T: text positions.
        D: grid side.
        max_fraction: give up (None) when a band query would see more than this fraction of S keys.
    Returns:
        A :class:`SparseLayout` whose band covers every visible key of ``mask``, or None.
    """
    S = T + D * D
    if mask.shape != (S, S) or mask[:T, T:].any():
        return None
    best = None
    for transpose in (False, True):
        lo, hi = _band_offsets(mask, T, D, transpose)
        if lo >= 0 and (best is None or hi < best[1]):
            best = (transpose, hi)
    if best is None or T + (best[1] + 1) * D > max_fraction * S:
        return None
    transpose, w = best
    # keys of a band query (line r, position c): text 0..T-1, then lines r-w..r, D positions each
    r = torch.arange(D, device=mask.device)
    line = r[:, None] - w + torch.arange(w + 1, device=mask.device)[None, :]  # [D lines, w + 1]
    valid = (line >= 0)[:, :, None].expand(D, w + 1, D)  # [D, w + 1, D]
    grid = line.clamp(min=0)[:, :, None] * D + r[None, None, :]  # [D, w + 1, D] key index in the oriented grid
    if transpose:  # oriented (line = column, position = row) -> row-major grid index
        grid = (grid % D) * D + grid // D
        q_grid = r[None, :] * D + r[:, None]  # [D lines, D positions]
    else:
        q_grid = r[:, None] * D + r[None, :]
    q_pos = T + q_grid  # [D, D]
    k_pos = T + grid.reshape(D, -1)  # [D, (w + 1) D]
    img = mask[q_pos[:, :, None], k_pos[:, None, :]] & valid.reshape(D, 1, -1)  # [D, D, (w + 1) D]
    text = mask[q_pos][:, :, :T]  # [D, D, T]
    band_mask = torch.cat([text, img], dim=-1)  # [D, D, T + (w + 1) D]
    if int(band_mask.sum()) + int(mask[:T, :T].sum()) != int(mask.sum()):
        return None  # the band misses a visible key: not a band mask
    return SparseLayout(T, D, transpose, w, mask[:T, :T].contiguous(), band_mask)


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dropout_p: float, training: bool) -> torch.Tensor:
    """softmax over visible keys (fp32 accumulation), then attention dropout; same dtype as ``scores``."""
    return dropout(masked_softmax(scores, mask), dropout_p, training)


def attention_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SparseLayout,
                     dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """Masked attention over the band of :func:`sparse_layout` only (the dense softmax's numbers).

    Args:
        q: [B, nh, S, hd] queries, S = T + D * D.
        k: [B, nh, S, hd] keys.
        v: [B, nh, S, hd] values.
        layout: from :func:`sparse_layout`.
        dropout_p: attention dropout probability (applied to the band's probabilities).
        training: apply the dropout (the module's training mode).
    Returns:
        [B, nh, S, hd].
    """
    T, D, w = layout.T, layout.D, layout.window
    B, nh, S, hd = q.shape
    scale = 1.0 / math.sqrt(hd)
    qt, kt, vt = q[:, :, :T], k[:, :, :T], v[:, :, :T]  # [B, nh, T, hd]
    # text queries: causal over the text
    text_out = _masked_softmax(key_scores(qt, kt) * scale, layout.text_mask, dropout_p, training) @ vt

    N, L = D * D, (w + 1) * D

    def grid(x: torch.Tensor) -> torch.Tensor:  # [B, nh, N, hd] -> [B * nh * D lines, D, hd], contiguous
        x = x.reshape(B, nh, D, D, hd)
        return (x.transpose(2, 3) if layout.transpose else x).reshape(B * nh * D, D, hd)

    def band(x: torch.Tensor) -> torch.Tensor:  # [B * nh * D, D, hd] -> [B * nh * D, (w + 1) D, hd]
        if w == 0:
            return x
        x = F.pad(x.view(B * nh, D, D, hd), (0, 0, 0, 0, w, 0))  # w empty lines in front: [B nh, D + w, D, hd]
        lines = torch.stack([x[:, j : j + D] for j in range(w + 1)], dim=2)  # lines r-w..r: [B nh, D, w + 1, D, hd]
        return lines.reshape(B * nh * D, L, hd)

    qg, kg, vg = grid(q[:, :, T:]), grid(k[:, :, T:]), grid(v[:, :, T:])
    kb, vb = band(kg), band(vg)
    s_text = key_scores(qg.view(B * nh, N, hd), kt.reshape(B * nh, T, hd)) * scale  # [B nh, N, T]
    s_band = key_scores(qg, kb) * scale  # [B nh D, D, (w + 1) D]
    scores = torch.cat([s_text.view(B, nh, D, D, T), s_band.view(B, nh, D, D, L)], dim=-1)
    probs = _masked_softmax(scores, layout.band_mask, dropout_p, training)  # [B, nh, D, D, T + L]
    from_text = probs[..., :T].reshape(B * nh, N, T) @ vt.reshape(B * nh, T, hd)  # [B nh, N, hd]
    from_band = torch.bmm(probs[..., T:].reshape(B * nh * D, D, L), vb)  # [B nh D, D, hd]
    img_out = (from_text.view(B, nh, D, D, hd) + from_band.view(B, nh, D, D, hd))  # [B, nh, D lines, D, hd]
    if layout.transpose:
        img_out = img_out.transpose(2, 3)
    return torch.cat([text_out, img_out.reshape(B, nh, N, hd)], dim=2)


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
        self.output_dropout = Dropout(output_dropout)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, S, H] -> q, k, v each [B, nh, S, hd]."""
        q, k, v = self.query_key_value(x).chunk(3, dim=-1)  # 3 x [B, S, H]
        return split_heads(q, self.num_heads), split_heads(k, self.num_heads), split_heads(v, self.num_heads)

    def project_out(self, context: torch.Tensor) -> torch.Tensor:
        """[B, nh, S, hd] -> dense -> clamp to the fp16 range -> dropout -> [B, S, H]."""
        out = self.dense(merge_heads(context)).clamp(-FP16_MAX, FP16_MAX)
        return self.output_dropout(out)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | SparseLayout,
               impl: str) -> torch.Tensor:
        """Attention of (B, nh, S, hd) queries, keys and values with the kernel ``mask`` and ``impl`` call for.

        Dispatches to the block-sparse (``mask`` is a :class:`SparseLayout`), the reference-exact
        (``impl='math'``) or the fused kernel (``'sdpa'``, and ``'sparse'`` where the mask has no
        band layout). Returns [B, nh, S, hd].
        """
        if isinstance(mask, SparseLayout):
            return attention_sparse(q, k, v, mask, self.attention_dropout, self.training)
        if impl == "math":
            return attention_math(q, k, v, mask, self.pb_relax, self.attention_dropout, self.training)
        return attention_sdpa(q, k, v, mask, self.attention_dropout, self.training)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | SparseLayout, impl: str = "sdpa") -> torch.Tensor:
        """Full-sequence attention. x [B, S, H], mask bool [S, S] (or its SparseLayout) -> [B, S, H]."""
        q, k, v = self.qkv(x)
        return self.project_out(self.attend(q, k, v, mask, impl))

    def attend_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    impl: str) -> torch.Tensor:
        """Attention of new queries over cached keys (incremental decoding, holst/dalle/cache.py).

        Args:
            q: [B, nh, s, hd] queries of the new tokens.
            k: [B, nh, K, hd] cached keys (only the keys this layer may see, or all of them with ``mask``).
            v: [B, nh, K, hd] cached values.
            mask: bool broadcastable to [B, nh, s, K], or None = all visible.
            impl: 'math' (the reference's explicit softmax) or a fused kernel ('sdpa', 'sparse').
        Returns:
            [B, nh, s, hd].
        """
        if impl == "math":
            if mask is None:
                mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)
            return attention_math(q, k, v, mask, self.pb_relax)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
