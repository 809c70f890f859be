"""Typed configuration dataclasses for every holst component.

Each component has one dataclass, validated in ``__post_init__`` with messages that name the
option and its allowed values. Configs are saved with every checkpoint (``config.json``) and can
be read from / written to YAML. YAML holds values only, never import paths.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C", bound="ConfigBase")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def check_choice(name: str, value: Any, allowed: tuple | list) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is one of ``allowed`` (True is not 1)."""
    is_bool = isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed)
    _check(value in allowed and not is_bool, f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is > 0 (or >= 0 with allow_zero)."""
    ok = value >= 0 if allow_zero else value > 0
    _check(ok, f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def check_int(name: str, value: Any, low: int, high: int) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is an int (not a bool) in [low, high].

    Model sizes are bounded so that a typo (2**30 hidden units, 10**6 layers) is an error message,
    not minutes of allocation or an out-of-memory kill.
    """
    _check(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
           f"{name}={value!r} must be an integer in [{low}, {high}]")


def check_bool(name: str, value: Any) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is True or False (not 0/1, not 'yes')."""
    _check(isinstance(value, bool), f"{name}={value!r} must be true or false")


def check_prob(name: str, value: float) -> None:
    """Raise ConfigError naming ``name`` unless 0 <= value <= 1."""
    _check(0.0 <= value <= 1.0, f"{name}={value!r} must lie in [0, 1]")


@dataclasses.dataclass
class ConfigBase:
    """Shared (de)serialisation for config dataclasses: dict, JSON and YAML round trips."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (tuples become lists), JSON/YAML serialisable."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from a dict; unknown keys raise ConfigError naming them and the known keys."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown option(s) {unknown}; known options: {sorted(names)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                value = data[f.name]
                if isinstance(value, list) and "tuple" in str(f.type):
                    value = tuple(value)
                kwargs[f.name] = value
        return cls(**kwargs)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def save_json(self, path: str | Path) -> None:
        """Write the config as indented JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load_json(cls: type[C], path: str | Path) -> C:
        """Read a config written by :meth:`save_json`; errors name the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        return cls.from_dict(data)

    def save_yaml(self, path: str | Path) -> None:
        """Write the config as YAML."""
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), allow_unicode=True, sort_keys=False), encoding="utf-8")

    @classmethod
    def load_yaml(cls: type[C], path: str | Path) -> C:
        """Read a YAML file of values (safe loader: YAML never constructs objects)."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        return cls.from_dict(data)


# --------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------


# The largest ruDALL-E (Kandinsky) has 12B parameters; a config far beyond is a typo, not a model.
MAX_MODEL_PARAMETERS = 200 * 10**9


@dataclasses.dataclass
class DalleConfig(ConfigBase):
    """The ruDALL-E transformer (``research/reference.md`` §1).

    Field names follow the reference's ``model_params`` so that its model table maps 1:1.
    ``vocab_size`` counts the text embedding rows: BPE ids plus ``text_seq_length`` position-specific
    pad ids (16384 + 128 = 16512 for the official models).
    """

    num_layers: int = 24
    hidden_size: int = 2048
    num_attention_heads: int = 16
    embedding_dropout_prob: float = 0.1
    attention_dropout_prob: float = 0.1
    output_dropout_prob: float = 0.1
    text_seq_length: int = 128
    image_tokens_per_dim: int = 32
    vocab_size: int = 16384 + 128
    image_vocab_size: int = 8192
    loss_img_weight: float = 7.0
    cogview_sandwich_layernorm: bool = True
    cogview_pb_relax: bool = True
    mlp_activation: str = "gelu_jit"
    hf_version: str = "v3"
    layernorm_eps: float = 1e-5
    # v3's reference loss scores image[0] against the *text* vocabulary (reference.md §1.6).
    # Off by default: the last text position then predicts image[0] in the image vocabulary.
    v3_reference_loss: bool = False
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for name, high in (("num_layers", 512), ("hidden_size", 32768), ("num_attention_heads", 1024),
                           ("text_seq_length", 8192), ("image_tokens_per_dim", 256), ("vocab_size", 1 << 22),
                           ("image_vocab_size", 1 << 20), ("mlp_ratio", 64)):
            check_int(name, getattr(self, name), 1, high)
        for name in ("cogview_sandwich_layernorm", "cogview_pb_relax", "v3_reference_loss"):
            check_bool(name, getattr(self, name))
        _check(self.hidden_size % self.num_attention_heads == 0,
               f"hidden_size={self.hidden_size} must be divisible by num_attention_heads={self.num_attention_heads}")
        for name in ("embedding_dropout_prob", "attention_dropout_prob", "output_dropout_prob"):
            check_prob(name, getattr(self, name))
        check_positive("loss_img_weight", self.loss_img_weight, allow_zero=True)
        check_positive("layernorm_eps", self.layernorm_eps)
        check_choice("mlp_activation", self.mlp_activation, ("gelu_jit", "gelu", "gelu_tanh"))
        check_choice("hf_version", self.hf_version, ("v2", "v3"))
        _check(self.vocab_size > self.text_seq_length,
               f"vocab_size={self.vocab_size} must exceed text_seq_length={self.text_seq_length} "
               "(the last text_seq_length rows are the position-specific pad ids)")
        _check(self.num_parameters() <= MAX_MODEL_PARAMETERS,
               f"this DalleConfig has {self.num_parameters() / 1e9:.0f}B parameters, more than "
               f"{MAX_MODEL_PARAMETERS / 1e9:.0f}B: check num_layers / hidden_size")

    # Derived sizes -------------------------------------------------------------------------
    @property
    def image_seq_length(self) -> int:
        """Number of image tokens N = image_tokens_per_dim ** 2."""
        return self.image_tokens_per_dim**2

    @property
    def total_seq_length(self) -> int:
        """text_seq_length + N (1152 for the official models)."""
        return self.text_seq_length + self.image_seq_length

    @property
    def total_vocab_size(self) -> int:
        """Logit width: text vocabulary then image vocabulary (24704 for the official models)."""
        return self.vocab_size + self.image_vocab_size

    @property
    def bpe_vocab_size(self) -> int:
        """Number of real BPE ids (vocab_size minus the position-specific pad ids)."""
        return self.vocab_size - self.text_seq_length

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self) -> int:
        """Parameter count of a model with this config (masks excluded)."""
        h, L = self.hidden_size, self.num_layers
        emb = (self.vocab_size + self.image_vocab_size + self.text_seq_length + 1 + 2 * self.image_tokens_per_dim) * h
        r = self.mlp_ratio
        per_layer = (3 * h * h + 3 * h) + (h * h + h) + 2 * (r * h * h) + r * h + h + 4 * 2 * h
        head = 2 * h + self.total_vocab_size * h + self.total_vocab_size + 2 * h
        return emb + L * per_layer + head


# --------------------------------------------------------------------------------------------
# CLIP (ranking)
# --------------------------------------------------------------------------------------------

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass
class ClipConfig(ConfigBase):
    """The ruCLIP / OpenAI-CLIP ViT model (``research/reference.md`` §5).

    Field names are the official ``config.json`` keys of ruCLIP, so that file maps 1:1 (plus
    ``mean``/``std``, which ruCLIP's processor reads from the same file). ``vision_heads`` 0 means
    the official rule ``vision_width // 64``. Defaults are ruclip-vit-base-patch32-384.
    """

    embed_dim: int = 512
    image_resolution: int = 384
    vision_layers: int = 12
    vision_width: int = 768
    vision_patch_size: int = 32
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12
    vision_heads: int = 0
    eos_id: int = 3
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        for name, high in (("embed_dim", 16384), ("image_resolution", 4096), ("vision_layers", 256),
                           ("vision_width", 16384), ("vision_patch_size", 1024), ("context_length", 8192),
                           ("vocab_size", 1 << 22), ("transformer_width", 16384), ("transformer_heads", 1024),
                           ("transformer_layers", 256)):
            check_int(name, getattr(self, name), 1, high)
        _check(self.image_resolution % self.vision_patch_size == 0,
               f"image_resolution={self.image_resolution} must be divisible by "
               f"vision_patch_size={self.vision_patch_size}")
        check_int("vision_heads", self.vision_heads, 0, 1024)  # 0 = vision_width // 64
        _check(self.num_vision_heads > 0 and self.vision_width % self.num_vision_heads == 0,
               f"vision_width={self.vision_width} must be divisible by the vision head count {self.num_vision_heads} "
               "(set vision_heads, or use a width that is a multiple of 64)")
        _check(self.transformer_width % self.transformer_heads == 0,
               f"transformer_width={self.transformer_width} must be divisible by "
               f"transformer_heads={self.transformer_heads}")
        check_int("eos_id", self.eos_id, 0, self.vocab_size - 1)
        for name in ("mean", "std"):
            value = tuple(getattr(self, name))
            _check(len(value) == 3 and all(isinstance(v, (int, float)) for v in value),
                   f"{name}={value!r} must be three numbers (one per RGB channel)")
            setattr(self, name, tuple(float(v) for v in value))
        _check(all(s > 0 for s in self.std), f"std={self.std!r} must be positive")

    @property
    def num_vision_heads(self) -> int:
        """Vision attention heads: ``vision_heads``, or the official ``vision_width // 64``."""
        return self.vision_heads or self.vision_width // 64

    @property
    def grid_size(self) -> int:
        """Patches per side: image_resolution // vision_patch_size."""
        return self.image_resolution // self.vision_patch_size


# --------------------------------------------------------------------------------------------
# VQGAN image tokenizer
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class VQGANConfig(ConfigBase):
    """The taming-style VQGAN image tokenizer (``research/reference.md`` §4).

    The ``ddconfig`` field names and defaults are those of the Sber yml (ch 128, ch_mult 1,1,2,4,
    2 res blocks, attention at 32x32, z 256, 8192 codes of width 256), so the official checkpoint
    and smaller models in the same layout map 1:1. ``quantizer``: 'gumbel' (Sber's GumbelQuantize,
    logits ``quantize.proj`` + table ``quantize.embed``), 'vq' (nearest neighbour + commitment loss)
    or 'ema' (nearest neighbour, EMA codebook updates, dead-code restarts; trains most easily on
    small data). ``decoder``: 'plain' or 'dwt' (12-channel decoder + Haar IDWT, output twice the size).
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (32,)
    z_channels: int = 256
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    double_z: bool = False
    n_embed: int = 8192
    embed_dim: int = 256
    quantizer: str = "gumbel"
    decoder: str = "plain"
    norm_groups: int = 32
    kl_weight: float = 1e-8
    beta: float = 0.25
    ema_decay: float = 0.99

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        for name, high in (("ch", 4096), ("num_res_blocks", 64), ("z_channels", 16384), ("resolution", 16384),
                           ("in_channels", 16), ("out_ch", 16), ("n_embed", 1 << 20), ("embed_dim", 16384),
                           ("norm_groups", 4096)):
            check_int(name, getattr(self, name), 1, high)
        _check(1 <= len(self.ch_mult) <= 12 and all(isinstance(m, int) and not isinstance(m, bool) and 0 < m <= 64
                                                     for m in self.ch_mult),
               f"ch_mult={self.ch_mult!r} must be 1 to 12 integers in [1, 64]")
        check_bool("double_z", self.double_z)
        for m in (1, *self.ch_mult):
            _check((self.ch * m) % self.norm_groups == 0,
                   f"ch={self.ch} x ch_mult {m} is not divisible by norm_groups={self.norm_groups} (GroupNorm)")
        check_prob("dropout", self.dropout)
        check_choice("quantizer", self.quantizer, ("gumbel", "vq", "ema"))
        check_choice("decoder", self.decoder, ("plain", "dwt"))
        check_positive("kl_weight", self.kl_weight, allow_zero=True)
        check_positive("beta", self.beta, allow_zero=True)
        _check(0.0 < self.ema_decay < 1.0, f"ema_decay={self.ema_decay!r} must lie in (0, 1)")
        _check(self.in_channels == 3 and self.out_ch == 3,
               f"in_channels={self.in_channels}, out_ch={self.out_ch}: holst images are RGB (3 channels)")

    @property
    def downsample_factor(self) -> int:
        """f: the side of the image patch one code stands for (8 for Sber)."""
        return 2 ** (len(self.ch_mult) - 1)


# --------------------------------------------------------------------------------------------
# Training (engine + trainers; owner: training)
# --------------------------------------------------------------------------------------------

TRAIN_BACKENDS = ("auto", "single", "ddp", "fsdp", "deepspeed")
TRAIN_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclasses.dataclass
class TrainConfig(ConfigBase):
    """Options shared by every trainer: the engine (backend, precision, accumulation, clipping),
    the optimizer (AdamW, no decay on norms/biases/embeddings), the schedule (warm-up + cosine),
    logging and checkpointing. Stage trainers subclass it to add their own fields.

    ``batch_size`` is the micro-batch of one process; the global batch is
    ``batch_size * grad_accum * world_size``. ``precision='auto'``: bf16 autocast on GPUs that
    support it and on CPUs with native bf16 (AVX512-BF16/AMX), fp16 with dynamic loss scaling on
    the other GPUs, fp32 on the other CPUs. ``compile``: run the model under ``torch.compile``
    (the first steps are slower while it compiles).
    """

    backend: str = "auto"
    precision: str = "auto"
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    out_dir: str = "runs/train"
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    optimizer: str = "adamw"
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    gradient_checkpointing: bool = False
    log_every: int = 10
    save_every: int = 500
    sample_every: int = 0
    tensorboard: bool = True
    num_threads: int = 0
    loss_scale_init: float = 2.0**16
    loss_scale_window: int = 400
    zero_stage: int = 2
    fsdp_reshard_after_forward: bool = True
    ddp_find_unused_parameters: bool = False
    ddp_broadcast_buffers: bool = False

    def __post_init__(self) -> None:
        check_choice("backend", self.backend, TRAIN_BACKENDS)
        check_choice("precision", self.precision, TRAIN_PRECISIONS)
        _check(isinstance(self.compile, bool), f"compile={self.compile!r} must be true or false")
        check_choice("optimizer", self.optimizer, ("adamw", "adam", "sgd"))
        check_choice("zero_stage", self.zero_stage, (0, 1, 2, 3))
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "loss_scale_window"):
            check_int(name, getattr(self, name), 1, 10**12)
        for name in ("warmup_steps", "save_every", "sample_every", "num_threads", "seed"):
            check_int(name, getattr(self, name), 0, 2**63 - 1)
        for name in ("gradient_checkpointing", "tensorboard", "fsdp_reshard_after_forward",
                     "ddp_find_unused_parameters", "ddp_broadcast_buffers"):
            check_bool(name, getattr(self, name))
        check_positive("lr", self.lr)
        check_prob("min_lr_ratio", self.min_lr_ratio)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("grad_clip", self.grad_clip, allow_zero=True)
        check_positive("eps", self.eps)
        check_positive("loss_scale_init", self.loss_scale_init)
        _check(0.0 <= self.ema_decay < 1.0, f"ema_decay={self.ema_decay!r} must lie in [0, 1) (0 = off)")
        _check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
               f"betas={self.betas!r} must be two numbers in [0, 1)")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]


# --------------------------------------------------------------------------------------------
# Pipeline (pipeline.json) and server
# --------------------------------------------------------------------------------------------

PIPELINE_COMPONENTS = ("tokenizer", "vqgan", "dalle", "clip", "superres")
REQUIRED_COMPONENTS = ("tokenizer", "vqgan", "dalle")


@dataclasses.dataclass
class PipelineConfig(ConfigBase):
    """``pipeline.json`` of a pipeline directory: its components, sampling defaults and model card.

    ``top_k`` 0 and ``top_p`` 1.0 switch the filters off; ``guidance_scale`` None (or 1.0) means no
    classifier-free guidance; ``rerank`` 0 keeps every image; ``upscale`` 1 keeps the VQGAN size.
    """

    format_version: int = 1
    components: tuple[str, ...] = REQUIRED_COMPONENTS
    num_images: int = 4
    top_k: int = 2048  # the reference's README / Emojich settings (holst.sampling.REFERENCE_TOP_K/P)
    top_p: float = 0.995
    temperature: float = 1.0
    guidance_scale: float | None = None
    rerank: int = 0
    upscale: int = 1
    batch_size: int = 8
    # Model card: plain facts shown by `holst serve` and written to the README of the directory.
    name: str = ""
    description: str = ""
    language: str = "ru"
    license: str = "Apache-2.0"
    training_data: str = ""
    created_by: str = "holst"

    def __post_init__(self) -> None:
        _check(self.format_version == 1, f"format_version={self.format_version!r} is not supported; this holst reads 1")
        self.components = tuple(self.components)
        for name in self.components:
            check_choice("components entry", name, PIPELINE_COMPONENTS)
        for name in REQUIRED_COMPONENTS:
            _check(name in self.components, f"components={list(self.components)} must include {name!r}")
        for name in ("num_images", "batch_size", "upscale"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                   f"{name}={getattr(self, name)!r} must be a positive integer")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k={self.top_k!r} must be an integer >= 0")
        _check(0.0 < self.top_p <= 1.0, f"top_p={self.top_p!r} must lie in (0, 1]")
        check_positive("temperature", self.temperature)
        if self.guidance_scale is not None:
            check_positive("guidance_scale", self.guidance_scale)
        _check(isinstance(self.rerank, int) and self.rerank >= 0, f"rerank={self.rerank!r} must be an integer >= 0")


@dataclasses.dataclass
class ServeConfig(ConfigBase):
    """``holst serve``: binding, batching, limits (``holst/serve/``, ``docs/serve.md``).

    A host other than loopback needs ``token`` (sent as ``Authorization: Bearer <token>``).
    Jobs beyond ``max_queue`` are answered 503 with ``Retry-After: retry_after_s``. Slow clients: each
    request's headers must arrive within ``header_timeout_s`` and its body within ``body_timeout_s``;
    one client address holds at most ``max_connections_per_client`` connections (its oldest idle one
    is closed for a new one), all clients together ``max_connections``. ``workers`` > 1 runs that
    many server processes, each with its own copy of the model and its own queue.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_queue: int = 64
    max_batch_images: int = 16
    batch_window_ms: float = 25.0
    max_images_per_request: int = 16
    max_prompt_chars: int = 500
    max_body_bytes: int = 262144  # room for a base64 image prompt
    max_upscale: int = 4
    request_timeout_s: float = 600.0
    retry_after_s: int = 5
    preview_every: int = 0
    max_stored_images: int = 512
    max_connections: int = 256
    max_connections_per_client: int = 64
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    workers: int = 1

    def __post_init__(self) -> None:
        _check(isinstance(self.host, str) and self.host != "", "host must be a non-empty string")
        _check(isinstance(self.port, int) and 0 <= self.port < 65536, f"port={self.port!r} must lie in [0, 65535]")
        for name in ("max_queue", "max_batch_images", "max_images_per_request", "max_prompt_chars",
                     "max_body_bytes", "max_upscale", "retry_after_s", "max_stored_images", "max_connections",
                     "max_connections_per_client", "workers"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                   f"{name}={getattr(self, name)!r} must be a positive integer")
        check_positive("batch_window_ms", self.batch_window_ms, allow_zero=True)
        check_positive("request_timeout_s", self.request_timeout_s)
        check_positive("header_timeout_s", self.header_timeout_s)
        check_positive("body_timeout_s", self.body_timeout_s)
        _check(isinstance(self.preview_every, int) and self.preview_every >= 0,
               f"preview_every={self.preview_every!r} must be an integer >= 0 (0 = once per image row)")
        if self.token is not None:
            _check(isinstance(self.token, str) and len(self.token) >= 8, "token must be a string of >= 8 characters")
        loopback = self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")
        _check(loopback or self.token is not None,
               f"host={self.host!r} is not loopback: set a token (--token or HOLST_TOKEN) so that "
               "strangers cannot use the server")


# --------------------------------------------------------------------------------------------
# Super-resolution (owner: superres)
# --------------------------------------------------------------------------------------------

SUPERRES_SCALES = (1, 2, 4, 8)


@dataclasses.dataclass
class SuperResConfig(ConfigBase):
    """Real-ESRGAN's RRDBNet (``research/reference.md`` §6); defaults are RealESRGAN_x4plus.

    ``scale`` 2 (and 1) fold the input with pixel_unshuffle as upstream basicsr does; 8 adds a third
    upsampling conv (``conv_up3``, ru-dalle's x8 model).
    """

    num_in_ch: int = 3
    num_out_ch: int = 3
    num_feat: int = 64
    num_block: int = 23
    num_grow_ch: int = 32
    scale: int = 4

    def __post_init__(self) -> None:
        for name, high in (("num_in_ch", 16), ("num_out_ch", 16), ("num_feat", 4096), ("num_grow_ch", 4096)):
            check_int(name, getattr(self, name), 1, high)
        check_int("num_block", self.num_block, 0, 1024)
        check_choice("scale", self.scale, SUPERRES_SCALES)


SUPERRES_DEGRADATIONS = ("auto", "vqgan", "classic")


@dataclasses.dataclass
class SuperResTrainConfig(TrainConfig):
    """``holst train superres``: fine-tune (``init``) or train an RRDBNet on (LR, HR) pairs made on the fly.

    HR = random ``hr_size`` crops of the images under ``data`` (read by holst.data, resized and
    centre-cropped to ``image_size``; 0 = ``hr_size``); LR = the crop shrunk by ``scale`` and
    degraded. ``degradation``: 'vqgan' round-trips LR through the VQGAN at ``vqgan`` (what the
    pipeline's decoder produces), 'classic' applies blur + noise + JPEG, 'auto' = 'vqgan' when
    ``vqgan`` is set, else 'classic'. ``classic_prob``: share of 'vqgan' batches degraded classically.
    Without ``init``, the architecture fields below build a fresh model.
    """

    out_dir: str = "runs/superres"
    batch_size: int = 4
    max_steps: int = 2000
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 0.0
    data: str = ""
    init: str = ""
    scale: int = 4
    num_feat: int = 64
    num_block: int = 23
    num_grow_ch: int = 32
    hr_size: int = 128
    image_size: int = 0
    degradation: str = "auto"
    vqgan: str = ""
    classic_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.2, 1.5)
    noise_std: tuple[float, float] = (0.0, 0.03)
    jpeg_quality: tuple[int, int] = (40, 95)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("scale", self.scale, SUPERRES_SCALES)
        check_choice("degradation", self.degradation, SUPERRES_DEGRADATIONS)
        _check(self.degradation != "vqgan" or bool(self.vqgan), "degradation='vqgan' needs vqgan=<VQGAN directory>")
        for name in ("num_feat", "num_grow_ch", "hr_size"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                   f"{name}={getattr(self, name)!r} must be a positive integer")
        _check(isinstance(self.num_block, int) and self.num_block >= 0, f"num_block={self.num_block!r} must be >= 0")
        _check(isinstance(self.image_size, int) and (self.image_size == 0 or self.image_size >= self.hr_size),
               f"image_size={self.image_size!r} must be 0 (= hr_size) or an integer >= hr_size={self.hr_size}")
        unit = self.scale * {1: 4, 2: 2}.get(self.scale, 1)
        _check(self.hr_size % unit == 0, f"hr_size={self.hr_size} must be a multiple of {unit} for scale={self.scale}")
        check_prob("classic_prob", self.classic_prob)
        for name, low in (("blur_sigma", 0.0), ("noise_std", 0.0), ("jpeg_quality", 1)):
            value = tuple(getattr(self, name))
            _check(len(value) == 2 and low <= value[0] <= value[1],
                   f"{name}={value!r} must be two numbers [min, max] with {low} <= min <= max")
            setattr(self, name, value)
        _check(self.jpeg_quality[1] <= 100, f"jpeg_quality={self.jpeg_quality!r}: qualities lie in [1, 100]")


