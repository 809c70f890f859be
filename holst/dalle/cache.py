"""Preallocated key/value cache for incremental ruDALL-E decoding (DESIGN.md "Speed").

Axis legend: B batch (cond + uncond rows under guidance), nh heads, hd head dim, T text_seq_length,
D image_tokens_per_dim, N = D*D, L layer sequence positions (0..T+N-1), K key slots of one layer.

Positions are *layer* positions, the ones the masks are indexed with (masks.py): position p < T is a
"mask text" position, p >= T is mask pixel i = p - T (row i // D, column i % D). For hf_version v2
the layer sequence carries one extra BOS, so the last text token sits at p = T and the masks treat
it as pixel 0, exactly as the reference does (reference.md §1.3); the cache needs no special case.

Each layer keeps only the keys its mask can ever show to a later query (reference.md §1.5):
  row:  T text slots + a ring of D + 1 image slots (an image query sees at most D + 1 image keys);
        the visible keys are always a contiguous prefix of the buffer, so attention needs no mask.
  col:  T text slots + N image slots stored column-major, so column c is slots T + c*D .. T + c*D + D - 1;
        a query gathers the text slots and the rows 0..r of its column (at most T + D keys).
  conv: T + N slots in natural order, read with the layer's mask row (one layer of the stack).

Buffers are allocated once per generation call; writes go in place (no torch.cat, no dense
[B, 1, L, L] mask per step). Two modes:
  dynamic (default): the step position is a Python int and each layer reads exactly its visible
      keys (shapes change per step; fastest in eager mode, on CPU in particular);
  static: the position is a 0-dim device tensor and every layer reads a fixed-size key set with a
      bool mask looked up on the device, so a decode step has fixed shapes (CUDA graphs).
"""

from __future__ import annotations

import torch

from holst.dalle.config import DalleConfig
from holst.dalle.masks import build_mask, layer_mask_kind


