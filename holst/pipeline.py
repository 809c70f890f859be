"""Text2ImagePipeline: caption -> text ids -> image codes -> images -> ranked (-> upscaled).

```python
from holst import Text2ImagePipeline
pipe = Text2ImagePipeline.from_pretrained("models/default").to("cuda", torch.bfloat16)
out = pipe("красное яблоко", num_images=8, seed=0, rerank=4)
out.images[0].save("best.png")          # images best first; out.seeds[i] remakes out.images[i]
```
Reproducibility: image i is sampled from its own seed ``seeds[i]`` (``seed + i`` when ``seed`` is
given), so it does not depend on the batch size or on the other images; ``pipe(prompt, 1,
seed=out.seeds[i])`` gives ``out.images[i]`` again (same settings, device and dtype).

Axis legend: B images, T text_seq_length, N image tokens (D*D), D image_tokens_per_dim,
f VQGAN downsample factor, H = W = D*f pixels.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from holst.config import PipelineConfig
from holst.errors import ConfigError, InputError
from holst.hub import PipelineComponents, load_pipeline, save_pipeline
from holst.sampling import MAX_SEED, SamplingSettings, make_seeds
from holst.utils.images import pil_to_tensor, tensor_to_pil
from holst.utils.runtime import get_logger, resolve_device, resolve_dtype

logger = get_logger("holst.pipeline")

__all__ = ["MAX_SEED", "PipelineOutput", "SamplingSettings", "Text2ImagePipeline", "center_square", "make_seeds"]
ProgressFn = Callable[[int, int, torch.Tensor], None]


@dataclasses.dataclass
class PipelineOutput:
    """What one call returns; every list is in the same order as ``images`` (best first).

    Attributes:
        images: PIL RGB images, best first.
        seeds: the seed of each image (remakes it with ``num_images=1, seed=s``).
        codes: (B, N) long image codes (on the CPU).
        perplexities: the transformer's image perplexity given the caption (lower = more likely).
        clip_scores: CLIP cosine * logit scale (higher = closer to the caption); None without CLIP.
        prompt: the caption as given.
        settings: every sampling setting used (resolved defaults included), JSON-serialisable.
    """

    images: list[Image.Image]
    seeds: list[int]
    codes: torch.Tensor
    perplexities: list[float]
    clip_scores: list[float] | None
    prompt: str
    settings: dict[str, Any]

    @property
    def scores(self) -> list[float]:
        """The ranking scores: CLIP scores when there are any, else negative perplexities (higher = better)."""
        return self.clip_scores if self.clip_scores is not None else [-p for p in self.perplexities]


class Text2ImagePipeline:
    """Bundles tokenizer, VQGAN, transformer and the optional CLIP ranker and super-resolution net.

    Build with :meth:`from_pretrained` (a pipeline directory), :meth:`from_components` (modules you
    have) or :meth:`from_random` (a tiny untrained pipeline from presets, for tests and demos).
    """

    def __init__(self, components: PipelineComponents, config: PipelineConfig | None = None) -> None:
        components.check()
        self.components = components
        self.config = (config or PipelineConfig()).replace(components=components.names())
        # Extra keyword arguments of holst.sampling.sample_image_codes that change speed, not images,
        # e.g. {"static_cache": True, "cuda_graph": True} on CUDA (see :meth:`enable_cuda_graph`).
        self.sampler_options: dict[str, Any] = {}
        self.source = "memory"  # where it came from: a directory, or random:<preset>:<seed> (shown by the CLI/server)
        self.dalle.eval()
        self.vqgan.eval()
        if self.clip is not None:
            self.clip.eval()
        if self.superres is not None:
            self.superres.eval()

    # ------------------------------------------------------------------ construction / persistence
    @classmethod
    def from_components(cls, tokenizer: Any, vqgan: Any, dalle: Any, *, clip: Any | None = None,
                        clip_tokenizer: Any | None = None, superres: Any | None = None,
                        config: PipelineConfig | None = None) -> Text2ImagePipeline:
        """A pipeline from loaded modules (see :class:`holst.hub.PipelineComponents`)."""
        return cls(PipelineComponents(tokenizer, vqgan, dalle, clip, clip_tokenizer, superres), config)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None) -> Text2ImagePipeline:
        """Load a pipeline directory written by :meth:`save_pretrained` (nothing is downloaded).

        Args:
            directory: e.g. ``models/default``.
            device: 'cpu', 'cuda', 'auto', ...
            dtype: transformer/CLIP dtype ('fp32', 'bf16', 'fp16', 'auto', a torch.dtype or None = as saved).
        """
        dev = resolve_device(device)
        dt = None if dtype is None else resolve_dtype(dtype, dev)
        components, config = load_pipeline(directory, device=dev, dtype=dt)
        pipe = cls(components, config)
        pipe.source = str(directory)
        return pipe

    def save_pretrained(self, directory: str | Path, *, dtype: torch.dtype | None = None) -> None:
        """Write one sub-folder per component (safetensors + config.json) and ``pipeline.json``."""
        save_pipeline(directory, self.components, self.config, dtype=dtype)

    @classmethod
    def from_random(cls, preset: str = "tiny", *, seed: int = 0, clip: bool = True, superres: bool = True
                    ) -> Text2ImagePipeline:
        """A pipeline of untrained modules from small presets (tests, demos, CLI fallback); no training.

        Args:
            preset: 'tiny' (4x4 codes, 16 px images: unit tests) or 'emoji' (8x8 codes, the default model's shape).
            seed: weights and tokenizer are a pure function of it.
            clip: include a random CLIP ranker.
            superres: include a random 2x super-resolution net.
        """
        from holst.random_pipeline import build_random_components

        components, config = build_random_components(preset, seed=seed, clip=clip, superres=superres)
        pipe = cls(components, config)
        pipe.source = f"random:{preset}:{seed}"
        return pipe

    # ------------------------------------------------------------------ components and placement
    @property
    def tokenizer(self) -> Any:
        """The transformer's text tokenizer."""
        return self.components.tokenizer

    @property
    def vqgan(self) -> Any:
        """The image tokenizer (codes <-> images)."""
        return self.components.vqgan

    @property
    def dalle(self) -> Any:
        """The transformer that samples image codes."""
        return self.components.dalle

    @property
    def clip(self) -> Any | None:
        """The CLIP that ranks images, or None."""
        return self.components.clip

    @property
    def superres(self) -> Any | None:
        """The super-resolution net, or None (upscaling then uses Lanczos)."""
        return self.components.superres

    @property
    def device(self) -> torch.device:
        """Device of the transformer's weights."""
        return self.dalle.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the transformer's weights."""
        return self.dalle.dtype

    @property
    def image_size(self) -> int:
        """Side of a generated image in pixels before upscaling (D * f)."""
        return self.dalle.config.image_tokens_per_dim * self.vqgan.downsample_factor

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
           ) -> Text2ImagePipeline:
        """Move every module to ``device``; ``dtype`` applies to the transformer and CLIP.

        The VQGAN and super-resolution nets stay float32: 16-bit VQGAN decoders produce artefacts
        (DALLE-pytorch PR #394) and they cost little next to the transformer. Returns self.
        """
        dev = resolve_device(device) if device is not None else self.device
        dt = resolve_dtype(dtype, dev) if dtype is not None else None
        self.dalle.to(device=dev, dtype=dt)
        self.vqgan.to(device=dev, dtype=torch.float32)
        if self.clip is not None:
            self.clip.to(device=dev, dtype=dt)
        if self.superres is not None:
            self.superres.to(device=dev, dtype=torch.float32)
        if hasattr(self.dalle, "reset_buffers"):
            self.dalle.reset_buffers()
        return self

    def enable_cuda_graph(self) -> Text2ImagePipeline:
        """Sample with a static KV cache and replay the decode step as a CUDA graph (CUDA only). Returns self."""
        if self.device.type != "cuda":
            raise ConfigError(f"CUDA graphs need the pipeline on a CUDA device; it is on {self.device}")
        self.sampler_options.update(static_cache=True, cuda_graph=True)
        return self

    # ------------------------------------------------------------------ the call
    @torch.inference_mode()
    def __call__(self, prompt: str, num_images: int | None = None, *, top_k: int | None = None,
                 top_p: float | None = None, temperature: float | None = None, guidance_scale: float | None = None,
                 image_prompt: Any = None, image_prompt_mask: torch.Tensor | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None, rerank: int | None = None, upscale: int | None = None,
                 batch_size: int | None = None, progress: bool | ProgressFn | None = False) -> PipelineOutput:
        """Generate images for one caption.

        Args:
            prompt: the caption (non-empty; longer than the model reads: truncated with a warning).
            num_images: how many images to sample (default: pipeline.json).
            top_k: keep the k most likely codes per step (0 = off).
            top_p: nucleus mass (1.0 = off).
            temperature: > 0.
            guidance_scale: classifier-free guidance weight (None or 1.0 = off).
            image_prompt: a PIL image (its top half is kept, or ``image_prompt_mask``), or a
                ``holst.sampling.ImagePrompt``: the given codes are kept, the rest is sampled.
            image_prompt_mask: bool (D, D) or (N,): True where the image prompt's codes are kept.
            seed: image i uses seed + i (neither seed nor generator: random seeds).
            generator: draws the per-image seeds instead.
            rerank: keep only the best k images (0 = keep all; all are still sorted best first).
                Ranked by CLIP score when the pipeline has CLIP, else by perplexity.
            upscale: 1 = none; the super-resolution net's scale uses it, other factors use Lanczos.
            batch_size: images sampled at once (memory vs speed; results do not depend on it).
            progress: True for a progress bar, or a callable (step, total, codes_so_far (b, step)).
        Returns:
            PipelineOutput with images best first.
        """
        settings = self.resolve_settings(num_images=num_images, top_k=top_k, top_p=top_p, temperature=temperature,
                                         guidance_scale=guidance_scale, rerank=rerank, upscale=upscale,
                                         batch_size=batch_size, seed=seed)
        n = settings.num_images
        # 1. caption -> text ids (1, T); seeds, one per image
        text_ids = self.encode_prompts([prompt])
        seeds = make_seeds(n, seed=settings.seed, generator=generator)
        # 2. text ids -> image codes (B, N), in chunks of batch_size
        prompt_codes = self.prepare_image_prompt(image_prompt, image_prompt_mask)
        codes, ppl = self.sample_codes(text_ids.expand(n, -1), seeds, settings, image_prompt=prompt_codes,
                                       progress=progress)
        # 3. codes -> images, scores, ranking, upscaling
        return self.finish(prompt, codes, seeds, settings, perplexities=ppl)

    def resolve_settings(self, **given: Any) -> SamplingSettings:
        """:class:`holst.sampling.SamplingSettings` from ``given``, ``None`` ones from pipeline.json.

        Raises:
            holst.errors.ConfigError (a ValueError) naming the option and its range.
        """
        return SamplingSettings.resolve(self.config, **given)

    # ------------------------------------------------------------------ the steps
    def check_prompts(self, prompts: list[str]) -> list[str]:
        """Validate captions; returns a message per caption that will be cut to fit T.

        Raises:
            holst.errors.InputError (a ValueError) for a caption that is not text, is empty, or holds
            characters that are not Unicode (e.g. bytes that were not UTF-8 on the command line).
        """
        T = self.dalle.config.text_seq_length
        messages = []
        for prompt in prompts:
            check_prompt(prompt)
            n_tokens = len(self.tokenizer.encode(prompt.lower().strip())) + 2  # + bos, eos
            if n_tokens > T:
                messages.append(f"prompt is {n_tokens} tokens (with bos/eos) but the model reads {T}: "
                                "the end of the caption is cut off")
        return messages

    def encode_prompts(self, prompts: list[str], *, warn: bool = True) -> torch.Tensor:
        """Captions -> text ids (B, T) long on the pipeline's device.

        Raises ValueError for an empty caption; with ``warn``, a UserWarning for each caption cut to fit T.
        """
        for message in self.check_prompts(prompts):
            if warn:
                warnings.warn(message, UserWarning, stacklevel=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tokenizer's own truncation warning would repeat ours
            ids = self.tokenizer.encode_batch(prompts, self.dalle.config.text_seq_length)
        return ids.to(self.device)

    def prepare_image_prompt(self, image_prompt: Any, mask: torch.Tensor | None) -> Any:
        """A PIL image / (3, H, W) tensor + mask -> ``ImagePrompt`` (codes (N,), mask (N,)); others pass through."""
        if image_prompt is None:
            if mask is not None:
                raise InputError("image_prompt_mask was given without an image_prompt")
            return None
        from holst.sampling import ImagePrompt

        if isinstance(image_prompt, ImagePrompt):
            return image_prompt
        D = self.dalle.config.image_tokens_per_dim
        if isinstance(image_prompt, Image.Image):
            image = pil_to_tensor(center_square(image_prompt).resize((self.image_size, self.image_size),
                                                                     Image.Resampling.LANCZOS))
        elif isinstance(image_prompt, torch.Tensor) and image_prompt.dim() == 3:
            image = F.interpolate(image_prompt[None].float(), size=(self.image_size, self.image_size),
                                  mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)
        else:
            raise InputError("image_prompt must be a PIL image, a (3, H, W) tensor in [0, 1] or an ImagePrompt")
        codes = self.vqgan.encode(image[None].to(self.device)).reshape(-1)  # (1, D, D) -> (N,)
        if mask is None:
            mask = torch.zeros(D, D, dtype=torch.bool)
            mask[: D // 2] = True  # keep the top half, sample the rest (ruDALL-E's border prompt)
        mask = torch.as_tensor(mask, dtype=torch.bool).reshape(-1)
        if mask.numel() != D * D:
            raise InputError(f"image_prompt_mask has {mask.numel()} entries; the model has {D}x{D} = {D * D} codes")
        return ImagePrompt(codes=codes, mask=mask.to(self.device))

    def sample_codes(self, text_ids: torch.Tensor, seeds: list[int], settings: SamplingSettings, *,
                     image_prompt: Any = None, progress: bool | ProgressFn | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample image codes for each row of ``text_ids`` (B, T) with its own seed, batch_size rows at a time.

        Returns:
            (B, N) long codes on the pipeline's device, and their (B,) perplexities (float32, CPU)
            computed from the sampling's own logits.
        """
        from holst.sampling import sample_image_codes

        B, N = text_ids.shape[0], self.dalle.config.image_seq_length
        if len(seeds) != B:
            raise ValueError(f"got {len(seeds)} seeds for {B} images")
        chunks = [(i, min(i + settings.batch_size, B)) for i in range(0, B, settings.batch_size)]
        bar = None
        if progress is True:
            from tqdm.auto import tqdm

            bar = tqdm(total=B * N, unit="tok", desc="sampling", leave=False)
        out, ppl = [], []
        for start, end in chunks:
            callback = None
            if bar is not None:
                done = [0]

                def callback(step: int, total: int, codes_so_far: torch.Tensor, _done=done, _b=end - start) -> None:
                    bar.update((step - _done[0]) * _b)
                    _done[0] = step
            elif callable(progress):
                # Steps count image tokens over all chunks: chunk c's step s is c * N + s of len(chunks) * N.
                def callback(step: int, total: int, codes_so_far: torch.Tensor, _c=len(out)) -> None:
                    progress(_c * N + step, len(chunks) * N, codes_so_far)
            ip = image_prompt
            if ip is not None and ip.codes.dim() == 2:
                ip = type(ip)(codes=ip.codes[start:end], mask=ip.mask[start:end] if ip.mask.dim() == 2 else ip.mask)
            codes, p = sample_image_codes(self.dalle, text_ids[start:end], image_prompt=ip,
                                          seeds=list(seeds[start:end]), progress=callback, return_perplexity=True,
                                          **settings.sampler_kwargs(), **self.sampler_options)
            out.append(codes)
            ppl.append(p.float().cpu())
        if bar is not None:
            bar.close()
        return torch.cat(out, dim=0), torch.cat(ppl, dim=0)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, N) codes -> (B, 3, H, W) float images in [0, 1].

        In calls of exactly ``VQGAN.decode_chunk()`` images (``VQGAN.decode_chunked``): an image comes out
        byte-identical however many were made with it.
        """
        D = self.dalle.config.image_tokens_per_dim
        grids = codes.reshape(-1, D, D).to(self.device)  # (B, N) -> (B, D, D)
        return self.vqgan.decode_chunked(grids).float().clamp(0, 1)

    def preview(self, codes_so_far: torch.Tensor) -> list[Image.Image]:
        """Partial codes (B, n) -> preview images: the finished rows decoded, the rest grey."""
        from holst.sampling import partial_grid

        D, f = self.dalle.config.image_tokens_per_dim, self.vqgan.downsample_factor
        images = self.decode(partial_grid(codes_so_far, D))  # (B, D, D) -> (B, 3, H, W)
        rows = codes_so_far.shape[1] // D
        images[:, :, rows * f:] = 0.5
        return tensor_to_pil(images)

    def perplexities(self, text_ids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """(B,) image perplexity given the caption (the reference's ce_to_ppl), float32 on the CPU."""
        from holst.sampling import image_perplexity

        return image_perplexity(self.dalle, text_ids.to(self.device), codes.to(self.device)).float().cpu()

    def clip_scores(self, images: torch.Tensor, prompt: str) -> torch.Tensor | None:
        """(B,) CLIP scores of images (B, 3, H, W) in [0, 1] against one caption; None without CLIP."""
        if self.clip is None:
            return None
        from holst.rerank.ranker import ClipRanker

        # CLIP crops and resizes the images itself; the ranker encodes the caption with keep_eos=True.
        return ClipRanker(self.clip, self.components.clip_tokenizer).score(images, [prompt])

    @torch.inference_mode()
    def score_images(self, images: list[Image.Image] | torch.Tensor, prompt: str) -> list[float]:
        """CLIP scores of any images (PIL list or (B, 3, H, W) in [0, 1]) against a caption.

        E.g. to compare generated images with their own and with shuffled captions. Raises ValueError
        without CLIP.
        """
        if self.clip is None:
            raise InputError("this pipeline has no CLIP component (pipeline.json 'components' lacks 'clip')")
        if not isinstance(images, torch.Tensor):
            images = torch.stack([pil_to_tensor(im) for im in images])
        return self.clip_scores(images.to(self.device).float(), prompt).tolist()

    def upscale_images(self, images: torch.Tensor, factor: int) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3, factor*H, factor*W): the super-resolution net when it can, else Lanczos."""
        if factor == 1:
            return images
        from holst.superres import lanczos_upscale, super_resolve

        sr = self.superres
        if sr is None or factor > int(sr.scale):
            logger.warning("upscale=%d: %s; using Lanczos resampling", factor,
                           "no super-resolution net" if sr is None else f"the super-resolution net is x{int(sr.scale)}")
            return lanczos_upscale(images, float(factor)).to(images.device)  # per image and channel (PIL)
        # The net one image at a time: its kernels, like the VQGAN's (see decode()), depend on the batch size.
        return torch.cat([super_resolve(sr, im[None], factor).images for im in images])

    def finish(self, prompt: str, codes: torch.Tensor, seeds: list[int], settings: SamplingSettings, *,
               perplexities: torch.Tensor | None = None) -> PipelineOutput:
        """Decode, score, rank (best first, keep ``rerank``), upscale; the end of :meth:`__call__`.

        Args:
            prompt: the caption.
            codes: (B, N) sampled image codes.
            seeds: the B images' seeds.
            settings: the resolved sampling settings (rerank, upscale, ...).
            perplexities: (B,) from :meth:`sample_codes` (None: computed with one forward).
        """
        images = self.decode(codes)  # (B, 3, H, W)
        ppl = perplexities if perplexities is not None else self.perplexities(
            self.encode_prompts([prompt]).expand(codes.shape[0], -1), codes)
        clip = self.clip_scores(images, prompt)
        # Best first: CLIP score descending, else perplexity ascending; stable so ties keep seed order.
        key = -clip if clip is not None else ppl
        order = torch.argsort(key, stable=True)
        if settings.rerank:
            order = order[: settings.rerank]
        images = self.upscale_images(images[order.to(images.device)], settings.upscale)
        return PipelineOutput(
            images=tensor_to_pil(images),
            seeds=[int(seeds[i]) for i in order.tolist()],
            codes=codes[order.to(codes.device)].cpu(),
            perplexities=[float(ppl[i]) for i in order.tolist()],
            clip_scores=None if clip is None else [float(clip[i]) for i in order.tolist()],
            prompt=prompt,
            settings=dataclasses.asdict(settings),
        )


def check_prompt(prompt: Any) -> str:
    """Return ``prompt`` if it is a usable caption, else raise InputError saying why.

    A usable caption is a ``str`` with a non-blank character and no lone surrogate: Python turns
    command-line bytes that are not UTF-8 into surrogates (U+DC80..U+DCFF), which no file can hold.
    """
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a str (a caption), got {type(prompt).__name__} {prompt!r:.40}")
    if not prompt.strip():
        raise InputError("prompt is empty: give a caption describing the image, e.g. 'красное яблоко'")
    for i, ch in enumerate(prompt):
        if "\ud800" <= ch <= "\udfff":
            hint = f" (the byte 0x{ord(ch) - 0xDC00:02X} is not UTF-8)" if ord(ch) >= 0xDC80 else ""
            raise InputError(f"prompt has a character that is not Unicode at position {i}{hint}: "
                             "give the caption as UTF-8 text")
    return prompt


def center_square(image: Image.Image) -> Image.Image:
    """The largest centred square crop of an image."""
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s))