# --------------------------------------------------------------------------------------------
# Text tokenizer
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TokenizerConfig(ConfigBase):
    """How a BPE text tokenizer is trained and how captions become ``text_ids`` (reference.md §3).

    ``vocab_size`` counts every BPE id including the four special ids (16384 for ruDALL-E's
    ``bpe.model``). ``keep_eos=False`` is ruDALL-E's convention (a caption that is too long loses its
    eos); ``keep_eos=True`` is ruCLIP's (the last kept id is always eos). ``bpe_dropout`` is the
    training-time BPE-dropout probability; inference always encodes with 0. ``coverage`` is
    YouTokenToMe's character coverage used when training: the rarest characters covering at most
    ``1 - coverage`` of the text are left out of the alphabet (they encode as unk).
    """

    vocab_size: int = 16384
    text_seq_length: int = 128
    lowercase: bool = True
    keep_eos: bool = False
    bpe_dropout: float = 0.0
    coverage: float = 1.0

    def __post_init__(self) -> None:
        _check(isinstance(self.vocab_size, int) and self.vocab_size >= 2,
               f"vocab_size={self.vocab_size!r} must be an integer >= 2 (at least unk and '▁')")
        _check(isinstance(self.text_seq_length, int) and self.text_seq_length >= 2,
               f"text_seq_length={self.text_seq_length!r} must be an integer >= 2 (room for bos and eos)")
        check_choice("lowercase", self.lowercase, (True, False))
        check_choice("keep_eos", self.keep_eos, (True, False))
        check_prob("bpe_dropout", self.bpe_dropout)
        _check(0.0 < self.coverage <= 1.0, f"coverage={self.coverage!r} must lie in (0, 1]")


