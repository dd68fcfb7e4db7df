"""Command line: ``adpo-train [train] [flags]``, ``adpo-train cache ...``,
``adpo-train make-toy DIR``, ``adpo-train evaluate ...`` (:mod:`adpo_train.evaluate`) and
``adpo-train experiment label-flip ...``.

Flags keep the names of diffusers' ``examples/research_projects/diffusion_dpo/
train_diffusion_dpo.py`` where they overlap, so a user of that script can switch by
changing the program name; every flag of ``train_diffusion_dpo.py`` and
``train_diffusion_dpo_sdxl.py`` is accepted or refused with its reason
(:mod:`adpo_train.compat`).  Beta convention: ``--beta_dpo`` means what it means in the
script for that model family: SD1.5/2.x ``beta = beta_dpo``; SDXL ``beta = beta_dpo / 2``
(its ``-0.5 * beta_dpo`` factor).  ``--beta`` sets this package's beta directly, which is
what the Adaptive-DPO reference script calls ``beta_dpo``.  The effective beta is printed
and recorded in ``train_config.json``.

User errors print one or two lines and exit 2 (``--debug`` or ``ADPO_TRAIN_DEBUG=1``: the
traceback); see :mod:`adpo_train.errors` for every exit code.

The flags are read once into a frozen :class:`adpo_train.config.TrainConfig` (:func:`resolve`);
options left unset are filled in layers: explicit flag > ``--preset`` > toy values (when no
model is given) > ``TrainConfig``'s defaults.  The loss flags are ``AdaptiveDPOConfig``'s fields.

Two different flips: ``--inject_label_noise`` (old spelling ``--flip_ratio``) swaps the labels
of a fraction of the DATA's pairs before training (an experiment on noisy preferences);
``--loss_flip_ratio``/``--loss_flip_threshold`` are the LOSS's own flipping of high-metric pairs
(``AdaptiveDPOConfig.flip_ratio``/``flip_threshold``, spec section 7).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Optional, Sequence

from adpo_kernels.config import LOSS_TYPES, MARGIN_TYPES, WEIGHT_TYPES, AdaptiveDPOConfig

from . import compat
from .config import PAPER, PAPER_CUDA, PAPER_REAL_MODEL, TOY, TOY_LOSS, TrainConfig
from .errors import Interrupted, UserError, debug_enabled

# CLI name of each AdaptiveDPOConfig field where it differs from the field name: the loss's own
# flipping of high-metric pairs is --loss_flip_*, apart from the data-side --inject_label_noise.
LOSS_FLAG = {"flip_ratio": "loss_flip_ratio", "flip_threshold": "loss_flip_threshold", "sync_stats": "sync_batch_stats"}
LOSS_HELP = {
    "adaptive": "Adaptive-DPO (default) or plain Diffusion-DPO",
    "flip_ratio": "AdaptiveDPOConfig.flip_ratio: the loss flips the labels of this fraction of the "
                  "highest-metric pairs (spec section 7; not --inject_label_noise)",
    "flip_threshold": "AdaptiveDPOConfig.flip_threshold: only pairs whose metric is above it are flipped",
    "sync_stats": "AdaptiveDPOConfig.sync_stats (multi-process)",
}
# diffusers' script lists cpo; the flag takes it so that compat.check can refuse it with the reason.
LOSS_CHOICES = {"loss_type": LOSS_TYPES + ("cpo",), "weight_type": WEIGHT_TYPES,
                "margin_type": tuple("none" if m is None else m for m in MARGIN_TYPES)}
PRESETS = ("paper", "dpo", "none")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data (names as in diffusers' train_diffusion_dpo.py)")
    g.add_argument("--pretrained_model_name_or_path", help="local diffusers-format folder (default: the built-in toy)")
    g.add_argument("--variant", help="weights variant, e.g. fp16")
    g.add_argument("--revision", help="with a hub repo id: that revision's snapshot in the local Hugging Face "
                   "cache (nothing is downloaded)")
    g.add_argument("--cache_dir", help="the Hugging Face cache folder to look the repo id up in "
                   "(default: HF_HUB_CACHE)")
    g.add_argument("--pretrained_vae_model_name_or_path", help="a local AutoencoderKL folder to use instead of "
                   "the model's vae/ (e.g. an fp16-safe SDXL VAE)")
    g.add_argument("--allow_cache_model_mismatch", action="store_true", help="train from a --latent_cache built "
                   "with another VAE/text encoder than --pretrained_model_name_or_path's")
    g.add_argument("--prediction_type", choices=["epsilon", "v_prediction"],
                   help="override the scheduler's prediction type")
    g.add_argument("--dataset_name", help="local Pick-a-Pic-schema parquet/arrow file or folder, or a "
                   "datasets.save_to_disk folder (default: the toy set)")
    g.add_argument("--dataset_split_name")
    g.add_argument("--latent_cache", help="train from this latent cache (built by `adpo-train cache`)")
    g.add_argument("--cache_latents", action="store_true",
                   help="build a latent cache of --dataset_name in OUTPUT_DIR/latent_cache first, then train from it")
    g.add_argument("--max_train_samples", type=int, help="use only the first N kept pairs")
    g.add_argument("--resolution", type=int)
    g.add_argument("--vae_encode_batch_size", type=int, default=8, help="images per VAE encode call")
    g.add_argument("--no_hflip", action="store_true", default=None, help="no random horizontal flip (diffusers "
                   "flips winner and loser together by default; a latent cache stores one view per pair)")
    g.add_argument("--random_crop", action="store_true", default=None,
                   help="random instead of centre crop (same crop for both images of a pair)")
    _add_label_noise_flags(g)
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--toy_pairs", type=int, default=256, help="size of the toy preference set")


def _add_label_noise_flags(g, default=None) -> None:
    """Data-side label noise (``--flip_ratio`` is its first, shipped spelling, still accepted)."""
    g.add_argument("--inject_label_noise", "--flip_ratio", dest="inject_label_noise", type=float, default=default,
                   metavar="RATIO", help="swap winner and loser of this fraction of the pairs before training "
                   "(recorded in OUTPUT_DIR/flipped_pairs.json; not the loss's --loss_flip_ratio)")
    g.add_argument("--flip_seed", type=int, default=None if default is None else 0,
                   help="seed of --inject_label_noise's choice of pairs")


def _add_scale_flags(p: argparse.ArgumentParser) -> None:
    b = argparse.BooleanOptionalAction
    g = p.add_argument_group("scale and speed (docs/trainer.md, 'At scale')")
    g.add_argument("--unet_config", help="random-init UNet from a config instead of pretrained weights: sd15, sdxl, "
                   "tiny, tiny-sdxl or a config.json path (with no data: --synthetic_pairs random latents)")
    g.add_argument("--synthetic_pairs", type=int, help="train on N random latent/text pairs of the UNet's shapes "
                   "(throughput runs; default 256 with --unet_config and no data)")
    g.add_argument("--full_finetune", action="store_true", help="train every UNet parameter (no LoRA); the "
                   "reference is a frozen UNet copy and the EMA annotators cover every parameter")
    g.add_argument("--compile", action=b, help="torch.compile the UNet (default: on with CUDA, off on CPU)")
    g.add_argument("--compile_mode", help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    g.add_argument("--channels_last", action=b, help="UNet weights and inputs in channels_last memory format")
    g.add_argument("--attention", choices=["sdpa", "xformers"], default="sdpa",
                   help="xformers only when it loads; otherwise PyTorch SDPA (diffusers' default)")
    g.add_argument("--fused_adamw", action=b, help="AdamW(fused=True) (default: on with CUDA)")
    g.add_argument("--distributed", choices=["ddp", "fsdp"], help="with several processes (accelerate launch, "
                   "torchrun): ddp replicates the UNet on every GPU (default); fsdp shards parameters, gradients, "
                   "optimizer state and EMA annotators over them (FSDP2; docs/trainer.md, 'Past one GPU')")
    g.add_argument("--batched_annotators", action=b,
                   help="reference + EMA annotators in one mixed-batch no-grad forward (LoRA mode; default off, "
                   "see docs/trainer.md for the measurement)")


def _add_optimisation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, help="preference pairs per device per micro-batch")
    g.add_argument("--gradient_accumulation_steps", type=int)
    g.add_argument("--max_train_steps", type=int)
    g.add_argument("--num_train_epochs", type=int)
    g.add_argument("--learning_rate", type=float)
    g.add_argument("--scale_lr", action="store_true")
    g.add_argument("--lr_scheduler", choices=LR_SCHEDULERS)
    g.add_argument("--lr_warmup_steps", type=int)
    g.add_argument("--lr_num_cycles", type=int, help="hard restarts of cosine_with_restarts (default 1)")
    g.add_argument("--lr_power", type=float, help="power of the polynomial schedule (default 1.0)")
    g.add_argument("--adam_beta1", type=float)
    g.add_argument("--adam_beta2", type=float)
    g.add_argument("--adam_weight_decay", type=float)
    g.add_argument("--adam_epsilon", type=float)
    g.add_argument("--max_grad_norm", type=float)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"])
    g.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction)
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--cpu_threads", type=int, help="torch threads when training on the CPU (toy default: 1, "
                   "which beats oversubscribed threads on the tiny model)")
    g.add_argument("--seed", type=int)
    g.add_argument("--rank", type=int, help="LoRA rank")
    g.add_argument("--lora_alpha", type=float, help="LoRA alpha (default: rank)")
    g.add_argument("--lora_target_modules", help="comma-separated attention projections")
    g.add_argument("--lora_init", help="peft init_lora_weights (default gaussian)")


def _add_loss_flags(p: argparse.ArgumentParser) -> None:
    """One flag per AdaptiveDPOConfig field (``LOSS_FLAG`` renames three), then the trainer's loss options."""
    g = p.add_argument_group("loss (adpo_kernels.AdaptiveDPOConfig)")
    g.add_argument("--preset", choices=PRESETS, default="none",
                   help="paper: AdaptiveDPOConfig.paper() and the paper's trainer settings; dpo: plain Diffusion-DPO")
    beta = g.add_mutually_exclusive_group()
    beta.add_argument("--beta_dpo", type=float, help="diffusers' meaning for the model family: SD1.5/2.x "
                      "beta = beta_dpo (train_diffusion_dpo.py), SDXL beta = beta_dpo / 2 (its _sdxl script)")
    beta.add_argument("--beta", type=float, help="this package's beta (= the Adaptive-DPO script's beta_dpo)")
    for f in dataclasses.fields(AdaptiveDPOConfig):
        if f.name == "beta":
            continue
        flag, help_ = "--" + LOSS_FLAG.get(f.name, f.name), LOSS_HELP.get(f.name)
        if isinstance(f.default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_)
        elif f.name in LOSS_CHOICES:
            g.add_argument(flag, choices=LOSS_CHOICES[f.name], help=help_)
        else:
            g.add_argument(flag, type=float, help=help_)
    g.add_argument("--ema_decays", type=float, nargs="*", help="one EMA annotator per decay (default 0.9999 0.5)")
    g.add_argument("--ema_warmup_steps", type=int, help="metric off for the first N optimisation steps")
    g.add_argument("--loss_backend", default="auto", help="adpo_kernels backend (auto, torch, cpu, triton, cuda)")


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--output_dir")
    g.add_argument("--overwrite_output_dir", action="store_true", default=None, help="start a fresh run in an "
                   "OUTPUT_DIR that holds another run's outputs (they are removed; other files are kept)")
    g.add_argument("--logging_dir", default="logs", help="tracker logs, relative to OUTPUT_DIR (as diffusers)")
    g.add_argument("--tracker_name", default="adpo-train", help="project name given to the trackers")
    g.add_argument("--checkpointing_steps", type=int)
    g.add_argument("--checkpoints_total_limit", type=int)
    g.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint folder")
    g.add_argument("--allow_config_change", action="store_true", help="resume although an option that changes "
                   "the math or the data order (learning rate, schedule, batch size, processes, loss, seed, LoRA "
                   "rank, ...) differs from the checkpoint's; the log names each change")
    g.add_argument("--stop_after_steps", type=int, help="checkpoint and exit after this many optimisation "
                   "steps, as if preempted (resume with --resume_from_checkpoint latest)")
    g.add_argument("--report_to", help="tensorboard (default; skipped quietly when not installed), wandb, "
                   "comet_ml, a comma list, all, jsonl or none: metrics.jsonl is always written")
    g.add_argument("--logging_steps", type=int, help="host sync + log every N optimisation steps")
    g.add_argument("--dump_pairs", action="store_true",
                   help="write pairs.jsonl: step, pair, logit, metric, weight, flipped for every pair")
    g.add_argument("--no_plot", action="store_true")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--debug", action="store_true", help="show the traceback of user errors")


