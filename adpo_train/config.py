"""Every option of a training run in one frozen dataclass, built once from the command line.

:class:`TrainConfig` holds the trainer's options; its ``loss_config`` IS the
:class:`adpo_kernels.AdaptiveDPOConfig` handed to the loss (the loss options are not
repeated here).  Nothing changes a config after it is built: a value the run learns later
(the step count of ``--num_train_epochs``, a latent cache's resolution) makes a new config
with :func:`dataclasses.replace`.

Named presets, as ``AdaptiveDPOConfig.paper()``: :meth:`TrainConfig.toy` (the built-in toy
demo) and :meth:`TrainConfig.paper` (the paper's SD1.5 run, spec section 9).  Options left
unset on the command line are filled in layers: explicit flag > ``--preset`` > toy values
(when no model is given) > the field defaults below (diffusers' script's where it has one).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from adpo_kernels import AdaptiveDPOConfig

# The built-in toy (no --pretrained_model_name_or_path): 2-2.5 minutes on a 2-core CPU, toy build included.
# Trained at 16 px (4x8x8 latents): a quarter of the 32 px cost, so the toy's pre-training fits in the
# budget (adpo_train/toy.py).  600 steps (about 50 s): in the demo's evaluation (toy reward, guidance 3,
# `make demo`), 150 steps gave a win rate over the base of 0.61-0.62 whose 95% CI reached below 0.5
# (training seeds 0, 2); 400 steps 0.65-0.72 (seeds 0, 1, 2) and 600 steps 0.75 (seeds 0, 2), every CI
# above 0.5 (docs/trainer.md).
TOY = dict(
    resolution=16, train_batch_size=8, max_train_steps=600, learning_rate=1e-3, rank=4,
    checkpointing_steps=300, checkpoints_total_limit=1, output_dir="outputs/adpo-toy", logging_steps=5,
    inject_label_noise=0.2, report_to="jsonl", ema_decays=(0.99, 0.5), cpu_threads=1,
    no_hflip=True,  # the toy's pre-training and defaults were tuned on unflipped images
    overwrite_output_dir=True,  # the demo's own folder (outputs/adpo-toy): a second demo run replaces the first
)
# The toy's loss: the paper's metric settings with a beta fitted to the toy's logit scale
# (the toy's logits are ~100x smaller than SD's).
TOY_LOSS = dict(beta=500.0, rho=15.0, logits_normalize=True, margin_type="quadratic")
# The paper's SD1.5 run (spec section 9): trainer-side values; the loss is AdaptiveDPOConfig.paper().
PAPER = dict(
    rank=8, lora_alpha=8, lora_init="gaussian", learning_rate=1e-5, lr_scheduler="constant",
    adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2, adam_epsilon=1e-8, max_grad_norm=1.0,
    ema_decays=(0.9999, 0.5), ema_warmup_steps=2, train_batch_size=16, gradient_accumulation_steps=2,
    gradient_checkpointing=True, lora_target_modules="to_q,to_k,to_v,to_out.0",
)
PAPER_REAL_MODEL = dict(resolution=512)
PAPER_CUDA = dict(mixed_precision="fp16")


@dataclass(frozen=True)
class TrainConfig:
    """Options of :func:`adpo_train.trainer.train`; each field is the flag of the same name
    (``docs/trainer.md``), except the derived ``toy``, ``sdxl`` and ``beta_convention``."""

    # model and data
    pretrained_model_name_or_path: Optional[str] = None
    variant: Optional[str] = None
    revision: Optional[str] = None
    cache_dir: Optional[str] = None
    pretrained_vae_model_name_or_path: Optional[str] = None
    allow_cache_model_mismatch: bool = False
    prediction_type: Optional[str] = None
    dataset_name: Optional[str] = None
    dataset_split_name: str = "train"
    latent_cache: Optional[str] = None
    cache_latents: bool = False
    max_train_samples: Optional[int] = None
    resolution: int = 512
    vae_encode_batch_size: int = 8
    no_hflip: bool = False
    random_crop: bool = False
    inject_label_noise: float = 0.0  # data-side label noise: swap winner/loser of this fraction of pairs
    flip_seed: int = 0
    dataloader_num_workers: int = 0
    toy_pairs: int = 256
    # scale and speed
    unet_config: Optional[str] = None
    synthetic_pairs: Optional[int] = None
    full_finetune: bool = False
    compile: Optional[bool] = None
    compile_mode: Optional[str] = None
    channels_last: Optional[bool] = None
    attention: str = "sdpa"
    fused_adamw: Optional[bool] = None
    batched_annotators: Optional[bool] = None
    distributed: str = "ddp"  # several processes: ddp (replicate) or fsdp (shard; adpo_train/fsdp.py)
    # optimisation
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_train_steps: Optional[int] = None
    num_train_epochs: int = 1
    learning_rate: float = 1e-5
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    allow_tf32: bool = False
    use_8bit_adam: bool = False
    cpu_threads: Optional[int] = None
    seed: int = 0
    rank: int = 8
    lora_alpha: Optional[float] = None
    lora_target_modules: str = "to_q,to_k,to_v,to_out.0"
    lora_init: str = "gaussian"
    # loss
    preset: str = "none"
    loss_config: AdaptiveDPOConfig = field(default_factory=AdaptiveDPOConfig)
    ema_decays: tuple = (0.9999, 0.5)
    ema_warmup_steps: int = 2
    loss_backend: str = "auto"
    # checkpoints and logging
    output_dir: str = "outputs/adpo-train"
    overwrite_output_dir: bool = False
    logging_dir: str = "logs"
    tracker_name: str = "adpo-train"
    checkpointing_steps: int = 500
    checkpoints_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None
    allow_config_change: bool = False
    stop_after_steps: Optional[int] = None
    report_to: str = "tensorboard"
    logging_steps: int = 10
    dump_pairs: bool = False
    no_plot: bool = False
    quiet: bool = False
    debug: bool = False
    # validation images
    run_validation: bool = False
    validation_steps: int = 200
    validation_prompts: Optional[tuple] = None
    validation_inference_steps: int = 25
    validation_guidance_scale: float = 7.5
    validation_resolution: Optional[int] = None
    # derived from the options above when the config is built
    toy: bool = False  # no model given: the built-in toy
    sdxl: bool = False  # an SDXL-style UNet: decides --beta_dpo's meaning
    beta_convention: str = "default"  # how the loss's beta came about (printed, in train_config.json)

    def __post_init__(self):
        if not isinstance(self.loss_config, AdaptiveDPOConfig):
            raise TypeError(f"TrainConfig.loss_config: expected an AdaptiveDPOConfig, "
                            f"got {type(self.loss_config).__name__}")
        for name in ("ema_decays", "validation_prompts"):  # tuples: a frozen config holds no mutable list
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    @classmethod
    def toy_demo(cls, **overrides) -> "TrainConfig":
        """The built-in toy demo: ``adpo-train`` with no arguments."""
        return cls(**{"toy": True, **TOY, "loss_config": AdaptiveDPOConfig(**TOY_LOSS), **overrides})

    @classmethod
    def paper(cls, **overrides) -> "TrainConfig":
        """The paper's SD1.5 run (spec section 9) on a real model, without CUDA's fp16."""
        return cls(**{"preset": "paper", **PAPER, **PAPER_REAL_MODEL,
                      "loss_config": AdaptiveDPOConfig.paper(), **overrides})

    def replace(self, **changes) -> "TrainConfig":
        """A copy with ``changes`` (this config is unchanged)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The trainer options as plain values (``loss_config`` left out: it is recorded on its own)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "loss_config"}