@dataclasses.dataclass
class DalleTrainConfig(TrainConfig):
    """``holst train dalle``: train the transformer from scratch or fine-tune a converted checkpoint.

    Data: ``codes`` (pre-computed code shards, globs allowed) or ``images`` (a dataset folder) encoded
    on the fly with the VQGAN in ``vqgan``. Captions go through BPE-dropout (``bpe_dropout``) and are
    emptied with probability ``empty_caption_prob`` so classifier-free guidance works.
    Fine-tuning: ``init_from`` (a DalleModel directory), ``freeze`` (globs over parameter names,
    e.g. the Emojich recipe ``transformer.layers.*.attention.*`` + ``transformer.layers.*.mlp.*``),
    ``loss_img_weight`` (>= 0 overrides the model's; Emojich used 1000), LoRA (``lora_rank`` > 0).
    """

    model: str = "emoji"
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    init_from: str = ""
    attn_impl: str = "sdpa"
    tokenizer: str = ""
    codes: list[str] = dataclasses.field(default_factory=list)
    images: str = ""
    vqgan: str = ""
    langs: list[str] = dataclasses.field(default_factory=list)
    bpe_dropout: float = 0.1
    empty_caption_prob: float = 0.1
    loss_img_weight: float = -1.0
    freeze: list[str] = dataclasses.field(default_factory=list)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: [
        "*.attention.query_key_value", "*.attention.dense", "*.mlp.dense_h_to_4h", "*.mlp.dense_4h_to_h"])
    sample_prompts: list[str] = dataclasses.field(default_factory=list)
    sample_top_k: int = 256
    sample_top_p: float = 0.99
    save_dtype: str = "fp32"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("attn_impl", self.attn_impl, ("sdpa", "math", "sparse"))
        check_choice("save_dtype", self.save_dtype, ("fp32", "bf16", "fp16"))
        check_prob("bpe_dropout", self.bpe_dropout)
        check_prob("empty_caption_prob", self.empty_caption_prob)
        check_prob("lora_dropout", self.lora_dropout)
        _check(isinstance(self.lora_rank, int) and self.lora_rank >= 0, f"lora_rank={self.lora_rank!r} must be >= 0")
        check_positive("lora_alpha", self.lora_alpha)
        _check(isinstance(self.sample_top_k, int) and self.sample_top_k >= 0,
               f"sample_top_k={self.sample_top_k!r} must be an integer >= 0")
        check_prob("sample_top_p", self.sample_top_p)
        _check(isinstance(self.model_overrides, dict), f"model_overrides={self.model_overrides!r} must be a mapping")
        if isinstance(self.codes, str):
            self.codes = [self.codes]
        for name in ("codes", "langs", "freeze", "lora_targets", "sample_prompts"):
            value = getattr(self, name)
            _check(isinstance(value, list) and all(isinstance(v, str) for v in value),
                   f"{name}={value!r} must be a list of strings")
        _check(not (self.codes and self.images), "give either codes (code shards) or images (+ vqgan), not both")
        _check(not self.images or bool(self.vqgan), "images= needs vqgan= (a VQGAN directory) to encode on the fly")


