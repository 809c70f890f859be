"""Image-token generation for the ruDALL-E transformer: filters, guidance, seeds, image prompts, ranking.

Axis legend: B images, R = B (or 2B with classifier-free guidance: cond rows then uncond rows),
T text_seq_length, D image_tokens_per_dim, N = D*D image tokens, V image_vocab_size.

Everything policy-like is a pure function of logits (reference.md §2 semantics):
  - :func:`filter_logits`: transformers' ``top_k_top_p_filtering`` (ties kept in top-k, top-p
    always applied, the first token crossing top_p kept), after dividing by the temperature;
  - :func:`guided_logits`: classifier-free guidance, cond + (s - 1) * (cond - uncond), so s = 1 is
    exactly the conditional logits; the uncond caption is [bos, eos, pads] (:func:`empty_caption_ids`);
  - :func:`counter_gumbel`: sampling noise from a counter-based hash of (image seed, step, code), so
    an image depends on its own seed only, not on the batch it was made in, and sampling is one
    batched argmax(logits + Gumbel noise) on the device (no host sync, no per-image RNG calls).
:func:`sample_image_codes` runs the incremental model (holst/dalle/cache.py): text (and any known
image prefix) once, then one token per step through the layers and the image rows of the head.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import secrets
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from holst.dalle import DalleModel
from holst.dalle.decode import Decoder, text_group_size
from holst.errors import ConfigError

BOS_ID, EOS_ID, PAD_ID = 2, 3, 0
REFERENCE_TOP_K, REFERENCE_TOP_P = 2048, 0.995  # the reference README / Emojich settings (reference.md §2)
BORDER_KEYS = ("up", "down", "left", "right")

ProgressFn = Callable[[int, int, torch.Tensor], None]


# --------------------------------------------------------------------------------------------
# Sampling settings: the one declaration every entry point derives its options from
# --------------------------------------------------------------------------------------------

MAX_SEED = 2**63 - 1  # image i of seed s uses s + i, so s + num_images - 1 must stay <= MAX_SEED
DRAWN_SEED_BOUND = 2**31  # seeds nobody gave are drawn in [0, 2**31): short to type back, plenty of pictures


@dataclasses.dataclass(frozen=True)
class Limit:
    """The values one setting accepts; shown in CLI help, the server's schema and every error message.

    Attributes:
        kind: int or float (an int is accepted for a float; a bool never is).
        low, high: inclusive bounds (None = unbounded); ``low_open`` excludes ``low`` itself.
        optional: None is a value of its own (``off_means`` says what it means).
    """

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    optional: bool = False
    off_means: str = ""

    def text(self) -> str:
        """E.g. 'a number in (0, 1]' or 'an integer >= 0'."""
        noun = "an integer" if self.kind is int else "a number"
        low, high = _bound(self.low), _bound(self.high)
        if self.low is not None and self.high is not None:
            return f"{noun} in {'(' if self.low_open else '['}{low}, {high}]"
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {low}"
        return noun

    def check(self, name: str, value: Any) -> Any:
        """``value`` as ``kind`` (None kept when optional), or ConfigError naming ``name`` and the range."""
        if value is None and self.optional:
            return None
        integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        real = integral or (isinstance(value, numbers.Real) and not isinstance(value, bool))
        ok = integral if self.kind is int else real and _finite(value)
        if ok:
            value = self.kind(value)
            ok = (self.low is None or (value > self.low if self.low_open else value >= self.low)) and (
                self.high is None or value <= self.high)
        if not ok:
            extra = f" ({self.off_means})" if self.off_means else ""
            shown = repr(value)
            shown = shown if len(shown) <= 40 else f"<{type(value).__name__} of {len(shown)} characters>"
            raise ConfigError(f"{name}={shown} must be {self.text()}{' or None' if self.optional else ''}{extra}")
        return value


def _bound(value: float | None) -> str:
    return "2**63 - 1" if value == MAX_SEED else f"{value:g}" if isinstance(value, float) else str(value)


def _finite(value: numbers.Real) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int too large for a float
        return False


def _setting(default: Any, help: str, limit: Limit) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "limit": limit})


@dataclasses.dataclass
class SamplingSettings:
    """Every sampling setting of one generation, validated once (``ConfigError`` names the option).

    ``pipeline.json`` (:class:`holst.config.PipelineConfig`), ``Text2ImagePipeline.__call__``, the
    ``holst generate`` / ``holst eval`` / ``holst prepare pipeline`` flags and the server's request
    model all take their names, defaults and ranges from these fields (``holst.cli_common``,
    ``holst.serve.schemas``); ``tests/test_settings_agree.py`` checks that they agree.
    """

    num_images: int = _setting(4, "images to sample", Limit(int, 1, 4096))
    top_k: int = _setting(REFERENCE_TOP_K, "keep the k most likely codes per step", Limit(int, 0, off_means="0 = off"))
    top_p: float = _setting(REFERENCE_TOP_P, "nucleus probability mass",
                            Limit(float, 0, 1, low_open=True, off_means="1 = off"))
    temperature: float = _setting(1.0, "sampling temperature", Limit(float, 0, 100, low_open=True))
    guidance_scale: float | None = _setting(None, "classifier-free guidance weight (0 = the empty caption only)",
                                            Limit(float, 0, 100, optional=True, off_means="None or 1 = off"))
    rerank: int = _setting(0, "keep the best k images, sorted best first",
                           Limit(int, 0, 4096, off_means="0 = keep all, <= num_images"))
    upscale: int = _setting(1, "upscaling factor (the super-resolution net, else Lanczos)",
                            Limit(int, 1, 16, off_means="1 = none"))
    batch_size: int = _setting(8, "images sampled at once (memory vs speed; images do not change)", Limit(int, 1))
    seed: int | None = _setting(None, "image i uses seed + i", Limit(int, 0, MAX_SEED, optional=True,
                                                                      off_means="None = random seeds"))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.metadata["limit"].check(f.name, getattr(self, f.name)))
        if self.rerank > self.num_images:
            raise ConfigError(f"rerank={self.rerank} must be <= num_images={self.num_images} (0 = keep all)")
        if self.seed is not None and self.seed + self.num_images - 1 > MAX_SEED:
            raise ConfigError(f"seed={self.seed} + num_images - 1 must be <= 2**63 - 1 (image i uses seed + i)")

    @classmethod
    def resolve(cls, defaults: Any = None, **given: Any) -> SamplingSettings:
        """Settings from ``given`` where not None, else from ``defaults``, else the field defaults.

        ``defaults`` is an object with the same attribute names, e.g. a PipelineConfig; unknown names
        raise ConfigError.
        """
        unknown = sorted(set(given) - set(setting_names()))
        if unknown:
            raise ConfigError(f"unknown sampling setting(s) {unknown}; known: {list(setting_names())}")
        values = {}
        for name in setting_names():
            value = given.get(name)
            if value is None and defaults is not None:
                value = getattr(defaults, name, None)
            if value is not None:
                values[name] = value
        return cls(**values)

    def sampler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`sample_image_codes` (top_k 0 / top_p 1.0 switch the filters off)."""
        return dict(top_k=self.top_k, top_p=self.top_p, temperature=self.temperature,
                    guidance_scale=self.guidance_scale if self.guidance_scale not in (None, 1.0) else None)

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one sampling batch (the server's grouping rule)."""
        return (self.top_k, self.top_p, self.temperature, self.guidance_scale)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


def setting_names() -> tuple[str, ...]:
    """The names of the :class:`SamplingSettings` fields, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(SamplingSettings))


# The settings pipeline.json holds defaults for (holst.config.PipelineConfig): all but the per-call seed.
PIPELINE_SETTINGS = tuple(name for name in setting_names() if name != "seed")


def setting_limit(name: str) -> Limit:
    """The :class:`Limit` of one setting (KeyError for an unknown name)."""
    return {f.name: f.metadata["limit"] for f in dataclasses.fields(SamplingSettings)}[name]


def setting_help(name: str) -> str:
    """One line for ``--help`` / the OpenAPI description: what the setting does, its range, its off value."""
    f = {f.name: f for f in dataclasses.fields(SamplingSettings)}[name]
    limit = f.metadata["limit"]
    extra = f"; {limit.off_means}" if limit.off_means else ""
    return f"{f.metadata['help']}: {limit.text()}{extra}"


def check_setting(name: str, value: Any) -> Any:
    """Validate one setting alone (its cross-checks need the others); returns it normalised."""
    return setting_limit(name).check(name, value)


def make_seeds(n: int, *, seed: int | None = None, generator: torch.Generator | None = None) -> list[int]:
    """Per-image seeds: seed + i; else drawn from ``generator``; else from the OS's randomness.

    Args:
        n: number of images (>= 1).
        seed: in [0, 2**63 - n] (:data:`MAX_SEED`).
        generator: draws the seeds in [0, 2**31) (:func:`draw_seeds`) when no seed is given.
    Returns:
        n ints; ConfigError when the seed is out of range or both seed and generator are given.
    """
    if seed is not None and generator is not None:
        raise ConfigError("give seed or generator, not both")
    if seed is not None:
        return [SamplingSettings(num_images=n, seed=seed, batch_size=1).seed + i for i in range(n)]
    if generator is not None:
        return draw_seeds(n, generator)
    return [secrets.randbelow(DRAWN_SEED_BOUND) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# Filters and guidance (pure functions of logits)
# --------------------------------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """transformers' ``top_k_top_p_filtering`` (4.10-4.36): removed entries become -inf.

    Args:
        logits: (..., V) float.
        top_k: keep logits >= the k-th largest (ties kept); k = min(max(top_k, 1), V); 0 disables.
        top_p: applied whenever 0 <= top_p <= 1 (so 1.0 still runs): sort descending, remove the
            tokens whose cumulative probability (after top-k) exceeds top_p, shifted right by one
            so the first crossing token and the top token stay.
    Returns:
        (..., V) logits with removed entries set to -inf.
    """
    neg_inf = float("-inf")
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (..., V)
    if top_k > 0:
        k = min(max(int(top_k), 1), V)
        kth = sorted_logits[..., k - 1 : k]  # (..., 1)
        logits = logits.masked_fill(logits < kth, neg_inf)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, neg_inf)
    if 0.0 <= top_p <= 1.0:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (..., V)
        remove_sorted = cumulative > top_p
        remove_sorted = torch.cat([torch.zeros_like(remove_sorted[..., :1]), remove_sorted[..., :-1]], dim=-1)
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, neg_inf)
    return logits


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + s * (cond - uncond).

    Written as cond + (s - 1) * (cond - uncond) so that s = 1 returns ``cond`` bit for bit.
    cond, uncond: (..., V) -> (..., V).
    """
    return cond + (scale - 1.0) * (cond - uncond)


def empty_caption_ids(batch_size: int, text_seq_length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The unconditional caption as the tokenizer makes an empty text: [bos, eos, 0, 0, ...] (B, T) long."""
    ids = torch.full((batch_size, text_seq_length), PAD_ID, dtype=torch.long, device=device)
    ids[:, 0] = BOS_ID
    if text_seq_length > 1:
        ids[:, 1] = EOS_ID
    return ids


# --------------------------------------------------------------------------------------------
# Counter-based noise: per-image seeds without per-image RNG calls
# --------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32): split c in 16-bit halves so nothing overflows int64."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + ((x * hi) & 0xFFFF) * 65536) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (Wellons' 'lowbias32'), on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seed_keys(seeds: list[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Per-image 32-bit noise keys from arbitrary integer seeds. Returns (B,) int64 in [0, 2**32)."""
    lo = torch.tensor([int(v) % (1 << 64) & _M32 for v in seeds], dtype=torch.long)
    hi = torch.tensor([(int(v) % (1 << 64)) >> 32 for v in seeds], dtype=torch.long)
    return _mix32(_mix32(lo) ^ hi).to(device)


def counter_gumbel(keys: torch.Tensor, step: int | torch.Tensor, vocab_size: int, vocab_salt: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Gumbel(0, 1) noise that depends only on (key, step, code index).

    Args:
        keys: (B,) int64 from :func:`seed_keys`.
        step: the image token index being sampled (an int, or a 0-dim long tensor in CUDA graphs).
        vocab_size: V.
        vocab_salt: optional precomputed ``_vocab_salt(V)`` on the keys' device.
    Returns:
        (B, V) float32; argmax(log p + noise) is an exact sample from p (Gumbel-max trick).
    """
    if vocab_salt is None:
        vocab_salt = vocab_salt_table(vocab_size, keys.device)
    step_salt = (step + 1) * 0x9E3779B9 & _M32  # int or 0-dim tensor; < 2**63 for any image index
    k = _mix32(keys ^ step_salt)  # (B,)
    bits = _mix32(_mix32(k[:, None] ^ vocab_salt[None, :]))  # (B, V) in [0, 2**32)
    u = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # (0, 1), 24 bits: exact in float32
    return -torch.log(-torch.log(u))


def vocab_salt_table(vocab_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(V,) int64 hashed code indices used by :func:`counter_gumbel`."""
    v = torch.arange(vocab_size, dtype=torch.long, device=device)
    return _mix32(_mul32(v, 0x85EBCA6B) ^ 0x27D4EB2F)


def draw_seeds(n: int, generator: torch.Generator | None = None) -> list[int]:
    """n per-image seeds in [0, 2**31) (:data:`DRAWN_SEED_BOUND`) from ``generator`` (or torch's default RNG)."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, DRAWN_SEED_BOUND, (n,), generator=generator, device=device).tolist()


def sample_tokens(logits: torch.Tensor, keys: torch.Tensor, step: int | torch.Tensor, *, top_k: int, top_p: float,
                  temperature: float = 1.0, vocab_salt: torch.Tensor | None = None) -> torch.Tensor:
    """One sampling step as the reference does it: logits (B, V) -> (B,) long codes.

    logits / temperature, top-k/top-p filter, then a categorical draw (here by Gumbel-max with
    per-image counter noise).
    """
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    noise = counter_gumbel(keys, step, logits.shape[-1], vocab_salt)
    return (logits + noise).argmax(dim=-1)


def sample_tokens_topk(logits: torch.Tensor, keys: torch.Tensor, step: int | torch.Tensor, *, top_k: int,
                       top_p: float, temperature: float = 1.0, vocab_salt: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """:func:`sample_tokens` without the full sort or the scatter: the same kept set and the same draw.

    The kept set is found from ``topk`` values and comparisons.

    :func:`filter_logits` sorts; its kept set is always a prefix of the descending order: every
    logit >= the k-th largest (top-k keeps ties), cut where the cumulative probability crosses
    top_p. The sorted *values* of that prefix are the top-k values followed by copies of the k-th,
    so softmax and cumsum run on the very vector the sort would give (same floats). Only the order
    among exactly equal logits at the cut is not a value: torch.sort leaves it unspecified, and
    here the lower code index goes first (deterministic; fp32 logits practically never tie, 16-bit
    ones do).

    Args:
        logits: (B, V).
        keys: (B,) :func:`seed_keys`.
        step: image token index (int or 0-dim tensor).
        top_k: as :func:`sample_tokens`.
        top_p: as :func:`sample_tokens`.
        temperature: as :func:`sample_tokens`.
        vocab_salt: (V,) :func:`vocab_salt_table`.
    Returns:
        (B,) long codes.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    B, V = logits.shape
    k = V if top_k <= 0 else min(top_k, V)
    vals = logits.topk(k, dim=-1).values  # (B, k) descending
    kth = vals[:, -1:]  # (B, 1)
    kept = logits >= kth  # (B, V) top-k with ties
    if 0.0 <= top_p <= 1.0:
        m = kept.sum(dim=-1, keepdim=True)  # (B, 1) size of the top-k set
        pos = torch.arange(V, device=logits.device)
        sorted_vals = torch.cat([vals, kth.expand(B, V - k)], dim=-1).masked_fill(pos >= m, float("-inf"))
        cumulative = sorted_vals.softmax(dim=-1).cumsum(dim=-1)  # (B, V) as filter_logits computes it
        n = (1 + (cumulative[:, :-1] <= top_p).sum(dim=-1, keepdim=True)).minimum(m)  # (B, 1) kept prefix
        cut = sorted_vals.gather(1, n - 1)  # (B, 1) the smallest kept value
        above, at = logits > cut, logits == cut
        kept = above | (at & (at.cumsum(dim=-1) <= n - above.sum(dim=-1, keepdim=True)))
    noise = counter_gumbel(keys, step, V, vocab_salt)
    return (logits + noise).masked_fill(~kept, float("-inf")).argmax(dim=-1)


# --------------------------------------------------------------------------------------------
# Image prompts
# --------------------------------------------------------------------------------------------


def border_mask(image_tokens_per_dim: int, borders: dict[str, int]) -> torch.Tensor:
    """The reference's border prompt region (reference.md §2) as a (N,) bool mask, row-major.

    Args:
        image_tokens_per_dim: D.
        borders: {'up', 'down', 'left', 'right'} widths in tokens (all four required, 0..D).
    Returns:
        (N,) bool, True where the token is given.
    """
    D = image_tokens_per_dim
    missing = [k for k in BORDER_KEYS if k not in borders]
    unknown = sorted(set(borders) - set(BORDER_KEYS))
    if missing or unknown:
        raise ValueError(f"borders needs exactly the keys {list(BORDER_KEYS)}; missing {missing}, unknown {unknown}")
    for k in BORDER_KEYS:
        if not isinstance(borders[k], int) or not 0 <= borders[k] <= D:
            raise ValueError(f"borders[{k!r}]={borders[k]!r} must be an int in 0..{D} (token units)")
    r = torch.arange(D)[:, None].expand(D, D)
    c = torch.arange(D)[None, :].expand(D, D)
    m = (r < borders["up"]) | (r >= D - borders["down"]) | (c < borders["left"]) | (c >= D - borders["right"])
    return m.reshape(D * D)


@dataclasses.dataclass
class ImagePrompt:
    """Image tokens that generation keeps fixed (written into the cache, never sampled).

    Attributes:
        codes: (N,) or (B, N) long codes, row-major over the D x D grid (values under a False mask
            are ignored); (B, D, D) grids (what ``VQGAN.encode`` returns) are flattened. A single
            (D, D) grid must be flattened by the caller (2-D means (B, N)).
        mask: (N,), (B, N) or (B, D, D) bool, True = given. Any pattern works (borders, inpainting).
    """

    codes: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        codes, mask = torch.as_tensor(self.codes), torch.as_tensor(self.mask)
        if mask.dtype != torch.bool:
            raise ValueError(f"ImagePrompt.mask must be bool, got {mask.dtype}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"ImagePrompt.codes must be integer codes, got {codes.dtype}")
        self.codes, self.mask = codes.long(), mask

    @classmethod
    def from_borders(cls, codes: torch.Tensor, borders: dict[str, int]) -> ImagePrompt:
        """The reference's border prompt.

        ``codes`` (N,), (B, N) or (B, D, D) (e.g. ``VQGAN.encode`` output), ``borders``
        {'up','down','left','right'} in token units.
        """
        codes = _flat_codes(torch.as_tensor(codes))
        D = math.isqrt(codes.shape[-1])
        if D * D != codes.shape[-1]:
            raise ValueError(f"ImagePrompt codes have {codes.shape[-1]} tokens, not a square grid")
        return cls(codes, border_mask(D, borders))

    def expand(self, batch_size: int, image_tokens_per_dim: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) codes and (B, N) mask on ``device``, validated against the grid and batch."""
        D, N = image_tokens_per_dim, image_tokens_per_dim**2
        out = []
        for name, t in (("codes", self.codes), ("mask", self.mask)):
            t = _flat_codes(t)
            if t.dim() == 1:
                t = t[None]
            if t.dim() != 2 or t.shape[1] != N or t.shape[0] not in (1, batch_size):
                raise ValueError(f"ImagePrompt.{name} has shape {tuple(t.shape)}; expected ({N},) or "
                                 f"({batch_size}, {N}) for a {D}x{D} code grid")
            out.append(t.to(device).expand(batch_size, N))
        return out[0], out[1]


def _flat_codes(t: torch.Tensor) -> torch.Tensor:
    """(B, D, D) -> (B, N); (N,) and (B, N) unchanged."""
    return t.reshape(t.shape[0], -1) if t.dim() == 3 else t


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run with dropout off and restore the caller's train/eval state afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class _CudaGraphStep:
    """A captured fixed-shape step ``fn(*inputs) -> tuple of tensors`` (CUDA only).

    Inputs are copied into fixed buffers and the graph is replayed; the output buffers are reused,
    so the caller consumes them before the next call.
    """

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], example: tuple[torch.Tensor, ...],
                 device: torch.device) -> None:
        self.inputs = tuple(t.clone() for t in example)
        # Warm-up writes keys at the example position, which the real step at that position overwrites.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(*self.inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor | int) -> tuple[torch.Tensor, ...]:
        for buf, x in zip(self.inputs, inputs):
            if isinstance(x, torch.Tensor):
                buf.copy_(x)
            else:
                buf.fill_(x)
        self.graph.replay()
        return self.outputs


def _check_args(model: DalleModel, text_ids: torch.Tensor, top_k: int, top_p: float, temperature: float,
                guidance_scale: float | None, seeds: list[int] | None) -> None:
    T = model.config.text_seq_length
    if not isinstance(text_ids, torch.Tensor) or text_ids.dim() != 2 or text_ids.shape[1] != T:
        shape = tuple(text_ids.shape) if isinstance(text_ids, torch.Tensor) else type(text_ids).__name__
        raise ValueError(f"text_ids must be a (B, {T}) long tensor as the tokenizer makes it, got {shape}")
    if text_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"text_ids must hold integer ids, got {text_ids.dtype}")
    V = model.config.vocab_size
    if text_ids.numel() and (int(text_ids.min()) < 0 or int(text_ids.max()) >= V):
        raise ValueError(f"text_ids must lie in 0..{V - 1} (this model's text vocabulary), got "
                         f"{int(text_ids.min())}..{int(text_ids.max())}; was it made with this model's tokenizer?")
    for name, value in (("top_k", top_k), ("top_p", top_p), ("temperature", temperature),
                        ("guidance_scale", guidance_scale)):
        check_setting(name, value)  # the ranges of SamplingSettings, the same everywhere
    if seeds is not None and len(seeds) != text_ids.shape[0]:
        raise ValueError(f"seeds has {len(seeds)} entries for {text_ids.shape[0]} images; give one seed per image")


def sample_image_codes(model: DalleModel, text_ids: torch.Tensor, *, top_k: int | None = REFERENCE_TOP_K,
                       top_p: float = REFERENCE_TOP_P, temperature: float = 1.0, guidance_scale: float | None = None,
                       image_prompt: ImagePrompt | None = None, generator: torch.Generator | None = None,
                       seeds: list[int] | None = None, progress: ProgressFn | None = None,
                       progress_interval: int = 1, batch_size: int | None = None, static_cache: bool = False,
                       cuda_graph: bool = False, compile: bool = False, free_cache: bool = True,
                       return_perplexity: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Generate image codes for captions with the incremental (KV-cached) transformer.

    Args:
        model: a DalleModel (any dtype/device; dropout is switched off during the call).
        text_ids: (B, T) long, one caption per image as ``BPETokenizer.encode_batch`` makes them.
            Neighbouring rows with the same caption share its text keys/values (computed once).
        top_k: the reference's top-k filter (:func:`filter_logits`); 0 or None disables it.
        top_p: the nucleus mass in (0, 1] (ranges as in :class:`SamplingSettings`).
        temperature: logits are divided by it before the filter.
        guidance_scale: None or 1.0 = plain sampling (1.0 would give the same logits, so the
            unconditional branch is skipped); other s >= 0 = classifier-free guidance with the empty
            caption, cond and uncond rows in one batched forward.
        image_prompt: tokens to keep fixed (:class:`ImagePrompt`).
        generator: draws the per-image seeds when ``seeds`` is None (else torch's default RNG).
        seeds: one int per image; an image depends only on its seed and caption, not on the batch.
        progress: ``progress(step, total, codes_so_far)`` with codes_so_far (b, step) long on the
            model's device (b = the rows of the current batch; a view of the working buffer: read
            or clone it, do not modify it), called every ``progress_interval`` tokens and after the
            last one. An exception raised there stops generation and propagates (cancellation).
        progress_interval: tokens between ``progress`` calls.
        progress_interval: tokens between ``progress`` calls.
        batch_size: generate at most this many images at a time (a new cache per batch).
        static_cache: fixed-shape decode steps (position as a device tensor).
        cuda_graph: capture the static decode step in a CUDA graph and replay it (CUDA only); the
            graph is kept on the model and reused by later calls with the same rows and settings.
        compile: ``torch.compile`` the static decode step (CPU inductor or CUDA), kept and reused
            like the graph; the first call per shape pays the compilation.
        free_cache: empty CUDA's cached blocks when the call ends (once, not per batch). The compiled
            steps and graphs stay on the model for reuse; :func:`clear_decode_sessions` frees them.
        return_perplexity: also return :func:`image_perplexity`-equal scores, computed from the
            generation's own logits (no extra forward).
    Returns:
        (B, N) long codes 0..V-1 row-major; with return_perplexity, (codes, (B,) float ppl).
    """
    top_k = 0 if top_k is None else top_k  # None = no top-k, as 0
    _check_args(model, text_ids, top_k, top_p, temperature, guidance_scale, seeds)
    if cuda_graph and model.image_embeddings.weight.device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model on a CUDA device; leave it off on CPU")
    B, D = text_ids.shape[0], model.config.image_tokens_per_dim
    device = model.image_embeddings.weight.device
    seeds = list(seeds) if seeds is not None else draw_seeds(B, generator)
    keys = seed_keys(seeds, device)
    prompt = image_prompt.expand(B, D, device) if image_prompt is not None else None
    step = batch_size or B
    if guidance_scale is not None and float(guidance_scale) == 1.0:
        guidance_scale = None  # cond + 0 * (cond - uncond) == cond: no need for the uncond rows
    mode = "graph" if cuda_graph else "compile" if compile else "static" if static_cache else "eager"
    settings = dict(top_k=top_k, top_p=float(top_p), temperature=float(temperature), guidance_scale=guidance_scale)
    codes, ppls = [], []
    with eval_mode(model), torch.no_grad():  # no_grad, not inference_mode: callers may edit the codes in place
        for start in range(0, B, step):
            sl = slice(start, start + step)
            c, p = _generate_batch(model, text_ids[sl].to(device).long(), keys[sl],
                                   None if prompt is None else (prompt[0][sl], prompt[1][sl]), **settings,
                                   progress=progress, progress_interval=max(1, int(progress_interval)),
                                   mode=mode, want_ppl=return_perplexity)
            codes.append(c)
            ppls.append(p)
    if free_cache and device.type == "cuda":
        torch.cuda.empty_cache()  # once per call, not per batch
    codes = torch.cat(codes)
    return (codes, torch.cat(ppls)) if return_perplexity else codes


def _prompt_state(prompt: tuple[torch.Tensor, torch.Tensor] | None, b: int, N: int, V: int, device: torch.device
                  ) -> tuple[torch.Tensor, list[bool], bool]:
    """(b, N) codes holding the given tokens, host list of tokens every image knows, masks differ per image."""
    codes = torch.zeros(b, N, dtype=torch.long, device=device)
    if prompt is None:
        return codes, [False] * N, False
    p_codes, p_mask = prompt
    if ((p_codes < 0) | (p_codes >= V))[p_mask].any():
        raise ValueError(f"ImagePrompt.codes must lie in 0..{V - 1} where the mask is True")
    codes = torch.where(p_mask, p_codes, codes)
    known_all = p_mask.all(dim=0).tolist()  # one sync before the loop
    per_image = bool((p_mask.any(dim=0) & ~p_mask.all(dim=0)).any())  # masks differ between images
    return codes, known_all, per_image


def _generate_batch(model: DalleModel, text_ids: torch.Tensor, keys: torch.Tensor,
                    prompt: tuple[torch.Tensor, torch.Tensor] | None, *, top_k: int, top_p: float,
                    temperature: float, guidance_scale: float | None, progress: ProgressFn | None,
                    progress_interval: int, mode: str, want_ppl: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch through the shared-prefix decoder (holst/dalle/decode.py) and the lean sampler.

    The sampler is :func:`sample_tokens_topk`; the reference-exact kernel (attn_impl 'math') keeps
    the per-row cache path :func:`_generate_batch_legacy`.
    """
    if model.attn_impl == "math":
        return _generate_batch_legacy(model, text_ids, keys, prompt, top_k=top_k, top_p=top_p,
                                      temperature=temperature, guidance_scale=guidance_scale, progress=progress,
                                      progress_interval=progress_interval, static_cache=mode != "eager",
                                      cuda_graph=mode == "graph", want_ppl=want_ppl)
    cfg = model.config
    b, N, V = text_ids.shape[0], cfg.image_seq_length, cfg.image_vocab_size
    device = text_ids.device
    codes, known_all, per_image = _prompt_state(prompt, b, N, V, device)
    guided = guidance_scale is not None
    G = text_group_size(text_ids)
    rows = 2 * b if guided else b
    session = _session(model, rows, G, b, mode, top_k, top_p, temperature, guidance_scale)
    session.keys.copy_(keys)
    logits = session.first_logits(text_ids)  # (R, V) predicting image token 0
    ce = torch.zeros(b, N, device=device) if want_ppl else None
    sampled = session.sample(logits, 0)
    with session.guards():
        for j in range(N):
            if known_all[j]:
                tok = codes[:, j]
            else:
                tok = torch.where(prompt[1][:, j], codes[:, j], sampled) if per_image else sampled
                codes[:, j] = tok
            if progress is not None and ((j + 1) % progress_interval == 0 or j == N - 1):
                progress(j + 1, N, codes[:, : j + 1])
            if j == N - 1:
                if want_ppl:
                    ce[:, j] = _token_ce(logits[:b], tok)
                break
            logits, sampled, ce_j = session.step(tok, j, logits[:b])
            if want_ppl:
                ce[:, j] = ce_j
    # The reference scores tokens 1..N-1 (image[0] is predicted from the text, reference.md §2 step 5).
    return codes, (ce_to_ppl(ce[:, 1:]) if want_ppl else None)


def _token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``tokens`` (b,) under ``logits`` (b, V) float: logsumexp - logit. Returns (b,)."""
    return torch.logsumexp(logits, dim=-1) - logits.gather(1, tokens[:, None])[:, 0]


class _DecodeSession:
    """Buffers and the step function of one (rows, settings) shape.

    Kept on the model for the compiled and graph modes so that later calls reuse the compilation or
    the captured graph.

    Args:
        model: the DalleModel; rows: R (2b under guidance); group: G rows per caption; b: images.
        mode: 'eager' (dynamic shapes), 'static', 'compile' (torch.compile of the static step) or
            'graph' (CUDA graph of the static step).
    """

    def __init__(self, model: DalleModel, rows: int, group: int, b: int, mode: str, top_k: int, top_p: float,
                 temperature: float, guidance_scale: float | None) -> None:
        cfg = model.config
        w = model.image_embeddings.weight
        self.model, self.rows, self.group, self.b, self.mode = model, rows, group, b, mode
        self.top_k, self.top_p, self.temperature, self.scale = top_k, top_p, temperature, guidance_scale
        self.D, self.T, self.V = cfg.image_tokens_per_dim, cfg.text_seq_length, cfg.image_vocab_size
        self.offset = 1 if cfg.hf_version == "v2" else 0  # v2: image token j sits at mask pixel j + 1
        self.decoder = Decoder(model, rows, group, w.device, w.dtype)
        self.keys = torch.zeros(b, dtype=torch.long, device=w.device)
        self.salt = vocab_salt_table(self.V, w.device)
        self.index = torch.arange(cfg.image_seq_length, device=w.device)  # step indices as 0-dim tensors
        self.fn: Callable[..., tuple[torch.Tensor, ...]] = self._step
        if mode == "compile":
            # Freezing (see guards()): weights become constants of the compiled graph (bf16 linears
            # packed for oneDNN on CPU), so the session key carries the weights' versions and addresses.
            # A private copy of the step's code object gives this session its own dynamo cache (one
            # entry), so skipping the guard checks after the first call (guards()) cannot pick another
            # session's graph.
            f = _DecodeSession._step
            own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
            self.fn = torch.compile(types.MethodType(own, self), dynamic=False)
        self.calls = 0
        self.graph: _CudaGraphStep | None = None

    def first_logits(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Prefill each distinct caption once (and the empty one under guidance).

        Returns (R, V) float image logits predicting token 0.
        """
        b, G, model = self.b, self.group, self.model
        texts = text_ids[::G]  # (b / G, T) distinct neighbouring captions
        u = texts.shape[0]
        entry_of = list(range(u))
        row_entry = torch.arange(b, device=text_ids.device) // G  # (b,) caption of each image row
        if self.scale is not None:
            texts = torch.cat([texts, empty_caption_ids(1, self.T, text_ids.device)])
            entry_of += [u] * u
            row_entry = torch.cat([row_entry, torch.full_like(row_entry, u)])
        hidden, pixels = self.decoder.prefill_text(texts, entry_of)  # (u', T, H), (u', P - T, H)
        if self.offset == 0:
            return model.image_logits(hidden[:, -1:])[:, 0].float().index_select(0, row_entry)
        x = pixels.index_select(0, row_entry)  # (R, 1, H) the v2 last text token at pixel 0
        return model.image_logits(self.decoder.step(x, self._pixel(0)))[:, 0].float()

    def _pixel(self, p: int) -> int | torch.Tensor:
        return p if self.mode == "eager" else self.index[p]

    def sample(self, logits: torch.Tensor, j: int | torch.Tensor) -> torch.Tensor:
        """(R, V) logits predicting image token j -> (b,) codes."""
        b = self.b
        mixed = guided_logits(logits[:b], logits[b:], self.scale) if self.scale is not None else logits
        return sample_tokens_topk(mixed, self.keys, j, top_k=self.top_k, top_p=self.top_p,
                                  temperature=self.temperature, vocab_salt=self.salt)

    def _step(self, tok: torch.Tensor, j: int | torch.Tensor, prev: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feed image token j (b,), score it under ``prev`` (b, V), predict and sample token j + 1.

        Returns (R, V) logits, (b,) sampled codes and (b,) cross-entropies of ``tok``.
        """
        model, D = self.model, self.D
        ce = _token_ce(prev, tok)
        feed = (tok.repeat(2) if self.scale is not None else tok)[:, None]  # (R, 1)
        jt = self.index[j] if isinstance(j, int) else j  # 0-dim
        x = model.image_embeddings(feed) + model.image_row_embeddings(jt // D) + model.image_col_embeddings(jt % D)
        logits = model.image_logits(self.decoder.step(x, j + self.offset))[:, 0].float()  # (R, V)
        return logits, self.sample(logits, j + 1), ce

    def step(self, tok: torch.Tensor, j: int, prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_step` through the session's mode (eager int position, static tensor, compiled, graph)."""
        if self.mode == "eager":
            return self._step(tok, j, prev)
        if self.mode == "graph":
            if self.graph is None:
                self.graph = _CudaGraphStep(self._step, (tok, self.index[j], prev), tok.device)
            return self.graph(tok, self.index[j], prev)
        self.calls += 1
        return self.fn(tok, self.index[j], prev)

    def guards(self) -> contextlib.AbstractContextManager:
        """Where the loop runs.

        Once a compiled session has run (all guards checked, compiled), later batches keep its shapes
        and objects, so only the differentiating guards run (a guard check costs about as much as a
        small model's whole step on CPU).
        """
        if self.mode != "compile":
            return contextlib.nullcontext()
        from torch._inductor import config as inductor_config

        stack = contextlib.ExitStack()
        # torch.compile(options={"freezing": True}) does not reach inductor's freezing pass (torch 2.13:
        # no weight packing happens); the config patch around the compiling call does.
        stack.enter_context(inductor_config.patch(freezing=True))
        if self.calls > 0:
            stack.enter_context(torch.compiler.set_stance("default", skip_guard_eval_unsafe=True))
        return stack


_SESSIONS_KEPT = 4  # compiled/graph sessions kept per model (least recently used dropped first)


def _session(model: DalleModel, rows: int, group: int, b: int, mode: str, top_k: int, top_p: float,
             temperature: float, guidance_scale: float | None) -> _DecodeSession:
    """A new session (eager/static) or the model's kept one for this shape and settings (compile/graph)."""
    args = (rows, group, b, mode, top_k, top_p, temperature, guidance_scale)
    if mode not in ("compile", "graph"):
        return _DecodeSession(model, *args)
    w = model.image_embeddings.weight
    kept: dict = model.__dict__.setdefault("_holst_decode_sessions", {})
    # in-place updates (optimizer steps) bump versions; replaced tensors (load, .data =) change addresses
    versions = tuple((p._version, p.data_ptr()) for p in model.parameters())
    # inference_mode changes what the compiled step may assume (a new compilation, so a new session)
    key = (*args, w.device, w.dtype, versions, torch.is_inference_mode_enabled())
    if key in kept:
        kept[key] = kept.pop(key)  # most recent last
    else:
        while len(kept) >= _SESSIONS_KEPT:
            kept.pop(next(iter(kept)))
        kept[key] = _DecodeSession(model, *args)
    return kept[key]


def clear_decode_sessions(model: DalleModel) -> None:
    """Drop the compiled steps, CUDA graphs and caches kept on ``model`` by earlier calls."""
    model.__dict__.pop("_holst_decode_sessions", None)


def _generate_batch_legacy(model: DalleModel, text_ids: torch.Tensor, keys: torch.Tensor,
                           prompt: tuple[torch.Tensor, torch.Tensor] | None, *, top_k: int, top_p: float,
                           temperature: float, guidance_scale: float | None, progress: ProgressFn | None,
                           progress_interval: int, static_cache: bool, cuda_graph: bool, want_ppl: bool
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The per-row cache path (holst/dalle/cache.py) with the full filter; the decoder's parity reference.

    Prefill text + known prefix per row, then one decode step per remaining token.
    """
    cfg = model.config
    b, N, P, V = text_ids.shape[0], cfg.image_seq_length, model.num_text_positions, cfg.image_vocab_size
    device = text_ids.device
    guided = guidance_scale is not None
    if guided:  # rows 0..b-1 conditional, b..2b-1 unconditional: one batched forward per step
        text_ids = torch.cat([text_ids, empty_caption_ids(b, cfg.text_seq_length, device)])
    rows = text_ids.shape[0]
    codes, known_all, per_image = _prompt_state(prompt, b, N, V, device)
    n0 = 0  # tokens known to every image from the start go through the prefill in one pass
    while n0 < N - 1 and known_all[n0]:
        n0 += 1

    cache = model.new_cache(rows, static=static_cache)
    prefix = codes[:, :n0].repeat(2, 1) if guided else codes[:, :n0]
    hidden = model.prefill(text_ids, prefix, cache)
    logits_prefix = model.image_logits(hidden[:, P - 1 :]).float()  # (R, n0 + 1, V): predict tokens 0..n0
    ce = torch.zeros(b, N, device=device) if want_ppl else None
    if want_ppl and n0 > 0:
        ce[:, :n0] = F.cross_entropy(logits_prefix[:b, :n0].transpose(1, 2), codes[:, :n0], reduction="none")
    salt = vocab_salt_table(V, device)

    def sample(logits: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
        """(R, V) logits predicting image token ``step`` -> (b,) sampled codes."""
        mixed = guided_logits(logits[:b], logits[b:], guidance_scale) if guided else logits
        return sample_tokens(mixed, keys, step, top_k=top_k, top_p=top_p, temperature=temperature, vocab_salt=salt)

    def decode(feed: torch.Tensor, index: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed token ``index`` (R, 1) -> logits (R, V) predicting index + 1 and a sample of it."""
        logits = model.image_logits(model.decode_step(feed, index, cache))[:, 0].float()
        return logits, sample(logits, index + 1)

    # A captured step holds the layers, the head and the sampler: one replay per token, no host sync.
    graph_step = None
    if cuda_graph and n0 < N - 1:
        example = (torch.zeros(rows, 1, dtype=torch.long, device=device), cache.index_table[n0])
        graph_step = _CudaGraphStep(decode, example, device)
    logits = logits_prefix[:, -1]  # (R, V) predicting token n0
    sampled = None if known_all[n0] else sample(logits, n0)
    for j in range(n0, N):
        if known_all[j]:
            tok = codes[:, j]
        else:
            tok = torch.where(prompt[1][:, j], codes[:, j], sampled) if per_image else sampled
            codes[:, j] = tok
        if want_ppl:
            ce[:, j] = F.cross_entropy(logits[:b], tok, reduction="none")
        if progress is not None and ((j + 1) % progress_interval == 0 or j == N - 1):
            progress(j + 1, N, codes[:, : j + 1])
        if j == N - 1:
            break
        feed = (tok.repeat(2) if guided else tok)[:, None]  # (R, 1)
        if graph_step is not None:
            logits, sampled = graph_step(feed, j)
        elif known_all[j + 1]:  # the next token is given: skip the sampler
            index = cache.index_table[j] if static_cache else j
            logits = model.image_logits(model.decode_step(feed, index, cache))[:, 0].float()
        else:
            logits, sampled = decode(feed, cache.index_table[j] if static_cache else j)
    # The reference scores tokens 1..N-1 (image[0] is predicted from the text, reference.md §2 step 5).
    return codes, (ce_to_ppl(ce[:, 1:]) if want_ppl else None)


def partial_grid(codes_so_far: torch.Tensor, image_tokens_per_dim: int, fill: int | torch.Tensor = 0) -> torch.Tensor:
    """A preview grid from a progress callback's codes (min-dalle style progressive output).

    Args:
        codes_so_far: (b, step) long, the first ``step`` image codes (row-major).
        image_tokens_per_dim: D.
        fill: what the not-yet-generated slots hold: one code, or (N,)/(b, N) codes (e.g. a prompt's).
    Returns:
        (b, D, D) long, ready for ``VQGAN.decode``.
    """
    b, step = codes_so_far.shape
    N = image_tokens_per_dim**2
    if step > N:
        D = image_tokens_per_dim
        raise ValueError(f"codes_so_far has {step} tokens; a {D}x{D} grid holds {N}")
    if isinstance(fill, torch.Tensor):
        grid = fill.to(codes_so_far.device, torch.long).expand(b, N).clone()
    else:
        grid = torch.full((b, N), int(fill), dtype=torch.long, device=codes_so_far.device)
    grid[:, :step] = codes_so_far
    return grid.view(b, image_tokens_per_dim, image_tokens_per_dim)


# --------------------------------------------------------------------------------------------
# Ranking by the model's own perplexity
# --------------------------------------------------------------------------------------------


def ce_to_ppl(ce: torch.Tensor) -> torch.Tensor:
    """The reference's ``ce_to_ppl``: per row, the mean of exp(CE) over positions whose CE is not 0.

    Args:
        ce: (B, n) per-token cross-entropies.
    Returns:
        (B,) float; rows with no non-zero CE give 0 (the reference would crash there).
    """
    nonzero = ce != 0
    total = torch.where(nonzero, ce.exp(), torch.zeros_like(ce)).sum(dim=1)
    return total / nonzero.sum(dim=1).clamp(min=1)


def image_perplexity(model: DalleModel, text_ids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The model's perplexity of each image given its caption (lower = better), as the reference ranks.

    One uncached forward; tokens 1..N-1 are scored, each from the position that predicts it. This
    matches the reference for v3 and fixes its v2 off-by-one (there the reference compares the
    logits that predict image[j] with image[j + 1]; reference.md §2 step 5).

    Args:
        model: a DalleModel.
        text_ids: (B, T) long captions.
        codes: (B, N) long image codes.
    Returns:
        (B,) float32 perplexities (:func:`ce_to_ppl`).
    """
    cfg = model.config
    N, P = cfg.image_seq_length, model.num_text_positions
    if codes.dim() != 2 or codes.shape[1] != N or codes.shape[0] != text_ids.shape[0]:
        raise ValueError(f"codes must be ({text_ids.shape[0]}, {N}) long, got {tuple(codes.shape)}")
    device = model.image_embeddings.weight.device
    with eval_mode(model), torch.no_grad():  # no_grad, not inference_mode: callers may edit the codes in place
        ids = torch.cat([text_ids.to(device).long(), codes.to(device).long()], dim=1)
        hidden = model.hidden_states(ids)  # (B, S, H)
        logits = model.image_logits(hidden[:, P : P + N - 1]).float()  # predicts image tokens 1..N-1
        ce = F.cross_entropy(logits.transpose(1, 2), codes[:, 1:].to(device), reduction="none")  # (B, N-1)
    return ce_to_ppl(ce)