def _add_validation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("validation images (as diffusers' --run_validation)")
    g.add_argument("--run_validation", action="store_true", help="generate images of the validation prompts "
                   "with the current LoRA every --validation_steps and at the end: OUTPUT_DIR/validation/"
                   "step-N.png (one grid) and the trackers")
    g.add_argument("--validation_steps", type=int, default=200)
    g.add_argument("--validation_prompts", nargs="+", help="default: diffusers' four DPO validation prompts")
    g.add_argument("--validation_inference_steps", type=int, default=25)
    g.add_argument("--validation_guidance_scale", type=float, default=7.5)
    g.add_argument("--validation_resolution", type=int, help="default: --resolution")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    for add in (_add_model_flags, _add_scale_flags, _add_optimisation_flags, _add_loss_flags, _add_output_flags,
                _add_validation_flags, compat.add_flags):
        add(p)

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adpo-train", description="Adaptive-DPO / Diffusion-DPO LoRA trainer. "
                                "With no arguments it trains the built-in toy (no downloads).")
    _add_train_flags(p)
    return p


def build_cache_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adpo-train cache", description="Precompute VAE latents and text "
                                "embeddings of a Pick-a-Pic-schema dataset into safetensors shards.")
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--variant")
    p.add_argument("--dataset_name", required=True)
    p.add_argument("--dataset_split_name", default="train")
    p.add_argument("--latent_cache", required=True, help="output folder")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=8, help="pairs per VAE/text encoder call")
    p.add_argument("--vae_encode_batch_size", type=int, help="same as --batch_size (diffusers' name)")
    p.add_argument("--shard_size", type=int, default=1024, help="pairs per shard")
    p.add_argument("--max_train_samples", type=int)
    _add_label_noise_flags(p, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the VAE latent sampling")
    p.add_argument("--cache_dtype", choices=["float32", "float16", "bfloat16"],
                   help="default: the training precision given by --mixed_precision (float32 without it)")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no",
                   help="the precision the cache will be trained in: sets the default --cache_dtype")
    p.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="processes decoding images while the main process encodes")
    p.add_argument("--restart_cache", action="store_true", help="discard a partial build of this --latent_cache "
                   "(default: continue it when its arguments match)")
    p.add_argument("--no_text_dedup", action="store_true", help="store the text embedding once per pair, "
                   "not once per distinct caption")
    p.add_argument("--device")
    p.add_argument("--pretrained_vae_model_name_or_path", help="a local AutoencoderKL folder instead of vae/")
    p.add_argument("--revision", help="with a hub repo id: that revision in the local Hugging Face cache")
    p.add_argument("--cache_dir", help="the Hugging Face cache folder (default: HF_HUB_CACHE)")
    p.add_argument("--no_hflip", action="store_true", help="no horizontal flip (default: a seeded flip of half "
                   "the pairs, winner and loser together, as diffusers' scripts)")
    p.add_argument("--random_crop", action="store_true")
    return p


