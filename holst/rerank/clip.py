"""CLIP for ranking generated images: the ruCLIP / OpenAI-CLIP ViT layout (reference.md §5).

Axis legend: B batch, L context_length (text positions), W transformer_width (text), C vision_width,
P vision_patch_size, R image_resolution, G = R // P patches per side, N = G*G + 1 vision tokens
(CLS first), E embed_dim (joint embedding), S a tower's sequence length (L or N).

State-dict names are exactly ruCLIP's (``visual.*``, ``transformer.resblocks.{i}.*``,
``token_embedding``, ``positional_embedding``, ``ln_final``, ``text_projection``, ``logit_scale``),
so an official ``pytorch_model.bin`` loads with no renaming (see holst.convert.ruclip).
Images are preprocessed here with torch ops as ruCLIP's processor does: centre square crop,
bilinear resize to R, OpenAI mean/std normalisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from holst.rerank.config import CLIP_PRESETS, ClipConfig, clip_preset  # noqa: F401 (re-exported)
from holst.utils.attention import attention
from holst.utils.persist import PretrainedMixin

# ---------------------------------------------------------------------------------------------
# Image preprocessing (torch ops; no torchvision)
# ---------------------------------------------------------------------------------------------


def center_square_crop(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, s, s), s = min(H, W), the centre square.

    Same offsets as torchvision's RandomResizedCrop(scale=(1, 1), ratio=(1, 1)) fallback, which is
    what ruCLIP's processor runs: top = (H - s) // 2, left = (W - s) // 2.
    """
    H, W = images.shape[-2:]
    s = min(H, W)
    top, left = (H - s) // 2, (W - s) // 2
    return images[..., top:top + s, left:left + s]


def resize_square(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Centre square crop, then bilinear (antialiased) resize: (B, 3, H, W) [0, 1] -> (B, 3, R, R) [0, 1]."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) float in [0, 1], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor in [0, 1], got dtype {images.dtype}")
    x = center_square_crop(images)
    if x.shape[-1] != resolution:
        # PIL's bilinear resize (what the processor uses) is antialiased when shrinking.
        x = F.interpolate(x.float(), size=(resolution, resolution), mode="bilinear", align_corners=False,
                          antialias=True).to(images.dtype)
    return x


def preprocess_images(images: torch.Tensor, resolution: int, mean: tuple[float, ...], std: tuple[float, ...]
                      ) -> torch.Tensor:
    """ruCLIP's image transform on float tensors.

    Args:
        images: (B, 3, H, W) float in [0, 1] (any size, any aspect ratio).
        resolution: output side R.
        mean: per-channel mean subtracted (OpenAI CLIP's for ruCLIP).
        std: per-channel standard deviation divided by (OpenAI CLIP's for ruCLIP).
    Returns:
        (B, 3, R, R) float, normalised, same dtype as ``images``.
    """
    x = resize_square(images, resolution)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


# ---------------------------------------------------------------------------------------------
# Building blocks (names follow OpenAI CLIP / ruCLIP)
# ---------------------------------------------------------------------------------------------


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back (the reference does this for fp16 weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise over the last dimension in fp32; the result has ``x``'s dtype."""
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x * sigmoid(1.702 x), elementwise."""
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names and numerics.

    Parameters: ``in_proj_weight`` [3W, W] (rows = q | k | v), ``in_proj_bias`` [3W],
    ``out_proj`` Linear(W, W). Scaled dot-product attention (:func:`holst.utils.attention.attention`: fused,
    or with the scores written out where a CPU backward follows) instead of nn.MultiheadAttention.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        """x [B, S, W] -> [B, S, W]; ``causal`` = the text tower's -inf upper-triangle mask."""
        B, S, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, S, 3W]
        qkv = qkv.view(B, S, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # [3, B, heads, S, W/heads]
        out = attention(qkv[0], qkv[1], qkv[2], causal=causal)  # [B, heads, S, W/heads]
        return self.out_proj(out.transpose(1, 2).reshape(B, S, W))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) with a 4x QuickGELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = SelfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        """[B, S, W] -> [B, S, W]."""
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks (keys ``resblocks.{i}.*``)."""

    def __init__(self, width: int, layers: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.width, self.causal = width, causal
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, W] -> [B, S, W]."""
        for block in self.resblocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, self.causal, use_reentrant=False)
            else:
                x = block(x, self.causal)
        return x