@dataclasses.dataclass
class ClipTrainConfig(TrainConfig):
    """``holst train clip``: contrastive training of a CLIP on image-caption pairs (our BPE tokenizer).

    ``preset`` + ``model_overrides`` give the ClipConfig (``holst.rerank.clip.CLIP_PRESETS``);
    ``init_from`` fine-tunes an existing CLIP directory instead (e.g. a converted ruCLIP, whose own
    tokenizer is then used). ``data`` is a dataset directory of holst.data; ``eval_splits`` are its
    held-out splits, on which image->text and text->image R@1 / R@5 are reported. ``caption_lang``
    'both' pairs each image with a random one of its captions (e.g. Russian or English) each time.
    ``tokenizer``: a tokenizer directory / bpe.model file, or None to train one on the training
    captions with ``tokenizer_vocab_size`` ids. ``max_minutes`` > 0 stops training after that
    wall-clock time (the schedule still assumes ``max_steps``).
    """

    out_dir: str = "runs/clip"
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    preset: str = "emoji64"
    model_overrides: dict = dataclasses.field(default_factory=dict)
    init_from: str | None = None
    data: str = "data/emoji"
    train_split: str = "train"
    eval_splits: tuple[str, ...] = ("test_concept", "test_style")
    caption_lang: str = "both"
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 2048
    bpe_dropout: float = 0.0
    eval_every: int = 250
    eval_max_images: int = 1000
    max_minutes: float = 0.0
    logit_scale_max: float = 100.0
    preload: bool = True
    num_workers: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("caption_lang", self.caption_lang, ("ru", "en", "both"))
        check_prob("bpe_dropout", self.bpe_dropout)
        for name in ("eval_every", "eval_max_images", "tokenizer_vocab_size", "num_workers"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                   f"{name}={getattr(self, name)!r} must be an integer >= 0")
        check_positive("max_minutes", self.max_minutes, allow_zero=True)
        _check(self.logit_scale_max > 1.0, f"logit_scale_max={self.logit_scale_max!r} must be > 1")
        _check(isinstance(self.model_overrides, dict), "model_overrides must be a mapping of ClipConfig fields")
        _check(self.batch_size >= 2, f"batch_size={self.batch_size} must be >= 2 for a contrastive loss")