def resolve(args: argparse.Namespace) -> TrainConfig:
    """The run's :class:`TrainConfig` from parsed flags: unset options filled in layers (explicit >
    preset > toy > defaults), the loss options made into its ``loss_config``.  Built once; frozen."""
    compat.check(args)
    model, vae = _locate_models(args)
    toy = model is None and args.unet_config is None
    synthetic_pairs = args.synthetic_pairs
    if args.unet_config and not (args.dataset_name or args.latent_cache) and synthetic_pairs is None:
        synthetic_pairs = 256
    _check_sources(args, model, toy, synthetic_pairs)
    sdxl = model_is_sdxl(args.unet_config, model)
    values = _trainer_layers(args.preset, toy)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    if args.enable_xformers_memory_efficient_attention:
        values["attention"] = "xformers"
    _check_ranges(values)
    loss_config = _loss_config(args, toy, sdxl)
    if not loss_config.adaptive:
        values["ema_decays"] = ()
    return TrainConfig(**{**values, "pretrained_model_name_or_path": model, "pretrained_vae_model_name_or_path": vae,
                          "synthetic_pairs": synthetic_pairs, "toy": toy, "sdxl": sdxl, "loss_config": loss_config,
                          "beta_convention": compat.beta_note(args.beta_dpo, args.beta, sdxl)})


