"""Int8 weight-only quantisation of the transformer's linear layers (inference, low memory).

Axis legend: O output features, I input features, M rows of the input (batch x sequence).

Each ``nn.Linear`` weight [O, I] becomes int8 [O, I] plus one scale per output row
(symmetric absmax / 127); activations stay in the model's float dtype. Memory for the weights drops
4x from fp32 (2x from bf16/fp16). The weight is dequantised to the activation dtype inside each
call. Decoding reads every weight once per token, so reading 4x fewer bytes can pay for the
conversion: on the 2-core AMD dev CPU (1 thread, emoji-sized matrices) the 32 linear layers of a
decode step took 1.8 ms int8 vs 3.7 ms fp32 at 1 row, 4.7 vs 6.3 ms at 8 rows, 13.7 vs 12.6 ms
at 32 rows. ``aten._weight_int8pack_mm`` measured 20x slower there, so it is not used.
Quantised models are for generation only: they are not trainable and are not saved as such
(save the float model; quantise after loading).
"""

from __future__ import annotations

import torch
from torch import nn


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: weight [O, I] -> (int8 [O, I], fp32 scale [O]); w ~ q * scale."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [O]
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` with int8 weights and per-row scales (same call signature)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q, scale = quantize_weight(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., I] -> [..., O] in x's dtype."""
        return self._matmul(x, self.weight_int8, self.scale, self.bias)

    def forward_rows(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Only output rows start..O-1 (the image part of the logits head). [..., I] -> [..., O - start]."""
        bias = self.bias[start:] if self.bias is not None else None
        return self._matmul(x, self.weight_int8[start:], self.scale[start:], bias)

    @staticmethod
    def _matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [M, I]
        # Dequantise per call; the scale applies per output column of the product (cheaper than
        # scaling the weight).
        y = (x2 @ q.to(x.dtype).t()) * scale.to(x.dtype)  # [M, O]
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        """Shown by ``repr(module)``: the layer's shape and its int8 weights."""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_linear_layers(model: nn.Module, include_head: bool = True) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of a DalleModel's layers (and the logits head) by :class:`Int8Linear`.

    Embeddings and LayerNorms stay in float.

    Args:
        model: a DalleModel (or any module); switched to eval mode.
        include_head: also quantise ``to_logits`` (the largest single matrix of small models).
    Returns:
        the same model object.
    """
    targets = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear):
                full = f"{name}.{child_name}" if name else child_name
                if include_head or not full.startswith("to_logits"):
                    targets.append((module, child_name, child))
    for parent, child_name, child in targets:
        setattr(parent, child_name, Int8Linear(child))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (a model's weight memory)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


__all__ = ["Int8Linear", "quantize_linear_layers", "quantize_weight", "weight_bytes"]