@dataclasses.dataclass
class VQGANTrainConfig(TrainConfig):
    """``holst train vqgan``: train a VQGAN from scratch (or continue from ``init_from``).

    Model: ``model`` (a preset of ``holst.vqgan.presets``: sber, emoji64, small128, tiny) plus
    ``model_overrides`` (VQGANConfig fields). Data: ``data`` = a holst dataset folder
    (``captions.jsonl`` with ``file``/``split``: 'train' rows train, the other splits are held out)
    or any folder of images (a seeded ``num_val`` images are held out). Losses: ``l1_weight`` /
    ``l2_weight`` reconstruction, ``perceptual_weight`` (EfficientNet-Lite0 features; 0 = off, no
    extra package needed), PatchGAN (``disc_weight`` > 0, adaptive weight, from ``disc_start``), the
    quantizer's own loss (commitment, or Gumbel KL ramped in over ``kl_warmup_steps``). Gumbel
    temperature: cosine from ``temp_start`` to ``temp_end`` over ``temp_anneal_steps`` (0 = max_steps).
    Nearest-neighbour quantizers restart codes whose EMA usage per batch falls below ``restart_threshold``.
    """

    out_dir: str = "runs/vqgan"
    model: str = "emoji64"
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    init_from: str = ""
    # fnmatch globs over parameter names to keep fixed, e.g. ["encoder.*", "quant_conv.*", "quantize.*"]:
    # a decoder-only fine-tune of an ``init_from`` model that keeps every image's codes unchanged.
    freeze: tuple[str, ...] = ()
    data: str = ""
    image_size: int = 64
    num_val: int = 64
    hflip: bool = True
    batch_size: int = 32
    max_steps: int = 3000
    lr: float = 4e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.5, 0.9)
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 0.0
    disc_weight: float = 0.0
    disc_start: int = 0
    disc_ndf: int = 64
    disc_layers: int = 3
    disc_lr: float = 0.0
    temp_start: float = 0.9
    temp_end: float = 1e-6
    temp_anneal_steps: int = 0
    gumbel_hard: bool = False
    kl_weight: float = -1.0
    kl_warmup_steps: int = 0
    restart_threshold: float = 0.5
    eval_every: int = 500
    cache_images: bool = True
    num_workers: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(isinstance(self.model_overrides, dict), f"model_overrides={self.model_overrides!r} must be a mapping")
        for name in ("image_size", "batch_size"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                   f"{name}={getattr(self, name)!r} must be a positive integer")
        for name in ("num_val", "disc_start", "temp_anneal_steps", "kl_warmup_steps", "eval_every", "num_workers"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                   f"{name}={getattr(self, name)!r} must be an integer >= 0")
        for name in ("l1_weight", "l2_weight", "perceptual_weight", "disc_weight", "disc_lr", "restart_threshold"):
            check_positive(name, getattr(self, name), allow_zero=True)
        _check(self.l1_weight + self.l2_weight + self.perceptual_weight > 0,
               "l1_weight, l2_weight and perceptual_weight are all 0: nothing to reconstruct with")
        check_positive("temp_start", self.temp_start)
        check_positive("temp_end", self.temp_end)
        _check(self.kl_weight == -1.0 or self.kl_weight >= 0,
               f"kl_weight={self.kl_weight!r} must be >= 0, or -1 for the model config's value")
        _check(self.disc_layers >= 1 and self.disc_ndf >= 1,
               f"disc_layers={self.disc_layers!r} and disc_ndf={self.disc_ndf!r} must be >= 1")