# The numeric options' ranges (a 0 batch size reached the sampler as a ZeroDivisionError).
_AT_LEAST_1 = ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "num_train_epochs", "rank",
               "logging_steps", "checkpointing_steps", "checkpoints_total_limit", "stop_after_steps",
               "vae_encode_batch_size", "cpu_threads", "validation_steps", "validation_inference_steps",
               "toy_pairs", "synthetic_pairs", "max_train_samples", "lr_num_cycles", "resolution")
_AT_LEAST_0 = ("lr_warmup_steps", "ema_warmup_steps", "dataloader_num_workers", "seed", "flip_seed")
_ABOVE_0 = ("learning_rate", "adam_epsilon", "max_grad_norm")


def _check_ranges(values: dict) -> None:
    """One-line :class:`UserError` naming the flag for a number outside its range."""
    for k, v in values.items():
        if v is None or isinstance(v, bool):
            continue
        if k in _AT_LEAST_1 and v < 1:
            raise UserError(f"--{k} must be at least 1, got {v}")
        if k in _AT_LEAST_0 and v < 0:
            raise UserError(f"--{k} must be at least 0, got {v}")
        if k in _ABOVE_0 and not (v > 0 and math.isfinite(v)):
            raise UserError(f"--{k} must be a positive finite number, got {v}")
        if k in ("adam_beta1", "adam_beta2") and not 0 <= v < 1:
            raise UserError(f"--{k} must be in [0, 1), got {v}")
        if k == "adam_weight_decay" and not (v >= 0 and math.isfinite(v)):
            raise UserError(f"--{k} must be a finite number >= 0, got {v}")


