"""The options of ``holst train <stage>``, beside the trainers that read them.

``TrainConfig`` is assembled from small typed parts, each validating its own fields:
:class:`EngineOptions` (:class:`RuntimeOptions`: device, precision, threads, seed; then backend,
loss scaling), :class:`OptimOptions`
(optimizer, learning rate, clipping), :class:`ScheduleOptions` (steps, batch, warm-up + cosine) and
:class:`LogOptions` (output, logging, checkpoints). A stage config is ``TrainConfig`` plus the
stage's own fields (and :class:`ModelOptions`, the model to train, where the stage has presets);
it only changes defaults and adds fields, one level deep. YAML files stay flat: every field is a
top-level key (``configs/train/*.yaml``).

Names agree across stages: ``model`` (a preset name), ``model_overrides`` (fields of the stage's
model config), ``init_from`` (a model directory to start from). The older spellings ``preset``
(clip) and ``init`` (superres) are still read, with a warning (``ConfigBase.deprecated_names``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from holst.config import ConfigBase, _check, check_bool, check_choice, check_int, check_positive, check_prob
from holst.superres.config import RRDBOptions

TRAIN_BACKENDS = ("auto", "single", "ddp", "fsdp", "deepspeed")
TRAIN_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SUPERRES_DEGRADATIONS = ("auto", "vqgan", "classic")


def _none_for_minus_one(value: float | None) -> float | None:
    """The old ``-1`` = "use the model's value" sentinel, read as ``None`` (YAML files written before)."""
    return None if value is not None and value == -1 else value


# --------------------------------------------------------------------------------------------
# The parts of TrainConfig
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RuntimeOptions:
    """Where a run computes and from which seed: shared by every trainer and ``holst finetune``.

    ``device``: 'auto' (a GPU when there is one), 'cpu', 'cuda', 'cuda:1', ...
    ``precision='auto'``: bf16 autocast on GPUs that support it and on CPUs with native bf16
    (AVX512-BF16/AMX), fp16 with dynamic loss scaling on the other GPUs, fp32 on the other CPUs.
    ``num_threads`` 0 keeps PyTorch's CPU thread count.
    """

    device: str = dataclasses.field(default="auto", metadata={"help": "cpu, cuda, cuda:1, auto (default auto)"})
    precision: str = dataclasses.field(default="auto", metadata={"help": "fp32, bf16, fp16, auto (default auto)"})
    num_threads: int = dataclasses.field(default=0, metadata={"help": "torch CPU threads (default: torch's)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the run (default {default})"})

    def check_runtime_options(self) -> None:
        """Raise ConfigError naming the first invalid device, precision, thread count or seed."""
        _check(isinstance(self.device, str) and bool(self.device), f"device={self.device!r} must be a device name")
        check_choice("precision", self.precision, TRAIN_PRECISIONS)
        for name in ("num_threads", "seed"):
            check_int(name, getattr(self, name), 0, 2**63 - 1)


@dataclasses.dataclass
class EngineOptions(RuntimeOptions):
    """How the engine runs the model (holst.train.engine): :class:`RuntimeOptions` plus the engine's own.

    ``compile``: run the model under ``torch.compile`` (the first steps are slower while it compiles; on a
    CPU inductor needs a C++ compiler, g++ or ``$CXX``).
    """

    backend: str = "auto"
    compile: bool = False
    gradient_checkpointing: bool = False
    loss_scale_init: float = 2.0**16
    loss_scale_window: int = 400
    zero_stage: int = 2
    fsdp_reshard_after_forward: bool = True
    ddp_find_unused_parameters: bool = False
    ddp_broadcast_buffers: bool = False

    def check_engine_options(self) -> None:
        """Raise ConfigError naming the first invalid engine option."""
        self.check_runtime_options()
        check_choice("backend", self.backend, TRAIN_BACKENDS)
        check_choice("zero_stage", self.zero_stage, (0, 1, 2, 3))
        check_int("loss_scale_window", self.loss_scale_window, 1, 10**12)
        for name in ("compile", "gradient_checkpointing", "fsdp_reshard_after_forward",
                     "ddp_find_unused_parameters", "ddp_broadcast_buffers"):
            check_bool(name, getattr(self, name))
        check_positive("loss_scale_init", self.loss_scale_init)


@dataclasses.dataclass
class OptimOptions:
    """The optimizer (holst.train.optim): AdamW (no decay on norms/biases/embeddings), Adam or SGD.

    ``grad_clip`` 0 = no clipping; ``ema_decay`` 0 = no EMA copy of the weights.
    """

    optimizer: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.0

    def check_optim_options(self) -> None:
        """Raise ConfigError naming the first invalid optimizer option."""
        check_choice("optimizer", self.optimizer, ("adamw", "adam", "sgd"))
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("grad_clip", self.grad_clip, allow_zero=True)
        check_positive("eps", self.eps)
        _check(0.0 <= self.ema_decay < 1.0, f"ema_decay={self.ema_decay!r} must lie in [0, 1) (0 = off)")
        _check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
               f"betas={self.betas!r} must be two numbers in [0, 1)")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]


@dataclasses.dataclass
class ScheduleOptions:
    """Batch and schedule: linear warm-up over ``warmup_steps``, then cosine down to ``min_lr_ratio * lr``.

    ``batch_size`` is the micro-batch of one process; the global batch is
    ``batch_size * grad_accum * world_size``.
    """

    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100

    def check_schedule_options(self) -> None:
        """Raise ConfigError naming the first invalid batch or schedule option."""
        for name in ("batch_size", "grad_accum", "max_steps"):
            check_int(name, getattr(self, name), 1, 10**12)
        check_int("warmup_steps", self.warmup_steps, 0, 2**63 - 1)
        check_prob("min_lr_ratio", self.min_lr_ratio)


@dataclasses.dataclass
class LogOptions:
    """Where a run writes and how often.

    Metrics every ``log_every`` steps, a checkpoint every ``save_every`` (0 = only at the end),
    samples every ``sample_every`` (0 = never).
    """

    out_dir: str = "runs/train"
    log_every: int = 10
    save_every: int = 500
    sample_every: int = 0
    tensorboard: bool = True

    def check_log_options(self) -> None:
        """Raise ConfigError naming the first invalid logging option."""
        check_int("log_every", self.log_every, 1, 10**12)
        for name in ("save_every", "sample_every"):
            check_int(name, getattr(self, name), 0, 2**63 - 1)
        check_bool("tensorboard", self.tensorboard)


@dataclasses.dataclass
class TrainConfig(LogOptions, ScheduleOptions, OptimOptions, EngineOptions, ConfigBase):
    """Options shared by every trainer.

    :class:`EngineOptions`, :class:`OptimOptions`, :class:`ScheduleOptions` and :class:`LogOptions`
    (see each for its fields). Stage trainers add their own fields in a subclass (one level: they
    change defaults and add options).
    """

    def __post_init__(self) -> None:
        self.check_engine_options()
        self.check_optim_options()
        self.check_schedule_options()
        self.check_log_options()


@dataclasses.dataclass
class ModelOptions:
    """The model a trainer builds: preset ``model`` + ``model_overrides``, or ``init_from`` weights.

    ``model_overrides`` maps fields of the stage's model config (DalleConfig, VQGANConfig,
    ClipConfig) to values; unknown field names are an error here, before any data is read.
    """

    model: str = ""
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    init_from: str = ""

    def check_model_options(self, model_config: type[ConfigBase]) -> None:
        """Raise ConfigError unless ``model_overrides`` names fields of ``model_config`` only."""
        if self.init_from is None:
            self.init_from = ""
        _check(isinstance(self.model, str) and bool(self.model), f"model={self.model!r} must be a preset name")
        _check(isinstance(self.init_from, str), f"init_from={self.init_from!r} must be a directory path")
        _check(isinstance(self.model_overrides, dict) and all(isinstance(k, str) for k in self.model_overrides),
               f"model_overrides={self.model_overrides!r} must be a mapping of {model_config.__name__} fields")
        known = {f.name for f in dataclasses.fields(model_config)}
        unknown = sorted(set(self.model_overrides) - known)
        _check(not unknown, f"model_overrides: {unknown} are not {model_config.__name__} fields; "
                            f"known fields: {sorted(known)}")


# --------------------------------------------------------------------------------------------
# One config per stage
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DalleTrainConfig(ModelOptions, TrainConfig):
    """``holst train dalle``: train the transformer from scratch or fine-tune a converted checkpoint.

    Model: ``model`` (a preset of ``holst.dalle.config``) + ``model_overrides`` (DalleConfig fields),
    or ``init_from`` (a DalleModel directory).
    Data: ``codes`` (pre-computed code shards, globs allowed) or ``images`` (a dataset folder) encoded
    on the fly with the VQGAN in ``vqgan``. Captions go through BPE-dropout (``bpe_dropout``) and are
    emptied with probability ``empty_caption_prob`` so classifier-free guidance works.
    Fine-tuning: ``init_from``, ``freeze`` (globs over parameter names,
    e.g. the Emojich recipe ``transformer.layers.*.attention.*`` + ``transformer.layers.*.mlp.*``),
    ``loss_img_weight`` (None = the model's; Emojich used 1000), LoRA (``lora_rank`` > 0).
    Attention: ``attn_impl`` 'sparse' (default) computes only the band of keys the row, column and
    conv masks leave visible, for full training sequences, and sdpa elsewhere; 'sdpa' the dense masked
    attention; 'math' the reference's explicit kernel.
    """

    model: str = "emoji"
    attn_impl: str = "sparse"
    tokenizer: str = ""
    codes: list[str] = dataclasses.field(default_factory=list)
    images: str = ""
    vqgan: str = ""
    langs: list[str] = dataclasses.field(default_factory=list)
    bpe_dropout: float = 0.1
    empty_caption_prob: float = 0.1
    loss_img_weight: float | None = None
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
        from holst.dalle.config import DalleConfig

        self.check_model_options(DalleConfig)
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
        self.loss_img_weight = w = _none_for_minus_one(self.loss_img_weight)
        _check(w is None or (isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0),
               f"loss_img_weight={w!r} must be a number >= 0, or null for the model's value")
        if isinstance(self.codes, str):
            self.codes = [self.codes]
        for name in ("codes", "langs", "freeze", "lora_targets", "sample_prompts"):
            value = getattr(self, name)
            _check(isinstance(value, list) and all(isinstance(v, str) for v in value),
                   f"{name}={value!r} must be a list of strings")
        _check(not (self.codes and self.images), "give either codes (code shards) or images (+ vqgan), not both")
        _check(not self.images or bool(self.vqgan), "images= needs vqgan= (a VQGAN directory) to encode on the fly")


@dataclasses.dataclass
class ClipTrainConfig(ModelOptions, TrainConfig):
    """``holst train clip``: contrastive training of a CLIP on image-caption pairs (our BPE tokenizer).

    ``model`` + ``model_overrides`` give the ClipConfig (``holst.rerank.config.CLIP_PRESETS``);
    ``init_from`` fine-tunes an existing CLIP directory instead (e.g. a converted ruCLIP, whose own
    tokenizer is then used). ``data`` is a dataset directory of holst.data; ``eval_splits`` are its
    held-out splits, on which image->text and text->image R@1 / R@5 are reported. ``caption_lang``
    'both' pairs each image with a random one of its captions (e.g. Russian or English) each time.
    ``tokenizer``: a tokenizer directory / bpe.model file, or None to train one on the training
    captions with ``tokenizer_vocab_size`` ids. ``max_minutes`` > 0 stops training after that
    wall-clock time (the schedule still assumes ``max_steps``).
    """

    # 'preset' was this stage's name for 'model'; 'preload' and 'num_workers' were never read.
    deprecated_names = {"preset": "model", "preload": None, "num_workers": None}

    out_dir: str = "runs/clip"
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    model: str = "emoji64"
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

    def __post_init__(self) -> None:
        super().__post_init__()
        from holst.rerank.config import ClipConfig

        self.check_model_options(ClipConfig)
        check_choice("caption_lang", self.caption_lang, ("ru", "en", "both"))
        check_prob("bpe_dropout", self.bpe_dropout)
        for name in ("eval_every", "eval_max_images", "tokenizer_vocab_size"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                   f"{name}={getattr(self, name)!r} must be an integer >= 0")
        check_positive("max_minutes", self.max_minutes, allow_zero=True)
        _check(self.logit_scale_max > 1.0, f"logit_scale_max={self.logit_scale_max!r} must be > 1")
        _check(self.batch_size >= 2, f"batch_size={self.batch_size} must be >= 2 for a contrastive loss")


@dataclasses.dataclass
class VQGANTrainConfig(ModelOptions, TrainConfig):
    """``holst train vqgan``: train a VQGAN from scratch (or continue from ``init_from``).

    Model: ``model`` (a preset of ``holst.vqgan.config``: sber, emoji64, small128, tiny) plus
    ``model_overrides`` (VQGANConfig fields). Data: ``data`` = a holst dataset folder
    (``captions.jsonl`` with ``file``/``split``: 'train' rows train, the other splits are held out)
    or any folder of images (a seeded ``num_val`` images are held out). Losses: ``l1_weight`` /
    ``l2_weight`` reconstruction, ``perceptual_weight`` (EfficientNet-Lite0 features; 0 = off, no
    extra package needed), PatchGAN (``disc_weight`` > 0, adaptive weight, from ``disc_start``), the
    quantizer's own loss (commitment, or Gumbel KL ramped in over ``kl_warmup_steps``; ``kl_weight``
    None = the model config's). Gumbel temperature: cosine from ``temp_start`` to ``temp_end`` over
    ``temp_anneal_steps`` (0 = max_steps). Nearest-neighbour quantizers restart codes whose EMA usage
    per batch falls below ``restart_threshold``.
    """

    out_dir: str = "runs/vqgan"
    model: str = "emoji64"
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
    kl_weight: float | None = None
    kl_warmup_steps: int = 0
    restart_threshold: float = 0.5
    eval_every: int = 500
    cache_images: bool = True
    num_workers: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        from holst.vqgan.config import VQGANConfig

        self.check_model_options(VQGANConfig)
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
        self.kl_weight = w = _none_for_minus_one(self.kl_weight)
        _check(w is None or (isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0),
               f"kl_weight={w!r} must be >= 0, or null for the model config's value")
        _check(self.disc_layers >= 1 and self.disc_ndf >= 1,
               f"disc_layers={self.disc_layers!r} and disc_ndf={self.disc_ndf!r} must be >= 1")


@dataclasses.dataclass
class SuperResTrainConfig(RRDBOptions, TrainConfig):
    """``holst train superres``: fine-tune (``init_from``) or train an RRDBNet on (LR, HR) pairs made on the fly.

    HR = random ``hr_size`` crops of the images under ``data`` (read by holst.data, resized and
    centre-cropped to ``image_size``; 0 = ``hr_size``); LR = the crop shrunk by ``scale`` and
    degraded. ``degradation``: 'vqgan' round-trips LR through the VQGAN at ``vqgan`` (what the
    pipeline's decoder produces), 'classic' applies blur + noise + JPEG, 'auto' = 'vqgan' when
    ``vqgan`` is set, else 'classic'. ``classic_prob``: share of 'vqgan' batches degraded classically.
    Without ``init_from``, the :class:`holst.superres.config.RRDBOptions` fields (``scale``, ``num_feat``,
    ``num_block``, ``num_grow_ch``; the same names, defaults and limits as ``SuperResConfig``) build a fresh model.
    """

    # 'init' was this stage's name for the 'init_from' of the other stages.
    deprecated_names = {"init": "init_from"}

    out_dir: str = "runs/superres"
    batch_size: int = 4
    max_steps: int = 2000
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 0.0
    data: str = ""
    init_from: str = ""
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
        self.check_rrdb_options()
        check_choice("degradation", self.degradation, SUPERRES_DEGRADATIONS)
        _check(self.degradation != "vqgan" or bool(self.vqgan), "degradation='vqgan' needs vqgan=<VQGAN directory>")
        _check(isinstance(self.hr_size, int) and self.hr_size > 0,
               f"hr_size={self.hr_size!r} must be a positive integer")
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