# --------------------------------------------------------------------------------------------
# Sampling (holst/sampling.py)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SamplingConfig(ConfigBase):
    """Keyword arguments of ``holst.sampling.sample_image_codes``: ``sample_image_codes(model, ids, **cfg.to_dict())``.

    ``top_k`` 0 disables top-k; ``top_p`` is applied whenever it lies in [0, 1] (the reference's
    semantics); ``guidance_scale`` None or 1.0 = no classifier-free guidance; ``batch_size`` None =
    all images at once; ``static_cache``/``cuda_graph`` = fixed-shape decode steps / CUDA graph replay
    (``cuda_graph`` needs a CUDA model); ``compile`` = torch.compile of the decode step (CPU or CUDA).
    """

    top_k: int = 2048
    top_p: float = 0.995
    temperature: float = 1.0
    guidance_scale: float | None = None
    batch_size: int | None = None
    progress_interval: int = 1
    static_cache: bool = False
    cuda_graph: bool = False
    compile: bool = False
    free_cache: bool = True

    def __post_init__(self) -> None:
        _check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k={self.top_k!r} must be an integer >= 0")
        check_prob("top_p", self.top_p)
        check_positive("temperature", self.temperature)
        if self.guidance_scale is not None:
            check_positive("guidance_scale", self.guidance_scale, allow_zero=True)
        if self.batch_size is not None:
            _check(isinstance(self.batch_size, int) and self.batch_size > 0,
                   f"batch_size={self.batch_size!r} must be a positive integer or null")
        _check(isinstance(self.progress_interval, int) and self.progress_interval > 0,
               f"progress_interval={self.progress_interval!r} must be a positive integer")
        for name in ("static_cache", "cuda_graph", "compile", "free_cache"):
            _check(isinstance(getattr(self, name), bool), f"{name}={getattr(self, name)!r} must be true or false")