def _locate_models(args: argparse.Namespace) -> tuple:
    """The model and VAE folders (a hub repo id is looked up in the local Hugging Face cache)."""
    from .models import locate_model

    model = args.pretrained_model_name_or_path
    if model:
        model = locate_model(model, args.revision, args.cache_dir)
    elif args.revision:
        raise UserError("--revision needs --pretrained_model_name_or_path (a hub repo id in the local cache)")
    vae = args.pretrained_vae_model_name_or_path
    if vae:
        vae = locate_model(vae, None, args.cache_dir, "--pretrained_vae_model_name_or_path")
    return model, vae


def _check_sources(args: argparse.Namespace, model, toy: bool, synthetic_pairs) -> None:
    if synthetic_pairs and args.unet_config is None:
        raise UserError("--synthetic_pairs needs --unet_config")
    if args.unet_config and not synthetic_pairs and model is None:
        raise UserError("--unet_config with data needs --pretrained_model_name_or_path for the "
                        "scheduler/VAE/text encoders (or use --synthetic_pairs)")
    if toy and (args.dataset_name or args.latent_cache):
        raise UserError("--dataset_name/--latent_cache need --pretrained_model_name_or_path "
                        "(the toy set only fits the toy model)")


def _trainer_layers(preset: str, toy: bool) -> dict:
    """Trainer options of the toy and the preset (later layers win); the rest are TrainConfig's defaults."""
    values: dict = {}
    if toy:
        values.update(TOY)
    if preset == "paper":
        import torch

        values.update(PAPER)
        if not toy:
            values.update(PAPER_REAL_MODEL)
        if torch.cuda.is_available():
            values.update(PAPER_CUDA)
    return values


def _loss_config(args: argparse.Namespace, toy: bool, sdxl: bool) -> AdaptiveDPOConfig:
    """The preset's (or the toy's) AdaptiveDPOConfig with the loss flags given; a bad value names its flag."""
    explicit = {}
    for f in dataclasses.fields(AdaptiveDPOConfig):
        value = getattr(args, LOSS_FLAG.get(f.name, f.name))
        if value is not None:
            explicit[f.name] = value
    if args.beta_dpo is not None:
        explicit["beta"] = compat.beta_from_beta_dpo(args.beta_dpo, sdxl)
    if explicit.get("margin_type") == "none":
        explicit["margin_type"] = None
    if args.preset == "paper":
        base = AdaptiveDPOConfig.paper()
    elif args.preset == "dpo":
        base = AdaptiveDPOConfig.dpo()
    else:
        base = AdaptiveDPOConfig(**(TOY_LOSS if toy else {}))
    if toy and args.preset != "none" and "beta" not in explicit:
        explicit["beta"] = TOY_LOSS["beta"]  # the toy's logits are ~100x smaller than SD's
    try:
        return base.replace(**explicit)
    except (TypeError, ValueError) as e:
        name = str(e).split(":", 1)[0].rpartition(".")[2]
        flag = "--beta_dpo" if name == "beta" and args.beta_dpo is not None else "--" + LOSS_FLAG.get(name, name)
        raise UserError(f"{flag}: {str(e).split(':', 1)[-1].strip()}") from None

