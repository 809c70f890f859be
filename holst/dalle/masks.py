"""Sparse attention masks of ruDALL-E: row, column and convolution (reference.md §1.5).

Axis legend: T = text_seq_length, D = image_tokens_per_dim, N = D*D, S = T + N.
All masks are bool [S, S], True = the query (row) may attend to the key (column).
Text keys are causal in every mask; the rules below restrict image keys for image queries.
Positions are absolute: for hf_version v2 the model applies these same masks to a sequence that
carries one extra BOS in front, which reproduces the reference's off-by-one exactly.
"""

from __future__ import annotations

import torch

MASK_KINDS = ("row", "col", "conv")


def layer_mask_kind(layer_index: int, num_layers: int) -> str:
    """The reference schedule: col where (i-1) % 4 == 0, conv on the last layer, else row."""
    if (layer_index - 1) % 4 == 0:
        return "col"
    if layer_index != num_layers - 1:
        return "row"
    return "conv"


def build_mask(kind: str, text_seq_length: int, image_tokens_per_dim: int, *, hf_version: str = "v3",
               kernel: int = 11, device: torch.device | str | None = None) -> torch.Tensor:
    """One layer mask.

    Args:
        kind: 'row' (the 33 most recent image tokens incl. self, i.e. d <= D), 'col' (d % D == 0),
            'conv' (causal kernel x kernel window; v3 clamps at the borders, v2 wraps around).
        text_seq_length: T.
        image_tokens_per_dim: D.
        hf_version: 'v2' or 'v3' (only conv differs).
        kernel: conv window size (11 in the reference).
        device: where the mask is built.
    Returns:
        bool [S, S].
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"kind={kind!r} is not allowed; choose one of {list(MASK_KINDS)}")
    T, D = text_seq_length, image_tokens_per_dim
    S = T + D * D
    pos = torch.arange(S, device=device)
    q, k = pos[:, None], pos[None, :]  # [S, 1], [1, S]
    causal = k <= q  # [S, S]
    image_pair = (q >= T) & (k >= T)  # image query and image key
    d = q - k
    if kind == "row":
        visible = d <= D
    elif kind == "col":
        visible = d % D == 0
    else:
        shift = kernel // 2
        pq, pk = (q - T).clamp(min=0), (k - T).clamp(min=0)
        dr = (pq // D - pk // D).abs()
        dc = (pq % D - pk % D).abs()
        if hf_version == "v2":  # toroidal distances: the window wraps around the grid edges
            dr = torch.minimum(dr % D, D - dr % D)
            dc = torch.minimum(dc % D, D - dc % D)
        visible = ((dr <= shift) & (dc <= shift)) | (d == 0)
    return causal & (~image_pair | visible)


def build_layer_masks(text_seq_length: int, image_tokens_per_dim: int, hf_version: str = "v3",
                      device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """All three masks: {'row': [S,S], 'col': [S,S], 'conv': [S,S]} bool."""
    return {kind: build_mask(kind, text_seq_length, image_tokens_per_dim, hf_version=hf_version, device=device)
            for kind in MASK_KINDS}