# --------------------------------------------------------------------------------------------
# Data (holst/data/)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DataConfig(ConfigBase):
    """Image-caption data for training: ``holst.data.build_dataset(cfg)``.

    ``sources``: built dataset folders (``holst data emoji|tuxpaint|shapes``, with captions.jsonl),
    JSONL/CSV/Parquet tables, image folders with .txt captions, or .tar shards (all sources .tar, or
    none). ``split`` selects rows of built sets / tables: train, test (every held-out split),
    test_concept, test_style or all. ``langs``: caption languages; each image yields one sample per
    language it has. ``crop``: center, random (seeded per epoch) or pad (letterbox on white).
    ``require_captions``: False keeps images that have no caption at all (image-only stages); an
    empty caption is a caption (kept as ``""``) either way.
    """

    sources: tuple[str, ...] = ("data/emoji", "data/tuxpaint")
    image_size: int = 64
    crop: str = "center"
    langs: tuple[str, ...] = ("ru", "en")
    split: str = "train"
    seed: int = 0
    max_pixels: int = 8192 * 8192
    require_captions: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.sources, str):
            self.sources = (self.sources,)
        if isinstance(self.langs, str):
            self.langs = (self.langs,)
        self.sources, self.langs = tuple(self.sources), tuple(self.langs)
        _check(len(self.sources) > 0 and all(isinstance(s, str) and s for s in self.sources),
               f"sources={self.sources!r} must be a non-empty list of paths")
        _check(len(self.langs) > 0 and all(isinstance(s, str) and s for s in self.langs),
               f"langs={self.langs!r} must be a non-empty list of language codes, e.g. ['ru', 'en']")
        _check(isinstance(self.image_size, int) and self.image_size >= 8,
               f"image_size={self.image_size!r} must be an integer >= 8")
        check_choice("crop", self.crop, ("center", "random", "pad"))
        check_choice("split", self.split, ("train", "test", "test_concept", "test_style", "all"))
        _check(isinstance(self.max_pixels, int) and not isinstance(self.max_pixels, bool) and self.max_pixels > 0,
               f"max_pixels={self.max_pixels!r} must be a positive integer")
        _check(isinstance(self.require_captions, bool),
               f"require_captions={self.require_captions!r} must be true or false")