class LayerKV:
    """Key/value buffers of one layer plus the index tables its mask kind needs.

    Args:
        kind: 'row', 'col' or 'conv'.
        config: the model config (T, D, hf_version).
        batch_size: B.
        conv_mask: bool [L, L] conv layer mask (only for kind 'conv').
    """

    def __init__(self, kind: str, config: DalleConfig, batch_size: int, device: torch.device, dtype: torch.dtype,
                 conv_mask: torch.Tensor | None = None) -> None:
        T, D = config.text_seq_length, config.image_tokens_per_dim
        N = D * D
        L = T + N
        self.kind, self.T, self.D = kind, T, D
        nh = config.num_attention_heads
        pos = torch.arange(L, device=device)
        pix = (pos - T).clamp(min=0)
        if kind == "row":
            R = D + 1
            slots = T + R
            self.slot_of = torch.where(pos < T, pos, T + pix % R)  # [L] buffer slot of each position
            # visible slots for a query at p >= T: text, then min(i + 1, R) ring slots
            n_vis = T + torch.minimum(pix + 1, torch.full_like(pix, R))  # [L]
            self.visible = torch.arange(slots, device=device)[None, :] < n_vis[:, None]  # [L, K]
        elif kind == "col":
            slots = L
            self.slot_of = torch.where(pos < T, pos, T + (pix % D) * D + pix // D)  # column-major image
            r = torch.arange(D, device=device)
            col_idx = T + (pix % D)[:, None] * D + r[None, :]  # [L, D] the query's column, all rows
            text_idx = torch.arange(T, device=device).expand(L, T)  # [L, T]
            self.gather_idx = torch.cat([text_idx, col_idx], dim=1)  # [L, T + D]
            col_vis = r[None, :] <= (pix // D)[:, None]  # [L, D] rows 0..r_q of the column
            self.visible = torch.cat([torch.ones(L, T, dtype=torch.bool, device=device), col_vis], dim=1)
        elif kind == "conv":
            if conv_mask is None:
                raise ValueError("a conv layer cache needs the layer's conv mask")
            slots = L
            self.slot_of = pos
            self.visible = conv_mask  # [L, L]
        else:
            raise ValueError(f"kind={kind!r} is not allowed; choose one of ['row', 'col', 'conv']")
        self.slot_list = self.slot_of.tolist()  # host copy for the dynamic mode (built once, no per-step sync)
        self.k = torch.zeros(batch_size, nh, slots, config.head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    # ------------------------------------------------------------------ writes
    def store_prefix(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write keys/values of positions 0..s-1 (a prefill). k, v: [B, nh, s, hd].

        A row layer keeps only the last D + 1 image positions of the prefix (older ones can never
        be seen again), which also keeps the ring writes free of duplicate slots.
        """
        s = k.shape[2]
        keep = list(range(s))
        if self.kind == "row" and s > self.T + self.D + 1:
            keep = list(range(self.T)) + list(range(max(self.T, s - self.D - 1), s))
        src = torch.tensor(keep, device=k.device)
        slots = self.slot_of[src]
        self.k.index_copy_(2, slots, k.index_select(2, src))
        self.v.index_copy_(2, slots, v.index_select(2, src))

    # ------------------------------------------------------------------ one-token steps
    def step_dynamic(self, k: torch.Tensor, v: torch.Tensor, p: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Write the new token's k, v ([B, nh, 1, hd]) at position p (an int >= T); return what it sees.

        Returns the visible keys, values ([B, nh, K_p, hd]) and a mask ([1, K_p] bool or None when all
        are visible).
        """
        slot = self.slot_list[p]
        self.k[:, :, slot] = k[:, :, 0]
        self.v[:, :, slot] = v[:, :, 0]
        i = p - self.T
        if self.kind == "row":
            n = self.T + min(i + 1, self.D + 1)
            return self.k[:, :, :n], self.v[:, :, :n], None
        if self.kind == "col":
            idx = self.gather_idx[p, : self.T + i // self.D + 1]  # text + rows 0..r of the column
            return self.k.index_select(2, idx), self.v.index_select(2, idx), None
        return self.k[:, :, : p + 1], self.v[:, :, : p + 1], self.visible[p : p + 1, : p + 1]

    def step_static(self, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As :meth:`step_dynamic` with p a 0-dim long device tensor; shapes do not depend on p."""
        p1 = p.view(1)
        slot = self.slot_of.index_select(0, p1)  # [1]
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)
        mask = self.visible.index_select(0, p1)  # [1, K]
        if self.kind == "col":
            idx = self.gather_idx.index_select(0, p1)[0]  # [T + D]
            return self.k.index_select(2, idx), self.v.index_select(2, idx), mask
        return self.k, self.v, mask

    def nbytes(self) -> int:
        """Bytes held by the key and value buffers."""
        return self.k.numel() * self.k.element_size() * 2


class KVCache:
    """The whole stack's cache for one generation call (one batch).

    Args:
        config: the model config.
        batch_size: rows in the batch (2x images under classifier-free guidance).
        device, dtype: where and in which precision keys/values live (the model's).
        static: fixed-shape steps (position as a device tensor) for CUDA graphs.
    """

    def __init__(self, config: DalleConfig, batch_size: int, device: torch.device | str, dtype: torch.dtype,
                 static: bool = False) -> None:
        device = torch.device(device)
        self.config = config
        self.batch_size = batch_size
        self.static = static
        kinds = [layer_mask_kind(i, config.num_layers) for i in range(config.num_layers)]
        conv = None
        if "conv" in kinds:
            conv = build_mask("conv", config.text_seq_length, config.image_tokens_per_dim,
                              hf_version=config.hf_version, device=device)
        self.layers = [LayerKV(kind, config, batch_size, device, dtype, conv) for kind in kinds]
        self.index_table = torch.arange(config.total_seq_length, device=device)  # image indices as tensors

    def nbytes(self) -> int:
        """Bytes held by all key/value buffers."""
        return sum(layer.nbytes() for layer in self.layers)