def model_is_sdxl(unet_config_name: Optional[str], path: Optional[str]) -> bool:
    """Whether the run trains an SDXL-style UNet (two text encoders): decides ``--beta_dpo``'s meaning."""
    from .models import is_sdxl_folder, unet_config

    if unet_config_name:
        try:
            return unet_config(unet_config_name).get("addition_embed_type") == "text_time"
        except ValueError as e:
            raise UserError(str(e)) from None
    return bool(path) and os.path.isdir(path) and is_sdxl_folder(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``adpo-train`` command; returns the exit code (:mod:`adpo_train.errors`).

    As a program (``argv`` None) in one of several ranks (``WORLD_SIZE`` > 1), the process ends with
    ``os._exit`` once the command returned and stdio is flushed.  Why: about one 2-process gloo run in
    30 (the FSDP memory bench, looped under load) aborted AFTER the run had completed and written its
    outputs, in interpreter teardown: "terminate called without an active exception" with no Python
    frame left (a joinable C++ std::thread destroyed at exit, inside torch/gloo; not pinned down
    further), which torchrun reports as a failed run.  Everything the command writes is closed by
    then (files under ``with``, trackers and the process group ended by the trainer), so skipping
    teardown loses nothing.  ``ADPO_TRAIN_FULL_EXIT=1`` keeps the normal exit.
    """
    as_program = argv is None
    rc = _command(list(sys.argv[1:] if argv is None else argv))
    ranks = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if as_program and ranks > 1 and os.environ.get("ADPO_TRAIN_FULL_EXIT") != "1":
        import logging

        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(rc)
    return rc


def _command(argv: list) -> int:
    debug = debug_enabled(argv)
    try:
        return _main([a for a in argv if a != "--debug"])
    except (UserError, Interrupted) as e:
        if debug:
            raise
        print(f"adpo-train: {'error: ' if isinstance(e, UserError) else ''}{e}", file=sys.stderr)
        if isinstance(e, UserError) and not isinstance(e, Interrupted):
            print("adpo-train: (--debug or ADPO_TRAIN_DEBUG=1 shows the traceback)", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a Ctrl-C outside the training loop (loading, caching): nothing to save
        if debug:
            raise
        print("adpo-train: interrupted", file=sys.stderr)
        return 130


def _main(argv: list) -> int:
    cmd = argv[0] if argv and not argv[0].startswith("-") else "train"
    rest = argv[1:] if argv and not argv[0].startswith("-") else argv
    if cmd == "train":
        from .trainer import train

        train(resolve(build_parser().parse_args(rest)))
        return 0
    if cmd == "cache":
        from .cache import build_cache, cache_dtype

        a = build_cache_parser().parse_args(rest)
        if a.vae_encode_batch_size:
            a.batch_size = a.vae_encode_batch_size
        from .models import locate_model

        a.pretrained_model_name_or_path = locate_model(a.pretrained_model_name_or_path, a.revision, a.cache_dir)
        build_cache(a.pretrained_model_name_or_path, a.dataset_name, a.latent_cache, split=a.dataset_split_name,
                    resolution=a.resolution, batch_size=a.batch_size, shard_size=a.shard_size,
                    flip_ratio=a.inject_label_noise, flip_seed=a.flip_seed, max_pairs=a.max_train_samples, seed=a.seed,
                    dtype=a.cache_dtype or cache_dtype(a.mixed_precision), device=a.device, variant=a.variant,
                    hflip=not a.no_hflip, random_crop=a.random_crop, vae_path=a.pretrained_vae_model_name_or_path,
                    num_workers=a.dataloader_num_workers, restart=a.restart_cache, dedup_text=not a.no_text_dedup,
                    progress=True)
        return 0
    if cmd == "make-toy":
        import os

        from . import toy

        p = argparse.ArgumentParser(prog="adpo-train make-toy",
                                    description="Write the toy model and the toy Pick-a-Pic-schema parquet")
        p.add_argument("dir")
        p.add_argument("--toy_pairs", type=int, default=256)
        p.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default="epsilon")
        a = p.parse_args(rest)
        model = toy.write_toy_model(os.path.join(a.dir, "model"), prediction_type=a.prediction_type)
        data = toy.write_toy_dataset(os.path.join(a.dir, "data", "train.parquet"), a.toy_pairs)
        print(f"toy model: {model}\ntoy dataset: {data}")
        return 0
    if cmd == "evaluate":
        from .evaluate import main as evaluate_main

        return evaluate_main(rest)
    if cmd == "experiment":
        if not rest:
            raise UserError("usage: adpo-train experiment label-flip [args]")
        name, exp_args = rest[0], rest[1:]
        if name != "label-flip":
            raise UserError(f"adpo-train experiment: unknown experiment {name!r} (known: label-flip)")
        from .experiments.label_flip import main as label_flip_main

        result = label_flip_main(exp_args)
        return int(result or 0)
    raise UserError(f"unknown command {cmd!r} (train, cache, make-toy, evaluate, experiment)")