# --------------------------------------------------------------------------------------------
# Evaluation (holst/eval/, owner: eval)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalConfig(ConfigBase):
    """Settings of ``holst eval``; each report records them so numbers are compared like with like.

    ``split``: held-out rows of the dataset folder (test = test_concept + test_style).
    ``lang``: caption language ('ru', 'en'; 'both' only for the dalle report). ``num_captions`` held-out
    captions (0 = all) x ``num_images`` images each for the pipeline / shapes reports.
    ``candidates``: captions per R-precision query (the true one + 99 others in the literature).
    ``fd_resolution``: side the images are resized to for FD-EffLite0 (224 = its ImageNet size);
    ``fd`` False skips FD and feature diversity. ``limit``: at most this many held-out images
    (vqgan / dalle reports; 0 = all). ``grid_rows``: captions shown in the grid PNGs.
    """

    split: str = "test"
    lang: str = "ru"
    num_captions: int = 32
    num_images: int = 4
    candidates: int = 100
    fd: bool = True
    fd_resolution: int = 224
    limit: int = 0
    batch_size: int = 16
    grid_rows: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("split", self.split, ("train", "test", "test_concept", "test_style", "all"))
        check_choice("lang", self.lang, ("ru", "en", "both"))
        for name in ("num_captions", "limit", "grid_rows", "seed"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{name}={v!r} must be an integer >= 0")
        for name in ("num_images", "batch_size"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name}={v!r} must be an integer >= 1")
        _check(isinstance(self.candidates, int) and self.candidates >= 2,
               f"candidates={self.candidates!r} must be an integer >= 2 (100 = the usual R-precision)")
        _check(isinstance(self.fd_resolution, int) and self.fd_resolution >= 32,
               f"fd_resolution={self.fd_resolution!r} must be an integer >= 32")
        _check(isinstance(self.fd, bool), f"fd={self.fd!r} must be true or false")
