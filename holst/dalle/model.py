"""The ruDALL-E transformer: a decoder-only GPT over text then image tokens (reference.md §1).

Axis legend: B batch, T text_seq_length (128), D image_tokens_per_dim (32), N = D*D image tokens,
n <= N image tokens given, S sequence length seen by the layers (T + n; v2: min(T + 1 + n, T + N)),
H hidden_size, V = vocab_size + image_vocab_size logits.

State-dict names are exactly the reference's (§1.2) minus the three mask buffers, which we rebuild
from the config, so official checkpoints load with no renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from holst.dalle.attention import ATTN_IMPLS, DalleSelfAttention, SparseLayout, sparse_layout
from holst.dalle.cache import KVCache, LayerKV
from holst.dalle.config import DalleConfig
from holst.dalle.dropout import Dropout
from holst.dalle.masks import build_layer_masks, layer_mask_kind
from holst.utils.persist import PretrainedMixin

V2_BOS_ID = 2  # hf_version v2 prepends the BOS id once more (reference.md §1.3 step 2)


def gelu_fn(name: str):
    """The MLP activation: 'gelu_jit'/'gelu_tanh' = tanh approximation (the reference's), 'gelu' = erf."""
    if name == "gelu":
        return F.gelu
    return gelu_tanh


GELU_TANH_BETA = 2.0 * math.sqrt(2.0 / math.pi)  # 0.5 (1 + tanh(z)) = sigmoid(2 z)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))).

    Compiled for a CPU it is written as x sigmoid(2 sqrt(2 / pi) (x + 0.044715 x^3)), the same
    function: inductor's vectorised sigmoid is ~2x cheaper than its tanh (forward and backward).
    """
    if torch.compiler.is_compiling() and x.device.type == "cpu":
        return x * torch.sigmoid(GELU_TANH_BETA * (x + 0.044715 * x * x * x))
    return F.gelu(x, approximate="tanh")


class DalleMLP(nn.Module):
    """dense_h_to_4h -> GELU -> dense_4h_to_h -> dropout."""

    def __init__(self, hidden_size: int, ratio: int, activation: str, dropout: float) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(hidden_size, ratio * hidden_size)
        self.dense_4h_to_h = nn.Linear(ratio * hidden_size, hidden_size)
        self.act = gelu_fn(activation)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, H] -> [B, S, H]."""
        return self.dropout(self.dense_4h_to_h(self.act(self.dense_h_to_4h(x))))


class DalleLayer(nn.Module):
    """Pre-LN block with CogView's sandwich LN: x + LN(Attn(LN(x))), then h + LN(MLP(LN(h)))."""

    def __init__(self, config: DalleConfig) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.layernorm_eps
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.attention = DalleSelfAttention(h, config.num_attention_heads, config.attention_dropout_prob,
                                            config.output_dropout_prob, config.cogview_pb_relax)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.mlp = DalleMLP(h, config.mlp_ratio, config.mlp_activation, config.output_dropout_prob)
        self.sandwich = config.cogview_sandwich_layernorm
        if self.sandwich:
            self.before_first_addition_layernorm = nn.LayerNorm(h, eps=eps)
            self.before_second_addition_layernorm = nn.LayerNorm(h, eps=eps)

    def attn_residual(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """x + (sandwich LN of) the attention output."""
        if self.sandwich:
            attn_out = self.before_first_addition_layernorm(attn_out)
        return x + attn_out

    def mlp_residual(self, h: torch.Tensor) -> torch.Tensor:
        """h + (sandwich LN of) MLP(LN(h))."""
        m = self.mlp(self.post_attention_layernorm(h))
        if self.sandwich:
            m = self.before_second_addition_layernorm(m)
        return h + m

    def forward(self, x: torch.Tensor, mask: torch.Tensor, impl: str = "sdpa") -> torch.Tensor:
        """x [B, S, H], mask bool [S, S] -> [B, S, H]."""
        h = self.attn_residual(x, self.attention(self.input_layernorm(x), mask, impl))
        return self.mlp_residual(h)

    # Incremental decoding (holst/dalle/cache.py) ------------------------------------------------
    def forward_prefill(self, x: torch.Tensor, mask: torch.Tensor, kv: LayerKV, impl: str = "sdpa") -> torch.Tensor:
        """As :meth:`forward` on positions 0..S-1, also storing their keys/values in ``kv``."""
        q, k, v = self.attention.qkv(self.input_layernorm(x))  # each [B, nh, S, hd]
        kv.store_prefix(k, v)
        h = self.attn_residual(x, self.attention.project_out(self.attention.attend(q, k, v, mask, impl)))
        return self.mlp_residual(h)

    def forward_step(self, x: torch.Tensor, kv: LayerKV, pos: int | torch.Tensor, impl: str = "sdpa") -> torch.Tensor:
        """One new token at layer position ``pos`` (int, or 0-dim tensor for a static cache).

        x [B, 1, H] -> [B, 1, H]; attends only over the keys ``kv`` keeps for this layer's mask.
        """
        q, k, v = self.attention.qkv(self.input_layernorm(x))  # each [B, nh, 1, hd]
        if isinstance(pos, int):
            keys, values, mask = kv.step_dynamic(k, v, pos)
        else:
            keys, values, mask = kv.step_static(k, v, pos)
        ctx = self.attention.attend_step(q, keys, values, mask, impl)  # [B, nh, 1, hd]
        h = self.attn_residual(x, self.attention.project_out(ctx))
        return self.mlp_residual(h)


class DalleTransformer(nn.Module):
    """The layer stack and its final LayerNorm (keys ``transformer.layers.{i}.*``, ``transformer.final_layernorm``)."""

    def __init__(self, config: DalleConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DalleLayer(config) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)
        self.mask_kinds = [layer_mask_kind(i, config.num_layers) for i in range(config.num_layers)]


class DalleModel(PretrainedMixin, nn.Module):
    """ruDALL-E transformer.

    ``forward(input_ids)`` takes text ids then image codes as the reference does (B, T + n) and
    returns logits (B, S, V) equal to the reference's ``forward(input_ids, causal_mask)``.
    ``attn_impl``: 'sdpa' (fused, default), 'math' (the reference's explicit kernel with -10000
    masking and PB-relax, for bit-level comparisons and fp16 safety studies) or 'sparse' (full
    training sequences: the block-sparse band kernel of holst/dalle/attention.py for the row and
    column masks, and the conv mask where its window is small; sdpa elsewhere).
    """

    config_class = DalleConfig

    def __init__(self, config: DalleConfig, attn_impl: str = "sdpa") -> None:
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={attn_impl!r} is not allowed; choose one of {list(ATTN_IMPLS)}")
        self.config = config
        self.attn_impl = attn_impl
        self.gradient_checkpointing = False
        h = config.hidden_size
        self.text_embeddings = nn.Embedding(config.vocab_size, h)
        self.image_embeddings = nn.Embedding(config.image_vocab_size, h)
        self.text_pos_embeddings = nn.Embedding(config.text_seq_length + 1, h)
        self.image_row_embeddings = nn.Embedding(config.image_tokens_per_dim, h)
        self.image_col_embeddings = nn.Embedding(config.image_tokens_per_dim, h)
        self.transformer = DalleTransformer(config)
        self.to_logits = nn.Sequential(nn.LayerNorm(h, eps=config.layernorm_eps), nn.Linear(h, config.total_vocab_size))
        self._masks: dict[str, dict] = {}  # device -> masks (and 'sparse:' device -> band layouts)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ initialisation
    def init_weights(self, std: float = 0.02) -> None:
        """GPT-style init for training from scratch.

        N(0, std) weights, output projections scaled by 1/sqrt(2 L), zero biases, unit LayerNorms.
        (The reference leaves PyTorch defaults, e.g. N(0, 1) embeddings, which train poorly from
        scratch; pretrained weights overwrite all.)
        """
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith("attention.dense") or name.endswith("dense_4h_to_h")
                nn.init.normal_(module.weight, std=out_std if is_out else std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ masks
    def layer_masks(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The three bool [S_max, S_max] masks on ``device`` (built once per device, not saved)."""
        key = str(device)
        if key not in self._masks:
            c = self.config
            self._masks[key] = build_layer_masks(c.text_seq_length, c.image_tokens_per_dim, c.hf_version, device=device)
        return self._masks[key]

    def sparse_layouts(self, device: torch.device) -> dict[str, SparseLayout | None]:
        """Per mask kind, its block-sparse band on ``device`` (None: that mask runs dense)."""
        key = f"sparse:{device}"
        if key not in self._masks:
            c = self.config
            self._masks[key] = {kind: sparse_layout(m, c.text_seq_length, c.image_tokens_per_dim)
                                for kind, m in self.layer_masks(device).items()}
        return self._masks[key]

    @torch.compiler.disable
    def attention_masks(self, S: int, device: torch.device) -> dict[str, torch.Tensor | SparseLayout]:
        """What each mask kind's layers attend with for S positions.

        The bool [S, S] mask, or its band layout under ``attn_impl='sparse'`` for full sequences (sdpa
        runs the other masks). Built once and cached, outside ``torch.compile`` graphs (the layouts
        need ``nonzero``).
        """
        masks: dict = {kind: m[:S, :S] for kind, m in self.layer_masks(device).items()}
        if self.attn_impl == "sparse" and S == self.config.total_seq_length:
            layouts = self.sparse_layouts(device)
            masks = {kind: layouts[kind] if layouts[kind] is not None else m for kind, m in masks.items()}
        return masks

    def reset_buffers(self) -> None:
        """Drop cached masks (called after loading onto a new device)."""
        self._masks = {}

    # ------------------------------------------------------------------ embedding
    def replace_text_pads(self, text_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids: a 0 at text position i becomes vocab_size - T + i (position-specific pads)."""
        T = self.config.text_seq_length
        pad_ids = self.config.vocab_size - T + torch.arange(text_ids.shape[1], device=text_ids.device)
        return torch.where(text_ids == 0, pad_ids, text_ids)

    def prepare_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Pad replacement, then (v2) the extra BOS in front. (B, T) -> (B, T or T + 1)."""
        text = self.replace_text_pads(text_ids)
        if self.config.hf_version == "v2":
            bos = torch.full_like(text[:, :1], V2_BOS_ID)
            text = torch.cat([bos, text], dim=1)
        return text

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """(B, t) prepared text ids -> (B, t, H), positions 0..t-1."""
        pos = torch.arange(text.shape[1], device=text.device)
        return self.text_embeddings(text) + self.text_pos_embeddings(pos)

    def embed_image(self, image_codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(B, n) codes at image positions start..start+n-1 -> (B, n, H) with row/col embeddings."""
        D = self.config.image_tokens_per_dim
        j = torch.arange(start, start + image_codes.shape[1], device=image_codes.device)
        return self.image_embeddings(image_codes) + self.image_row_embeddings(j // D) + self.image_col_embeddings(j % D)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T + n) ids -> (B, S, H) embeddings, gradient-shrunk as in CogView."""
        T = self.config.text_seq_length
        if input_ids.dim() != 2 or input_ids.shape[1] < T:
            raise ValueError(f"input_ids must be (B, >= {T}) long, got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.total_seq_length:
            raise ValueError(f"input_ids has {input_ids.shape[1]} positions; at most {self.config.total_seq_length}")
        x = self.embed_text(self.prepare_text(input_ids[:, :T]))
        if input_ids.shape[1] > T:
            x = torch.cat([x, self.embed_image(input_ids[:, T:])], dim=1)  # [B, S, H]
        x = x[:, : self.config.total_seq_length]  # v2: the last image token is never an input
        return shrink_gradient(x)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, return_loss: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits for every position, or (with ``return_loss``) the training loss.

        Args:
            input_ids: (B, T + n) long, text ids (0 = pad) then image codes 0..image_vocab_size-1.
            return_loss: return :meth:`forward_loss` instead (the lean loss; what trainers call
                through DDP/FSDP/compile wrappers).
        Returns:
            (B, S, V) logits: [..., :vocab_size] text, [..., vocab_size:] image codes; or (loss, parts).
        """
        if return_loss:
            return self.forward_loss(input_ids)
        return self.to_logits(self.hidden_states(input_ids))

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T + n) -> (B, S, H) after the final LayerNorm of the transformer."""
        c = self.config
        S = min(input_ids.shape[1] + (1 if c.hf_version == "v2" else 0), c.total_seq_length)
        masks = self.attention_masks(S, input_ids.device)  # before anything is traced (torch.compile)
        x = self.embed(input_ids)
        for layer, kind in zip(self.transformer.layers, self.transformer.mask_kinds):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, masks[kind], self.attn_impl, use_reentrant=False)
            else:
                x = layer(x, masks[kind], self.attn_impl)
        return self.transformer.final_layernorm(x)

    # ------------------------------------------------------------------ loss
    def loss_targets(self, input_ids: torch.Tensor, S: int) -> tuple[slice, torch.Tensor, slice, torch.Tensor]:
        """Which layer positions the loss scores, and against which labels (reference.md §1.6).

        Args:
            input_ids: (B, T + n) with n >= 1.
            S: positions seen by the layers.
        Returns:
            (text positions, (B, t) text labels, image positions, (B, m) image labels); text positions
            are scored over the text vocabulary rows of the head, image positions over the image rows.
        """
        T = self.config.text_seq_length
        text = self.prepare_text(input_ids[:, :T])
        image = input_ids[:, T:]
        if image.shape[1] == 0:
            raise ValueError("compute_loss needs at least one image token after the text")
        if self.config.hf_version == "v2":
            # [BOS, text(T), image...]: position i predicts text[i] (i < T), position T + j predicts image[j].
            m = min(image.shape[1], S - T)
            return slice(0, T), text[:, 1:], slice(T, T + m), image[:, :m]
        if self.config.v3_reference_loss:
            # The reference's v3 slices: the last text position scores image[0] in the text vocabulary.
            labels = torch.cat([text[:, 1:], image], dim=1)
            return slice(0, T), labels[:, :T], slice(T, S - 1), labels[:, T:]
        return slice(0, T - 1), text[:, 1:], slice(T - 1, T - 1 + image.shape[1]), image

    def forward_loss(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``compute_loss`` from the layers' hidden states without the full logits tensor (the lean loss).

        Only the scored positions go through the head, each over its own vocabulary rows, in chunks,
        with a softmax cross-entropy in fp32 whose gradient is formed chunk by chunk
        (:func:`linear_cross_entropy`). Numbers equal those of ``compute_loss(ids, logits=self(ids))``.
        """
        c = self.config
        hidden = self.hidden_states(input_ids)  # [B, S, H]
        head = self.to_logits[1]
        if not _plain_linear(head):  # LoRA hooks, a quantised head: the dense path keeps their semantics
            return self.compute_loss(input_ids, logits=self.to_logits(hidden))
        t_pos, t_labels, i_pos, i_labels = self.loss_targets(input_ids, hidden.shape[1])
        Vt = c.vocab_size

        def mean_ce(pos: slice, labels: torch.Tensor, rows: slice) -> torch.Tensor:
            x = self.to_logits[0](hidden[:, pos]).reshape(-1, hidden.shape[-1])  # [B t, H]
            total = linear_cross_entropy(x, head.weight[rows], head.bias[rows], labels.reshape(-1))
            return total / labels.numel()

        loss_text = mean_ce(t_pos, t_labels, slice(0, Vt))
        loss_image = mean_ce(i_pos, i_labels, slice(Vt, None))
        w = c.loss_img_weight
        return (loss_text + w * loss_image) / (w + 1), {"text": loss_text.detach(), "image": loss_image.detach()}

    def compute_loss(self, input_ids: torch.Tensor, logits: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted loss (text + w * image) / (w + 1), w = loss_img_weight (reference.md §1.6).

        Args:
            input_ids: (B, T + n) with n >= 1.
            logits: optional precomputed ``self(input_ids)``; without it the lean path
                (:meth:`forward_loss`) runs, which never builds the (B, S, V) logits.
        Returns:
            (loss, {'text': text CE, 'image': image CE}); CEs are fp32 means over all positions
            (pads included, as in the reference).
        """
        if logits is None:
            return self.forward_loss(input_ids)
        Vt = self.config.vocab_size
        t_pos, t_labels, i_pos, i_labels = self.loss_targets(input_ids, logits.shape[1])
        text_logits = logits[:, t_pos, :Vt].float()  # only the scored slices go to fp32
        image_logits = logits[:, i_pos, Vt:].float()
        loss_text = F.cross_entropy(text_logits.reshape(-1, text_logits.shape[-1]), t_labels.reshape(-1))
        loss_image = F.cross_entropy(image_logits.reshape(-1, image_logits.shape[-1]), i_labels.reshape(-1))
        w = self.config.loss_img_weight
        loss = (loss_text + w * loss_image) / (w + 1)
        return loss, {"text": loss_text.detach(), "image": loss_image.detach()}

    def num_parameters(self) -> int:
        """Number of parameters (masks are not parameters)."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ incremental decoding
    # Generation feeds text (+ a known image prefix) once, then one image token per step; only the
    # new token goes through the layers and only the image rows of the logits head are computed.
    @property
    def num_text_positions(self) -> int:
        """P: layer positions taken by the text (T; T + 1 in v2 because of the extra BOS).

        Image token j sits at layer position P + j and is predicted by position P - 1 + j.
        """
        return self.config.text_seq_length + (1 if self.config.hf_version == "v2" else 0)

    def new_cache(self, batch_size: int, *, static: bool = False) -> KVCache:
        """A preallocated KV cache for ``batch_size`` rows on this model's device and dtype."""
        w = self.image_embeddings.weight
        return KVCache(self.config, batch_size, w.device, w.dtype, static=static)

    def prefill(self, text_ids: torch.Tensor, image_codes: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """Run the text and an optional known image prefix through the stack, filling ``cache``.

        Args:
            text_ids: (B, T) long, as the tokenizer makes them (0 = pad).
            image_codes: (B, n) long known image codes 0..n-1, or None; n <= N - 1.
            cache: from :meth:`new_cache` with the same B.
        Returns:
            (B, P + n, H) final-LayerNorm hidden states; the last one predicts image token n.
        """
        x = self.embed_text(self.prepare_text(text_ids))  # [B, P, H]
        if image_codes is not None and image_codes.shape[1] > 0:
            if image_codes.shape[1] >= self.config.image_seq_length:
                raise ValueError(f"prefill takes at most N - 1 = {self.config.image_seq_length - 1} image codes")
            x = torch.cat([x, self.embed_image(image_codes)], dim=1)  # [B, P + n, H]
        S = x.shape[1]
        masks = {kind: m[:S, :S] for kind, m in self.layer_masks(x.device).items()}
        for layer, kind, kv in zip(self.transformer.layers, self.transformer.mask_kinds, cache.layers):
            x = layer.forward_prefill(x, masks[kind], kv, self.attn_impl)
        return self.transformer.final_layernorm(x)

    def decode_step(self, codes: torch.Tensor, image_index: int | torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed image token ``image_index`` (j) and return the hidden state that predicts token j + 1.

        Args:
            codes: (B, 1) long image codes of token j.
            image_index: j as an int (dynamic cache) or a 0-dim long device tensor (static cache).
            cache: filled for layer positions < P + j.
        Returns:
            (B, 1, H) final-LayerNorm hidden state.
        """
        D, P = self.config.image_tokens_per_dim, self.num_text_positions
        if cache.static:
            j = image_index.view(1)  # [1]
            pos = j[0] + P
        else:
            if not 0 <= image_index < self.config.total_seq_length - P:
                raise ValueError(f"image_index={image_index} is outside 0..{self.config.total_seq_length - P - 1}")
            j = cache.index_table[image_index : image_index + 1]  # [1], a view: no per-step allocation
            pos = P + image_index
        x = self.image_embeddings(codes) + self.image_row_embeddings(j // D) + self.image_col_embeddings(j % D)
        for layer, kv in zip(self.transformer.layers, cache.layers):
            x = layer.forward_step(x, kv, pos, self.attn_impl)
        return self.transformer.final_layernorm(x)

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, s, H) final hidden states -> (B, s, image_vocab_size) image logits only.

        The head's text rows are skipped: text is never sampled at image positions.
        """
        ln, head = self.to_logits[0], self.to_logits[1]
        x, start = ln(hidden), self.config.vocab_size
        if isinstance(head, nn.Linear):
            return F.linear(x, head.weight[start:], head.bias[start:])
        return head.forward_rows(x, start)  # quantised head (holst/dalle/quant.py)


def shrink_gradient(x: torch.Tensor, factor: float = 0.1) -> torch.Tensor:
    """CogView's trick: forward value unchanged, gradient into the embeddings scaled by ``factor``."""
    return factor * x + (1.0 - factor) * x.detach()


def _plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose forward is its weight and bias alone (no hooks, no adapters)."""
    return (type(module) is nn.Linear and module.bias is not None and not module._forward_hooks
            and not module._forward_pre_hooks and not hasattr(module, "lora_A"))


LOSS_CHUNK_ELEMENTS = 2**22  # logits per chunk of the lean loss (16 MiB in fp32)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(x_i W^T + b, y_i) with the gradient formed chunk by chunk in the forward pass.

    Inputs are in the compute dtype (autocast's, or fp32); each chunk's logits are upcast to fp32 for
    the log-sum-exp, and (softmax - one_hot) is cast back for the two gradient matmuls, whose
    results accumulate in fp32. Nothing of size (rows, V) outlives its chunk.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
                chunk: int) -> torch.Tensor:
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=x.device) if need_b else None
        for i in range(0, x.shape[0], chunk):
            xc, yc = x[i : i + chunk], labels[i : i + chunk]
            logits = torch.addmm(bias, xc, weight.t()).float()  # [c, V] fp32
            lse = torch.logsumexp(logits, dim=-1)  # [c]
            total = total + (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            if need_x or need_w or need_b:
                g = torch.exp(logits.sub_(lse[:, None]))  # softmax, in place of the logits
                g[torch.arange(g.shape[0], device=g.device), yc] -= 1.0  # d CE / d logits
                gc = g.to(x.dtype)
                if need_x:
                    grad_x[i : i + chunk] = gc @ weight
                if need_w:
                    grad_w += gc.t() @ xc
                if need_b:
                    grad_b += g.sum(0)
        ctx.save_for_backward(*(t for t in (grad_x, grad_w, grad_b) if t is not None))
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        ctx.have = (need_x, need_w, need_b)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = iter(ctx.saved_tensors)
        grads = [(next(saved) * grad_out).to(dt) if have else None for have, dt in zip(ctx.have, ctx.dtypes)]
        return grads[0], grads[1], grads[2], None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
                         chunk_elements: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``x @ weight.T + bias`` against ``labels`` without the full logits.

    Under autocast the matmuls run in autocast's dtype (as ``F.linear`` would); the softmax and the
    sum are fp32.

    Args:
        x: [M, H] hidden states.
        weight: [V, H] head weight.
        bias: [V] head bias.
        labels: [M] long in 0..V-1.
        chunk_elements: logits held at once (rows per chunk = chunk_elements // V); default
            ``LOSS_CHUNK_ELEMENTS``.
    Returns:
        fp32 scalar: sum over the M rows of -log softmax(logits)[label].
    """
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    chunk = max(1, (chunk_elements or LOSS_CHUNK_ELEMENTS) // weight.shape[0])
    with torch.autocast(x.device.type, enabled=False):
        return _LinearCrossEntropy.apply(x, weight, bias, labels, chunk)