class VisionTransformer(nn.Module):
    """ViT: patch conv (no bias) -> [CLS] + patches + positions -> ln_pre -> blocks -> ln_post(CLS) @ proj."""

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        C, P = config.vision_width, config.vision_patch_size
        self.conv1 = nn.Conv2d(3, C, kernel_size=P, stride=P, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(C))
        self.positional_embedding = nn.Parameter(torch.empty(config.grid_size**2 + 1, C))
        self.ln_pre = LayerNorm(C)
        self.transformer = Transformer(C, config.vision_layers, config.num_vision_heads, causal=False)
        self.ln_post = LayerNorm(C)
        self.proj = nn.Parameter(torch.empty(C, config.embed_dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, 3, R, R) -> image features (B, E), not L2-normalised."""
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype))  # [B, C, G, G]
        x = x.flatten(2).transpose(1, 2)  # [B, G*G, C]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, C]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, N, C]
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # [B, C] @ [C, E] -> [B, E]


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class CLIPModel(PretrainedMixin, nn.Module):
    """ruCLIP: a causal text transformer and a ViT, compared by cosine similarity.

    ``encode_image(images)`` / ``encode_text(text_ids)`` give L2-normalised (B, E) features;
    ``score(images, text_ids)`` is cosine * exp(logit_scale) per pair; ``forward`` gives the
    (B_img, B_txt) logit matrix used by the contrastive loss. Text ids are made with
    ``BPETokenizer.encode_batch(texts, config.context_length, keep_eos=True)``.
    """

    config_class = ClipConfig

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.config = config
        W = config.transformer_width
        self.visual = VisionTransformer(config)
        self.transformer = Transformer(W, config.transformer_layers, config.transformer_heads, causal=True)
        self.token_embedding = nn.Embedding(config.vocab_size, W)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, W))
        self.ln_final = LayerNorm(W)
        self.text_projection = nn.Parameter(torch.empty(W, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.empty(()))
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def init_weights(self) -> None:
        """OpenAI CLIP's initialisation (used when training from scratch; pretrained weights overwrite all)."""
        for tower, width in ((self.transformer, self.config.transformer_width),
                             (self.visual.transformer, self.config.vision_width)):
            proj_std = width**-0.5 * (2 * len(tower.resblocks)) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
                nn.init.zeros_(block.attn.in_proj_bias)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.zeros_(block.attn.out_proj.bias)
                nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
                nn.init.zeros_(block.mlp.c_fc.bias)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
                nn.init.zeros_(block.mlp.c_proj.bias)
        C = self.config.vision_width
        nn.init.kaiming_uniform_(self.visual.conv1.weight, a=math.sqrt(5))  # nn.Conv2d's default
        for p in (self.visual.class_embedding, self.visual.positional_embedding, self.visual.proj):
            nn.init.normal_(p, std=C**-0.5)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.config.transformer_width**-0.5)
        nn.init.constant_(self.logit_scale, math.log(1 / 0.07))
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in backward (saves memory for large CLIPs)."""
        self.transformer.gradient_checkpointing = enabled
        self.visual.transformer.gradient_checkpointing = enabled

    # ------------------------------------------------------------------ images
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) [0, 1] -> (B, 3, R, R) normalised pixels (crop, resize, mean/std)."""
        c = self.config
        return preprocess_images(images, c.image_resolution, c.mean, c.std)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) [0, 1] -> (B, E) raw (un-normalised) image features."""
        return self.visual(self.preprocess(images))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings.

        Args:
            images: (B, 3, H, W) float in [0, 1], any size (centre-cropped and resized to R).
        Returns:
            (B, E) L2-normalised features (dtype of the weights).
        """
        return F.normalize(self.image_features(images), dim=-1)

    # ------------------------------------------------------------------ text
    def eos_positions(self, text_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B,) index of the first eos id per row.

        ruCLIP reads the feature at the eos position; a row without eos (should not happen with
        ``keep_eos=True``) uses its last non-pad position instead of failing.
        """
        is_eos = text_ids == self.config.eos_id
        positions = torch.arange(text_ids.shape[1], device=text_ids.device)
        last_token = torch.where(text_ids != 0, positions, 0).amax(dim=1)
        first_eos = torch.where(is_eos, positions, text_ids.shape[1]).amin(dim=1)
        return torch.where(is_eos.any(dim=1), first_eos, last_token)

    def text_features(self, text_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) long -> (B, E) raw (un-normalised) text features."""
        c = self.config
        if text_ids.dim() != 2 or text_ids.shape[1] > c.context_length:
            raise ValueError(f"text_ids must be (B, L <= context_length={c.context_length}) long, "
                             f"got {tuple(text_ids.shape)}")
        if text_ids.numel() and (int(text_ids.min()) < 0 or int(text_ids.max()) >= c.vocab_size):
            raise ValueError(f"text_ids must lie in [0, vocab_size={c.vocab_size}); got range "
                             f"[{int(text_ids.min())}, {int(text_ids.max())}] (wrong tokenizer for this CLIP?)")
        L = text_ids.shape[1]
        x = self.token_embedding(text_ids) + self.positional_embedding[:L]  # [B, L, W]
        x = self.ln_final(self.transformer(x))
        x = x[torch.arange(x.shape[0], device=x.device), self.eos_positions(text_ids)]  # [B, W]
        return x @ self.text_projection  # [B, E]

    def encode_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings.

        Args:
            text_ids: (B, L) long, L <= context_length: [bos] + BPE ids + [eos], 0-padded.
        Returns:
            (B, E) L2-normalised features.
        """
        return F.normalize(self.text_features(text_ids), dim=-1)

    # ------------------------------------------------------------------ scores
    def forward(self, images: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """Logit matrix for the contrastive loss.

        Args:
            images: (B_img, 3, H, W) float in [0, 1].
            text_ids: (B_txt, L) long.
        Returns:
            (B_img, B_txt) float: exp(logit_scale) * cosine similarity (ruCLIP's logits_per_image).
        """
        img, txt = self.encode_image(images), self.encode_text(text_ids)
        return self.logit_scale.exp() * img @ txt.t()

    @torch.no_grad()
    def score(self, images: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """Per-pair score: exp(logit_scale) * cos(image_i, text_i).

        Args:
            images: (B, 3, H, W) float in [0, 1].
            text_ids: (B, L) long, or (1, L) to score every image against one caption.
        Returns:
            (B,) float32 scores; higher = better match.
        """
        if text_ids.shape[0] not in (1, images.shape[0]):
            raise ValueError(f"score: {images.shape[0]} images but {text_ids.shape[0]} texts (need 1 or equal)")
        img, txt = self.encode_image(images), self.encode_text(text_ids)
        return (self.logit_scale.exp() * (img * txt).sum(dim=-1)).float()


def contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over a (B, B) logit matrix whose diagonal holds the true pairs."""
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    logits = logits_per_image.float()
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


@torch.no_grad()
def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: tuple[int, ...] = (1, 5),
                     groups: torch.Tensor | None = None) -> dict[str, float]:
    """Image->text and text->image recall@k over N paired embeddings.

    Args:
        image_emb: (N, E) L2-normalised image embeddings; row i of each is a true pair.
        text_emb: (N, E) L2-normalised text embeddings.
        ks: the k values.
        groups: optional (N,) long; items with the same group id (e.g. identical captions) count as
            correct matches for each other, since no model can tell identical texts apart.
    Returns:
        {'i2t_r@1': ..., 't2i_r@1': ..., ...} fractions in [0, 1].
    """
    sim = image_emb.float() @ text_emb.float().t()  # [N, N]
    N = sim.shape[0]
    if groups is None:
        groups = torch.arange(N, device=sim.device)
    same = groups.view(-1, 1) == groups.view(1, -1)  # [N, N]
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.t())):
        order = s.argsort(dim=1, descending=True)  # [N, N]
        hit = torch.gather(same, 1, order)  # hit[i, r]: the rank-r candidate matches query i
        for k in ks:
            out[f"{name}_r@{k}"] = hit[:, : min(k, N)].any(dim=1).float().mean().item()
    return out
