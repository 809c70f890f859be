"""Shared-prefix incremental decoder: text keys/values once per prompt, compact image caches per layer.

Axis legend: R rows (images, x2 under guidance), U text entries (R = U * G, rows r*G .. r*G + G - 1
read entry r), G rows per text entry, nh heads, hd head dim, H hidden, T text_seq_length (mask text
positions), D image_tokens_per_dim, N = D*D mask pixels, K image keys read by one layer, W conv window.

Positions follow the masks (masks.py): layer positions 0..T-1 are text and every image query sees all
of them, so their keys/values are computed once per distinct caption (:meth:`Decoder.prefill_text`)
and shared by all rows that carry that caption (and once for the empty caption under guidance).
Layer position T + i is mask pixel i: image token i in v3; in v2 pixel 0 is the last text token
(the extra BOS shifts everything by one, reference.md §1.3) and image token j sits at pixel j + 1.

Per row and layer only the keys the mask can show are kept (reference.md §1.5):
  row:  a ring of the last D + 1 pixels (slot i % (D + 1)); all of it is visible once i >= D;
  col:  [column, row] layout, so pixel i's visible keys (rows 0..r of column c) are one strided
        view ``k[:, :, c, :r + 1]`` (no gather, no copy);
  conv: natural order, read through the exact list of pixels the conv mask shows (<= 61 for
        the reference's 11x11 window in v3, wrapped around the edges in v2).
Attention of one new query: scores against the shared text keys (one grouped matmul over the G
rows of each entry) and against the row's own image keys, one softmax over both, two products.

Two step modes with the same buffers:
  dynamic: the pixel is a Python int and each layer reads exactly its visible keys (no mask);
  static: the pixel is a 0-dim device tensor, every read has a fixed shape and the hidden slots get
      a -inf bias looked up on the device (torch.compile, CUDA graphs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from holst.dalle.masks import build_mask, layer_mask_kind


class _TextStore:
    """Duck-typed stand-in for a LayerKV during the text prefill: keeps k, v [U, nh, T, hd]."""

    def store_prefix(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v


class DecodeTables:
    """Host and device index tables of one (T, D, hf_version) geometry, shared by every layer.

    Attributes:
        conv_lists: per pixel i, the pixels the conv mask shows to query i (ascending, incl. i).
        conv_idx: [N, W] long, conv_lists padded with 0; conv_bias [N, W]: 0 visible, -inf padding.
        row_bias: [N, D + 1] ring slots holding pixels the query may see (0) or not yet written (-inf).
        col_bias: [N, D] rows 0..r of the column (0) and the rows below (-inf).
    """

    def __init__(self, text_seq_length: int, image_tokens_per_dim: int, hf_version: str, device: torch.device,
                 dtype: torch.dtype) -> None:
        T, D = text_seq_length, image_tokens_per_dim
        N = D * D
        conv = build_mask("conv", T, D, hf_version=hf_version)[T:, T:]  # [N, N] pixel query x pixel key
        self.conv_lists = [torch.nonzero(conv[i])[:, 0] for i in range(N)]
        W = max(len(x) for x in self.conv_lists)
        idx = torch.zeros(N, W, dtype=torch.long)
        bias = torch.full((N, W), float("-inf"))
        for i, x in enumerate(self.conv_lists):
            idx[i, : len(x)] = x
            bias[i, : len(x)] = 0.0
        pix = torch.arange(N)
        ring = torch.arange(D + 1)
        row_bias = torch.where(ring[None, :] <= pix[:, None], 0.0, float("-inf"))  # [N, D + 1]
        col_bias = torch.where(torch.arange(D)[None, :] <= (pix // D)[:, None], 0.0, float("-inf"))  # [N, D]
        self.conv_lists = [x.to(device) for x in self.conv_lists]
        self.conv_idx = idx.to(device)
        self.conv_bias, self.row_bias, self.col_bias = (t.to(device, dtype) for t in (bias, row_bias, col_bias))


class Decoder:
    """Keys/values of one batch: shared text entries plus compact per-row image caches.

    Args:
        model: a DalleModel (its layers are called, not copied).
        rows: R.
        group: G, rows per text entry (R % G == 0).
        device, dtype: where the buffers live (the model's).
    """

    def __init__(self, model, rows: int, group: int, device: torch.device, dtype: torch.dtype) -> None:
        cfg = model.config
        if rows % group:
            raise ValueError(f"rows={rows} is not a multiple of group={group}")
        self.model = model
        self.T, self.D, self.N = cfg.text_seq_length, cfg.image_tokens_per_dim, cfg.image_seq_length
        self.rows, self.group, self.entries = rows, group, rows // group
        self.nh, self.hd = cfg.num_attention_heads, cfg.head_dim
        self.scale = 1.0 / math.sqrt(self.hd)
        self.kinds = [layer_mask_kind(i, cfg.num_layers) for i in range(cfg.num_layers)]
        self.tables = DecodeTables(self.T, self.D, cfg.hf_version, device, dtype)
        R, nh, hd, D, N = rows, self.nh, self.hd, self.D, self.N
        shapes = {"row": (R, nh, D + 1, hd), "col": (R, nh, D, D, hd), "conv": (R, nh, N, hd)}
        self.k = [torch.zeros(shapes[kind], device=device, dtype=dtype) for kind in self.kinds]
        self.v = [torch.zeros_like(k) for k in self.k]
        text_shape = (self.entries, nh, self.T, hd)
        self.kt = [torch.zeros(text_shape, device=device, dtype=dtype) for _ in self.kinds]
        self.vt = [torch.zeros_like(k) for k in self.kt]

    def nbytes(self) -> int:
        """Bytes held by all key/value buffers."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.kt + self.vt)

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def prefill_text(self, text_ids: torch.Tensor, entry_of: Sequence[int] | torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run distinct captions through the stack once and store their keys/values.

        Args:
            text_ids: (u, T) long, distinct captions as the tokenizer makes them.
            entry_of: U indices into 0..u-1: the caption of each text entry.
        Returns:
            (u, T, H) final-LayerNorm hidden states of the text positions, and (u, P - T, H) input
            embeddings of the text positions that the masks treat as pixels (v2: the last text
            token at pixel 0; v3: none).
        """
        model = self.model
        x = model.embed_text(model.prepare_text(text_ids))  # [u, P, H]
        causal = model.layer_masks(x.device)["row"][: self.T, : self.T]  # text block: causal in every mask
        x_text, x_pixels = x[:, : self.T], x[:, self.T :]
        store = _TextStore()
        entry = torch.as_tensor(entry_of, device=x.device, dtype=torch.long)
        for i, layer in enumerate(model.transformer.layers):
            x_text = layer.forward_prefill(x_text, causal, store, model.attn_impl)
            self.kt[i].copy_(store.k.index_select(0, entry))
            self.vt[i].copy_(store.v.index_select(0, entry))
        return model.transformer.final_layernorm(x_text), x_pixels

    # ------------------------------------------------------------------ one pixel
    def step(self, x: torch.Tensor, pixel: int | torch.Tensor) -> torch.Tensor:
        """Feed mask pixel ``pixel`` (int: dynamic reads; 0-dim long tensor: static reads).

        Args:
            x: [R, 1, H] input embeddings of the pixel's token.
            pixel: the image position (int: dynamic reads; 0-dim long tensor: static reads).
        Returns:
            [R, 1, H] final-LayerNorm hidden state (predicts the next image token).
        """
        static = isinstance(pixel, torch.Tensor)
        for i, layer in enumerate(self.model.transformer.layers):
            attn = layer.attention
            qkv = attn.query_key_value(layer.input_layernorm(x))[:, 0]  # [R, 3H]
            H = qkv.shape[-1] // 3
            q, k, v = qkv[:, :H] * self.scale, qkv[:, H : 2 * H], qkv[:, 2 * H :]  # [R, H] each
            k = k.view(self.rows, self.nh, self.hd)
            v = v.view(self.rows, self.nh, self.hd)
            if static:
                keys, values, bias = self._write_read_static(i, k, v, pixel)
            else:
                keys, values, bias = self._write_read_dynamic(i, k, v, pixel)
            ctx = self._attend(i, q, keys, values, bias)  # [R, nh, 1, hd]
            h = layer.attn_residual(x, attn.project_out(ctx))
            x = layer.mlp_residual(h)
        return self.model.transformer.final_layernorm(x)

    def _write_read_dynamic(self, i: int, k: torch.Tensor, v: torch.Tensor, p: int
                            ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Write pixel p's k, v [R, nh, hd] and return exactly the visible image keys [R, nh, K, hd]."""
        kind, kb, vb, D = self.kinds[i], self.k[i], self.v[i], self.D
        if kind == "row":
            slot = p % (D + 1)
            kb[:, :, slot], vb[:, :, slot] = k, v
            n = min(p + 1, D + 1)
            return kb[:, :, :n], vb[:, :, :n], None
        if kind == "col":
            r, c = divmod(p, D)
            kb[:, :, c, r], vb[:, :, c, r] = k, v
            return kb[:, :, c, : r + 1], vb[:, :, c, : r + 1], None  # strided views, no copy
        kb[:, :, p], vb[:, :, p] = k, v
        idx = self.tables.conv_lists[p]
        return kb.index_select(2, idx), vb.index_select(2, idx), None

    def _write_read_static(self, i: int, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As the dynamic read with fixed shapes; returns keys, values and a [1, K] bias (0 / -inf)."""
        kind, kb, vb, D, tab = self.kinds[i], self.k[i], self.v[i], self.D, self.tables
        p1 = p.view(1)
        k, v = k[:, :, None], v[:, :, None]  # [R, nh, 1, hd]
        if kind == "row":
            slot = p1 % (D + 1)
            kb.index_copy_(2, slot, k)
            vb.index_copy_(2, slot, v)
            return kb, vb, tab.row_bias.index_select(0, p1)
        if kind == "col":
            c, r = p1 % D, p1 // D
            kf, vf = kb.view(self.rows, self.nh, D * D, self.hd), vb.view(self.rows, self.nh, D * D, self.hd)
            kf.index_copy_(2, c * D + r, k)
            vf.index_copy_(2, c * D + r, v)
            kc = kb.index_select(2, c)[:, :, 0]  # [R, nh, D, hd] the column, all rows
            vc = vb.index_select(2, c)[:, :, 0]
            return kc, vc, tab.col_bias.index_select(0, p1)
        kb.index_copy_(2, p1, k)
        vb.index_copy_(2, p1, v)
        idx = tab.conv_idx.index_select(0, p1)[0]  # [W]
        return kb.index_select(2, idx), vb.index_select(2, idx), tab.conv_bias.index_select(0, p1)

    def _attend(self, i: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        """softmax over [shared text keys, own image keys] of one query per row.

        Args:
            i: the layer index (selects its shared text keys and values).
            q: [R, H] scaled queries.
            keys: [R, nh, K, hd] the row's visible image keys.
            values: [R, nh, K, hd] the matching values.
            bias: [1, K] additive score bias (-inf for hidden slots), or None.
        Returns:
            [R, nh, 1, hd].
        """
        R, U, G, nh, hd = self.rows, self.entries, self.group, self.nh, self.hd
        qg = q.view(U, G, nh, hd).transpose(1, 2)  # [U, nh, G, hd]
        s_text = qg @ self.kt[i].transpose(-1, -2)  # [U, nh, G, T]
        s_text = s_text.transpose(1, 2).reshape(R, nh, 1, self.T)  # [R, nh, 1, T]
        s_img = q.view(R, nh, 1, hd) @ keys.transpose(-1, -2)  # [R, nh, 1, K]
        if bias is not None:
            s_img = s_img + bias
        scores = torch.cat([s_text, s_img], dim=-1)  # [R, nh, 1, T + K]
        if scores.dtype != torch.float32:  # 16-bit models: normalise in fp32 as fused kernels do
            probs = scores.float().softmax(dim=-1).to(scores.dtype)
        else:
            probs = scores.softmax(dim=-1)
        p_text, p_img = probs[..., : self.T], probs[..., self.T :]
        out = p_img @ values  # [R, nh, 1, hd]
        pg = p_text.reshape(U, G, nh, self.T).transpose(1, 2)  # [U, nh, G, T]
        out_text = (pg @ self.vt[i]).transpose(1, 2).reshape(R, nh, 1, hd)  # [R, nh, 1, hd]
        return out + out_text


def text_group_size(text_ids: torch.Tensor) -> int:
    """G: the largest run length that splits ``text_ids`` (b, T) into equal blocks of identical rows.

    It is the gcd of the lengths of consecutive runs; 1 when neighbouring captions all differ.
    """
    rows = text_ids.tolist()
    runs, n = [], 1
    for a, b in zip(rows, rows[1:]):
        if a == b:
            n += 1
        else:
            runs.append(n)
            n = 1
    runs.append(n)
    g = 0
    for r in runs:
        g = math.gcd(g, r)
    return max(g, 1)


__all__ = ["DecodeTables", "Decoder", "text_group_size"]
