"""The training loop: Adaptive-DPO (or plain Diffusion-DPO) on a LoRA of a diffusers UNet.

Read top to bottom, :func:`_train` builds the models (:func:`_build_models`), the data
(:func:`_build_data`), the :class:`~adpo_train.state.TrainState` (optimiser, accelerate's
``prepare``, annotators, generators), resumes a checkpoint (:func:`_resume`), loops
(:func:`_loop`: :func:`adpo_train.state.train_step` per micro-batch, then logging,
checkpoints and stop requests in :func:`_after_step`) and saves (:func:`_finish`).
With several processes the UNet is replicated (DDP through accelerate's ``prepare``) or, with
``--distributed fsdp``, sharded first (:func:`_shard`, :mod:`adpo_train.fsdp`); checkpoints
and the final export then go through DCP and gathered writes.

One optimisation step, for a micro-batch of B pairs (rows stacked ``[winners; losers]``):

1. latents and text embeddings, from the cache or from the VAE/text encoder (no grad);
2. one noise draw and one timestep per pair, shared by its winner and loser rows;
3. reference prediction: the same UNet with the LoRA adapters disabled, under no_grad;
4. annotator predictions (once ``ema_warmup_steps`` optimisation steps are done): the
   LoRA parameters swapped in place for each EMA copy, under no_grad;
5. policy prediction with grad, then ``adpo_kernels.adaptive_dpo_loss`` and backward;
6. after each optimiser step, every EMA annotator takes one update.

A step whose loss is not finite changes nothing (:mod:`adpo_train.skip`).  Per-step metrics
stay on the device and are read once every ``--logging_steps``.  SIGINT/SIGTERM stop the run
at a step boundary with a checkpoint (:mod:`adpo_train.signals`); user errors are
:class:`adpo_train.errors.UserError`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from typing import Optional

import torch

from . import checkpoint as ckpt
from . import jsonl
from . import locks
from . import safedir
from . import skip
from .annotators import EMAAnnotators, MixedBatchAnnotators
from .cache import check_cache_fits
from .config import TrainConfig
from .conditioning import load_text_encoders
from .data import (CachedPairDataset, ImagePairDataset, PairBatchSampler, PickAPicPairs, SyntheticPairDataset,
                   collate_cached, collate_images)
from .models import (LORA_WEIGHT_NAME, add_lora, build_unet, load_lora_state_dict, load_scheduler, load_unet,
                     load_vae, lora_state_dict, save_lora_diffusers, sd_scheduler, set_attention, text_shape)
from .errors import Interrupted, RunCutShort, UserError

MEMORY_FILE = "memory_per_rank.json"  # written at the end of a run: bytes each rank holds
SCHEDULER_FILE = "lr_scheduler.pt"  # --distributed fsdp checkpoints (accelerate's save_state writes its own)
TRAIN_STATE_FILE = "custom_checkpoint_0.pkl"  # the TrainState, written by accelerate's checkpointing
# Options that change the math or the data order: a resume with another value is refused unless
# --allow_config_change (paths are left out: a requeue may find the same data elsewhere; the cache's own
# model fingerprint covers the model).  max_train_steps / num_train_epochs only where the schedule decays.
RESUME_CHECKED = ("train_batch_size", "gradient_accumulation_steps", "learning_rate", "scale_lr", "lr_scheduler",
                  "lr_warmup_steps", "lr_num_cycles", "lr_power", "adam_beta1", "adam_beta2", "adam_weight_decay",
                  "adam_epsilon", "max_grad_norm", "use_8bit_adam", "mixed_precision", "seed", "rank", "lora_alpha",
                  "lora_target_modules", "lora_init", "full_finetune", "ema_decays", "ema_warmup_steps",
                  "prediction_type", "max_train_samples", "resolution", "no_hflip", "random_crop",
                  "inject_label_noise", "flip_seed", "unet_config", "synthetic_pairs", "toy_pairs")
RESUME_FIXED = ("rank", "lora_target_modules", "full_finetune", "unet_config")  # the saved tensors' shapes
CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")
FINAL_OUTPUTS = (LORA_WEIGHT_NAME, "unet")  # written when a run completes (a finished run is never requeued)
from .signals import StopRequest
from .state import F, StepMetrics, StepOptions, TrainState, train_step
from .step import StepModels, compile_unet

def _prepare_toy(config: TrainConfig, log) -> TrainConfig:
    """Materialise the toy model, dataset and latent cache under OUTPUT_DIR/toy (reused when present);
    returns the config that trains from them."""
    from . import toy
    from .cache import build_cache

    root = os.path.join(config.output_dir, "toy")
    pt = config.prediction_type or "epsilon"
    model = toy.write_toy_model(os.path.join(root, f"model-{pt}"), prediction_type=pt, log=log)
    data = os.path.join(root, "data", f"pick_a_pic_toy_{config.toy_pairs}.parquet")
    if not os.path.isfile(data):
        toy.write_toy_dataset(data, config.toy_pairs)
    cache = os.path.join(root, f"cache-{pt}-{config.toy_pairs}-flip{config.inject_label_noise}"
                               f"-seed{config.flip_seed}")
    if not _toy_cache_fits(cache, model):
        build_cache(model, data, cache, resolution=toy.RESOLUTION, batch_size=64,
                    flip_ratio=config.inject_label_noise, flip_seed=config.flip_seed,
                    max_pairs=config.max_train_samples, seed=config.seed, device="cpu", log=log, distributed=False)
    return config.replace(pretrained_model_name_or_path=model, dataset_name=data, latent_cache=cache,
                        resolution=toy.RESOLUTION)


def _toy_cache_fits(cache: str, model: str) -> bool:
    """The toy's latent cache exists and was encoded by this toy model's VAE and text encoder (a toy
    model rebuilt with another recipe makes its old cache stale: it is rebuilt, not refused)."""
    from .data import CACHE_INDEX
    from .models import encoder_fingerprint

    try:
        with open(os.path.join(cache, CACHE_INDEX)) as f:
            return json.load(f).get("model_fingerprint") == encoder_fingerprint(model)
    except (OSError, ValueError):
        return False


def _trackers(config, accelerator, log):
    """Start the trackers accelerate was given (tensorboard is dropped quietly when not installed)."""
    if not accelerator.log_with:
        return False
    accelerator.init_trackers(config.tracker_name, config={k: v for k, v in config.to_dict().items()
                                                         if isinstance(v, (int, float, str, bool))})
    return True


def _dev(device: torch.device) -> str:
    """A device string safetensors accepts (accelerate's multi-process CPU device is "cpu:0")."""
    return "cpu" if device.type == "cpu" else str(device)


def quiet_libraries() -> None:
    """No per-file progress bars or info chatter from diffusers/transformers; errors still show."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def train(config: TrainConfig) -> dict:
    """Train; returns ``dict(lora=..., metrics=..., plot=..., global_step=...)``."""
    quiet_libraries()
    threads = torch.get_num_threads()
    try:
        with StopRequest() as stop:
            return _train(config, stop)
    finally:
        torch.set_num_threads(threads)  # --cpu_threads must not leak into a caller's process


def _train(config: TrainConfig, stop: StopRequest) -> dict:
    with contextlib.ExitStack() as held:  # the --output_dir lock, held until the run ends
        accelerator = _accelerator(config, held)
        return _train_locked(config, stop, accelerator, accelerator.is_main_process)


def _train_locked(config: TrainConfig, stop: StopRequest, accelerator, main_proc: bool) -> dict:
    log = print if main_proc else (lambda *a, **k: None)
    t_start = time.time()
    config = _prepare_inputs(config, accelerator, log)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    from accelerate.utils import set_seed

    set_seed(config.seed)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    _check_distributed(config, accelerator, log)
    scheduler, unet, reference_unet, named = _build_models(config, device, weight_dtype, log)
    if config.distributed == "fsdp":
        named = _shard(config, accelerator, unet, reference_unet)
    data = _build_data(config, accelerator, unet, weight_dtype, log)
    config = config.replace(resolution=data.resolution)  # a latent cache's or the synthetic UNet's
    sampler = PairBatchSampler(len(data.dataset), config.train_batch_size, config.seed, rank=accelerator.process_index,
                               world=accelerator.num_processes, blocks=data.blocks)  # images: a block-aware shuffle
    if config.max_train_steps is None:
        config = config.replace(max_train_steps=config.num_train_epochs * math.ceil(
            sampler.num_batches() / config.gradient_accumulation_steps))
    state = _build_state(config, accelerator, scheduler, unet, reference_unet, named, data, weight_dtype, log)
    run = _Run(config, accelerator, stop, log, data, sampler, scheduler, state)
    _resume(run)
    run.use_tb = _trackers(config, accelerator, log)
    _write_run_config(run, named)
    if config.run_validation and main_proc:
        from .validation import Validator

        run.validator = Validator(config, state.models.base, device, weight_dtype, lambda: accelerator.trackers)
    stopped = _loop(run)
    if stopped is not None:
        return stopped
    return _finish(run, t_start)


def _accelerator(config: TrainConfig, held: contextlib.ExitStack):
    """The Accelerator, after every rank has checked --output_dir (the main process clears it).

    The main process takes the folder's lock (:mod:`locks`) into ``held`` BEFORE it removes
    anything: a second run on the same folder, even with --overwrite_output_dir, is refused
    with the holder's pid and deletes nothing of the running one."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from .compat import trackers

    resuming = bool(config.resume_from_checkpoint) and (
        config.resume_from_checkpoint != "latest" or bool(ckpt.list_checkpoints(config.output_dir)))
    # a requeue of a run that died before its first checkpoint: "latest" starts it afresh, replacing
    # that run's outputs (the package's own names; a finished run, with its final weights, is refused)
    requeued = (config.resume_from_checkpoint == "latest" and not resuming
                and not any(os.path.exists(os.path.join(config.output_dir, n)) for n in FINAL_OUTPUTS))
    overwrite = bool(config.overwrite_output_dir) or requeued
    # every rank refuses a held folder alike (the main process alone would leave the others at a barrier)
    if os.path.isdir(config.output_dir):  # (not a folder: check_output_dir below says so)
        locks.probe(locks.lock_path(config.output_dir, inside=True), f"output folder {config.output_dir}",
                    "--output_dir")
    ckpt.check_output_dir(config.output_dir, resuming, overwrite, config.logging_dir,
                          remove=False)  # every rank refuses alike; the main process removes (below)
    log_with = trackers(config.report_to)
    # cpu=True without a visible GPU: under torchrun that is what makes accelerate set up DDP over gloo
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              gradient_accumulation_steps=config.gradient_accumulation_steps,
                              mixed_precision=config.mixed_precision,
                              log_with=log_with or None,
                              project_config=ProjectConfiguration(project_dir=config.output_dir,
                                                                  logging_dir=os.path.join(config.output_dir,
                                                                                           config.logging_dir)))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.makedirs(config.output_dir, exist_ok=True)
        held.enter_context(locks.hold(locks.lock_path(config.output_dir, inside=True),
                                      f"output folder {config.output_dir}", "--output_dir"))
        ckpt.check_output_dir(config.output_dir, resuming, overwrite, config.logging_dir)
        ckpt.start_record(config.output_dir, config.logging_dir)
        held.callback(ckpt.record_outputs, config.output_dir, config.logging_dir)  # however the run ends
    accelerator.wait_for_everyone()
    if accelerator.device.type == "cpu" and getattr(config, "cpu_threads", None):
        torch.set_num_threads(config.cpu_threads)
    return accelerator


def _prepare_inputs(config: TrainConfig, accelerator, log) -> TrainConfig:
    """The toy model/data (--toy) and the latent cache (--cache_latents), built by the main process;
    returns the config that trains from them."""
    main_proc = accelerator.is_main_process
    if config.toy:
        if main_proc:
            config = _prepare_toy(config, log)
        accelerator.wait_for_everyone()
        if not main_proc:
            config = _prepare_toy(config, lambda *a, **k: None)
    if config.cache_latents and not config.latent_cache:
        from .cache import build_cache, cache_dtype

        config = config.replace(latent_cache=os.path.join(config.output_dir, "latent_cache"))
        if main_proc:
            build_cache(config.pretrained_model_name_or_path, config.dataset_name, config.latent_cache,
                        split=config.dataset_split_name, resolution=config.resolution,
                        flip_ratio=config.inject_label_noise, flip_seed=config.flip_seed,
                        max_pairs=config.max_train_samples, seed=config.seed,
                        device=_dev(accelerator.device), variant=config.variant, log=log, hflip=not config.no_hflip,
                        random_crop=config.random_crop, vae_path=config.pretrained_vae_model_name_or_path,
                        dtype=cache_dtype(config.mixed_precision), num_workers=config.dataloader_num_workers,
                        distributed=False, progress=not config.quiet)
        accelerator.wait_for_everyone()
    return config


def _build_models(config: TrainConfig, device, weight_dtype, log):
    """``(noise scheduler, UNet, frozen reference UNet or None, [(name, trained parameter)])``."""
    if config.pretrained_model_name_or_path:
        scheduler = load_scheduler(config.pretrained_model_name_or_path, config.prediction_type)
    else:  # --unet_config without a model folder: SD's training scheduler
        scheduler = sd_scheduler(config.prediction_type or "epsilon")
    unet = (build_unet(config.unet_config, config.seed) if config.unet_config
            else load_unet(config.pretrained_model_name_or_path, config.variant))
    set_attention(unet, config.attention, log)
    reference_unet = None
    if config.full_finetune:
        # fp32 master weights (autocast runs them in --mixed_precision); the reference is a frozen copy
        import copy

        unet.to(device)
        reference_unet = copy.deepcopy(unet).to(dtype=weight_dtype).requires_grad_(False).eval()
        unet.requires_grad_(True)
        named = list(unet.named_parameters())
    else:
        unet.to(device, dtype=weight_dtype)
        named = add_lora(unet, config.rank, config.lora_alpha,
                         [t.strip() for t in config.lora_target_modules.split(",")], config.lora_init)
    if config.channels_last:
        unet.to(memory_format=torch.channels_last)
        if reference_unet is not None:
            reference_unet.to(memory_format=torch.channels_last)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return scheduler, unet, reference_unet, named


@dataclasses.dataclass
class _Data:
    dataset: object
    collate: object
    flip_record: Optional[dict]
    stats: dict
    resolution: int  # of the pairs' images (a latent cache's may differ from --resolution)
    vae: object = None
    text_encoder: object = None
    blocks: object = None  # from images: the source block of each pair (PairBatchSampler's block-aware shuffle)


def _build_data(config: TrainConfig, accelerator, unet, weight_dtype, log) -> _Data:
    """The pair dataset: synthetic, a latent cache, or images encoded in every step."""
    device = accelerator.device
    stat_keys = ("num_rows", "num_ties", "num_corrupt", "num_pairs")
    if config.synthetic_pairs:
        tokens, width, pooled = text_shape(config.unet_config)
        ss = unet.config.sample_size
        dataset = SyntheticPairDataset(config.synthetic_pairs, (unet.config.in_channels, ss, ss), (tokens, width),
                                       pooled, resolution=ss * 8, seed=config.seed)
        data = _Data(dataset, collate_cached, None, {k: dataset.meta[k] for k in stat_keys}, ss * 8)
    elif config.latent_cache:
        if config.inject_label_noise and not config.toy:
            log("note: --inject_label_noise is applied when the cache is built; the cache's flips are used")
        dataset = CachedPairDataset(config.latent_cache)
        meta = dataset.meta
        check_cache_fits(config, meta, dataset, unet, log)
        data = _Data(dataset, collate_cached,
                     {k: meta[k] for k in ("flip_ratio", "flip_seed", "flipped_pairs", "flipped_rows")},
                     {k: meta[k] for k in stat_keys},
                     meta.get("resolution", config.resolution))  # what the latents were made at
    else:
        if not config.dataset_name:
            raise UserError("give --dataset_name or --latent_cache")
        pairs = PickAPicPairs(config.dataset_name, config.dataset_split_name, config.inject_label_noise,
                              config.flip_seed, config.max_train_samples)
        vae = load_vae(config.pretrained_model_name_or_path, config.variant,
                       config.pretrained_vae_model_name_or_path).to(device, dtype=weight_dtype)
        text_encoder = load_text_encoders(config.pretrained_model_name_or_path, config.variant).to(device, weight_dtype)
        dataset = ImagePairDataset(pairs, text_encoder, config.resolution, hflip=not config.no_hflip,
                                   random_crop=config.random_crop, seed=config.seed)
        data = _Data(dataset, collate_images, pairs.flip_record(),
                     {"num_rows": pairs.num_rows, "num_ties": pairs.num_ties, "num_corrupt": None,
                      "num_pairs": len(pairs)}, config.resolution, vae, text_encoder, pairs.block)
    if accelerator.is_main_process and data.flip_record is not None:
        with open(os.path.join(config.output_dir, "flipped_pairs.json"), "w") as f:
            json.dump(data.flip_record, f)
    return data


def _optimizer(config: TrainConfig, params: list, accelerator, num_training_steps: int):
    """AdamW (fused on CUDA, or bitsandbytes' 8-bit) and the LR schedule."""
    from diffusers.optimization import get_scheduler

    lr = config.learning_rate
    if config.scale_lr:
        lr *= config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
    fused = accelerator.device.type == "cuda" if config.fused_adamw is None else config.fused_adamw
    adamw = torch.optim.AdamW
    if config.use_8bit_adam:  # compat.check made sure bitsandbytes is installed
        import bitsandbytes as bnb

        adamw, fused = bnb.optim.AdamW8bit, False
    optimizer = adamw(params, lr=lr, betas=(config.adam_beta1, config.adam_beta2),
                      weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
                      **({"fused": True} if fused else {}))
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=num_training_steps * accelerator.num_processes,
                                 num_cycles=config.lr_num_cycles, power=config.lr_power)
    return optimizer, lr_scheduler


# what --distributed fsdp does not combine with, and why
_FSDP_REFUSED = (
    ("compile", "--compile: torch.compile of an FSDP2-sharded UNet is not tested here; leave it off"),
    ("use_8bit_adam", "--use_8bit_adam: bitsandbytes' optimizer does not take sharded (DTensor) parameters"),
    ("run_validation", "--run_validation: the validation pipeline runs on one process and needs whole weights"),
)


def _check_distributed(config: TrainConfig, accelerator, log) -> None:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        raise UserError("accelerate's FSDP plugin is not how this trainer shards: launch with a multi-GPU "
                        "config (docs/accelerate/ddp.yaml) or torchrun and pass --distributed fsdp")
    if config.distributed == "fsdp":
        if accelerator.num_processes < 2:
            raise UserError("--distributed fsdp shards over several processes: launch with accelerate launch "
                            "(docs/accelerate/ddp.yaml) or torchrun --nproc_per_node N, N >= 2")
        if config.mixed_precision == "fp16":
            raise UserError("--distributed fsdp with --mixed_precision fp16 is not supported (it needs a sharded "
                            "gradient scaler): use bf16")
        for flag, why in _FSDP_REFUSED:
            if getattr(config, flag):
                raise UserError(f"--distributed fsdp does not combine with {why}")
        if config.batched_annotators and not config.full_finetune:
            log("note: --batched_annotators is not used with --distributed fsdp; EMA shards are swapped in place")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # Tried (deepspeed 0.19.8, CPU): the step fails at once, DeepSpeed's clip_grad_norm_ returns a float
        # and steps the optimiser inside backward, so the on-device skip of a non-finite step cannot work.
        raise UserError("DeepSpeed is not supported (see docs/trainer.md, 'At scale'); use DDP "
                         "(docs/accelerate/ddp.yaml)")


def _save_weights(accelerator, full_finetune: bool, models, weights, output_dir) -> None:
    """accelerate save-state hook: the trained weights as safetensors (LoRA also in diffusers' format)."""
    from safetensors.torch import save_file

    if accelerator.is_main_process:
        m = accelerator.unwrap_model(models[0])
        if full_finetune:
            save_file({k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()},
                      os.path.join(output_dir, "unet.safetensors"))
        else:
            save_file(lora_state_dict(m), os.path.join(output_dir, "lora.safetensors"))
            save_lora_diffusers(m, output_dir)  # the checkpoint loads into a pipeline as it is
    while weights:
        weights.pop()


def _load_weights(accelerator, full_finetune: bool, models, input_dir) -> None:
    """accelerate load-state hook: the counterpart of :func:`_save_weights`."""
    from safetensors.torch import load_file

    while models:
        m = accelerator.unwrap_model(models.pop())
        if full_finetune:
            m.load_state_dict(load_file(os.path.join(input_dir, "unet.safetensors")))
        else:
            load_lora_state_dict(m, load_file(os.path.join(input_dir, "lora.safetensors")))


def _shard(config: TrainConfig, accelerator, unet, reference_unet):
    """--distributed fsdp: the UNet (and a full fine-tune's reference) sharded over every process; returns
    the trained ``[(name, parameter)]`` (the modules are sharded in place; the parameters are now DTensors)."""
    from . import fsdp

    mesh = fsdp.device_mesh(accelerator.device)
    policy = fsdp.mixed_precision_policy(config.mixed_precision)
    fsdp.shard_unet(unet, mesh, policy)
    if reference_unet is not None:
        fsdp.shard_unet(reference_unet, mesh, policy)
    return [(n, p) for n, p in unet.named_parameters() if p.requires_grad]


def _build_annotators(config: TrainConfig, cfg, base_unet, named, log):
    if not (cfg.adaptive and config.ema_decays):
        return None
    names, params = [n for n, _ in named], [p for _, p in named]
    if config.distributed == "fsdp":
        from . import fsdp

        return EMAAnnotators(params, names, config.ema_decays, after_swap=functools.partial(fsdp.reshard, base_unet))
    if config.batched_annotators and not config.full_finetune:
        return MixedBatchAnnotators(base_unet, params, names, config.ema_decays)
    if config.batched_annotators:
        log("note: --batched_annotators needs LoRA adapters; a full fine-tune swaps EMA weights in place")
    return EMAAnnotators(params, names, config.ema_decays)


def _build_state(config: TrainConfig, accelerator, scheduler, unet, reference_unet, named, data: _Data,
                 weight_dtype, log) -> TrainState:
    """Optimiser, compilation, accelerate's prepare and hooks, annotators, generators: the TrainState."""
    params = [p for _, p in named]
    optimizer, lr_scheduler = _optimizer(config, params, accelerator, config.max_train_steps)
    sharded = config.distributed == "fsdp"
    if (accelerator.device.type == "cuda" and not sharded) if config.compile is None else config.compile:
        compile_unet(unet, mode=config.compile_mode)
        if reference_unet is not None:
            compile_unet(reference_unet, mode=config.compile_mode)
    if sharded:  # FSDP2 is applied already (_shard); accelerate wraps the optimizer and schedule only
        optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
        base_unet = unet
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        base_unet = accelerator.unwrap_model(unet, keep_torch_compile=True)
        accelerator.register_save_state_pre_hook(functools.partial(_save_weights, accelerator, config.full_finetune))
        accelerator.register_load_state_pre_hook(functools.partial(_load_weights, accelerator, config.full_finetune))
    annotators = _build_annotators(config, config.loss_config, base_unet, named, log)
    device, rank = accelerator.device, accelerator.process_index
    # noise/timesteps: one stream for the global batch on every process (step_inputs takes this rank's
    # rows); VAE latent samples (image path): a stream per process, since each encodes its own images
    gen = torch.Generator(device=device).manual_seed(config.seed * 7919)
    vae_gen = torch.Generator(device=device).manual_seed(config.seed * 7919 + 104729 * (rank + 1))
    options = StepOptions(ema_warmup_steps=config.ema_warmup_steps, loss_backend=config.loss_backend,
                          max_grad_norm=config.max_grad_norm, dump_pairs=bool(config.dump_pairs),
                          channels_last=bool(config.channels_last), vae_chunk=config.vae_encode_batch_size)
    state = TrainState(accelerator=accelerator, models=StepModels(unet, base_unet, reference_unet, annotators),
                       optimizer=optimizer, lr_scheduler=lr_scheduler, params=params, noise_scheduler=scheduler,
                       cfg=config.loss_config, gen=gen, weight_dtype=weight_dtype, options=options,
                       annotators=annotators, vae_gen=vae_gen, text_encoder=data.text_encoder, vae=data.vae)
    if not sharded:  # save_state/load_state hold it (under FSDP the trainer saves it the same way, by hand)
        accelerator.register_for_checkpointing(state)
    return state


class _Run:
    """The loop's surroundings: arguments, output paths, the progress bar, the validator."""

    def __init__(self, config: TrainConfig, accelerator, stop: StopRequest, log, data: _Data,
                 sampler: PairBatchSampler, scheduler, state: TrainState):
        self.config, self.accelerator, self.stop, self.log, self.data = config, accelerator, stop, log, data
        self.scheduler, self.state = scheduler, state
        self.main_proc = accelerator.is_main_process
        self.world = accelerator.num_processes
        self.sharded = config.distributed == "fsdp"
        self.metrics_path = os.path.join(config.output_dir, "metrics.jsonl")
        self.pairs_path = os.path.join(config.output_dir, "pairs.jsonl")
        self.sampler = sampler
        self.loader = torch.utils.data.DataLoader(data.dataset, batch_sampler=self.sampler,
                                                  collate_fn=data.collate, num_workers=config.dataloader_num_workers)
        self.batches_per_epoch = self.sampler.num_batches()
        self.num_epochs = math.ceil(config.max_train_steps * config.gradient_accumulation_steps
                                    / self.batches_per_epoch) + 1
        self.progress = None
        self.validator = None
        self.use_tb = False
        self.t_log = time.time()


def _resume(run: _Run) -> None:
    """Remove crashed saves; restore a checkpoint (--resume_from_checkpoint) or start the logs afresh."""
    from safetensors.torch import load_file

    config, st, acc = run.config, run.state, run.accelerator
    if run.main_proc:
        ckpt.remove_partial(config.output_dir)  # left by a save that crashed: never complete
    resume = ckpt.resolve(config.output_dir, config.resume_from_checkpoint, run.log)
    if config.resume_from_checkpoint and resume is None:
        run.log(f"no checkpoint in {config.output_dir}; starting fresh")
    if not resume:
        for path in (run.metrics_path, run.pairs_path):
            if run.main_proc and os.path.exists(path):
                os.remove(path)
        return
    saved = ckpt.read_state(resume)
    if saved.get("distributed", "ddp") != config.distributed:
        raise UserError(f"--resume_from_checkpoint: {resume} was written with --distributed "
                        f"{saved.get('distributed', 'ddp')}; resume it with the same")
    _check_recorded(run, saved, resume)
    if not os.path.isfile(os.path.join(resume, TRAIN_STATE_FILE)):
        raise UserError(f"--resume_from_checkpoint: {resume} was written by an older adpo-train (no "
                        f"{TRAIN_STATE_FILE}); resume it with the version that wrote it")
    if run.sharded:
        _load_sharded(run, resume, saved)
    else:
        acc.load_state(resume)  # the TrainState too (registered for checkpointing)
    st.load_rank_state(load_file(os.path.join(resume, f"trainer_rng_{acc.process_index}.safetensors")))
    run.log(f"resumed from {resume} at step {st.global_step} (epoch {st.epoch}, batch {st.batch_in_epoch})")
    for path in (run.metrics_path, run.pairs_path):
        if run.main_proc:
            jsonl.trim(path, st.global_step, run.log)


def _load_sharded(run: _Run, path: str, saved: dict) -> None:
    """Resume --distributed fsdp: each rank reads its shards (DCP), then the schedule and counters."""
    from . import fsdp

    from accelerate.checkpointing import load_custom_state

    st, acc = run.state, run.accelerator
    load_custom_state(st, path, 0)  # the TrainState, as accelerate's load_state would (EMA step counts first)
    fsdp.load(os.path.join(path, fsdp.DCP_FOLDER), st.models.unet, st.optimizer.optimizer, st.annotators)
    st.lr_scheduler.load_state_dict(torch.load(os.path.join(path, SCHEDULER_FILE), weights_only=True))
    acc.step = saved["accelerator_step"]


def _recorded(run: _Run) -> dict:
    """What a checkpoint records of the options a resume must not change (JSON values)."""
    c = run.config
    keys = RESUME_CHECKED + (() if c.lr_scheduler in CONSTANT_SCHEDULES else ("max_train_steps",))
    rec = {k: getattr(c, k) for k in keys}
    rec["processes"] = run.world
    rec["loss"] = dataclasses.asdict(run.state.cfg)
    return json.loads(json.dumps(rec, default=str))


def _check_recorded(run: _Run, saved: dict, resume: str) -> None:
    """Refuse a resume whose math or data order differs from the checkpoint's (one line, old and new),
    unless --allow_config_change (then the log names each change)."""
    old, new = saved.get("recorded"), _recorded(run)
    if old is None:  # written before checkpoints recorded it
        return
    changes = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if k == "loss" and isinstance(a, dict) and isinstance(b, dict):
            changes += [f"loss {f}: {a.get(f)!r} -> {b.get(f)!r}" for f in sorted(set(a) | set(b))
                        if a.get(f) != b.get(f)]
        elif k in old and k in new and a != b:
            changes.append(f"{'--' + k if k != 'processes' else 'processes'}: {a!r} -> {b!r}")
    if not changes:
        return
    fixed = [c for c in changes if c.split(":")[0].lstrip("-") in RESUME_FIXED]
    if fixed:
        raise UserError(f"--resume_from_checkpoint: {os.path.basename(resume)} holds tensors of other shapes ("
                        + "; ".join(fixed) + "); these cannot change on a resume: resume with the same, or start "
                        "a new run in another --output_dir")
    if not run.config.allow_config_change:
        raise UserError(f"--resume_from_checkpoint: {os.path.basename(resume)} was trained with other settings ("
                        + "; ".join(changes) + "); resume with the same, or pass --allow_config_change")
    run.log("note: resuming with changed settings (--allow_config_change): " + "; ".join(changes))


def _write_run_config(run: _Run, named) -> None:
    config, cfg, st = run.config, run.state.cfg, run.state
    n_params = sum(p.numel() for _, p in named)
    if run.main_proc:
        path = os.path.join(config.output_dir, "train_config.json")
        record = {"args": config.to_dict(), "beta": cfg.beta, "beta_convention": config.beta_convention,
                  "loss_config": dataclasses.asdict(cfg), "data": run.data.stats, "lora_parameters": n_params,
                  "started_at_step": st.global_step, "history": []}
        if st.global_step > 0 and os.path.isfile(path):  # a resume: the earlier segments are kept, oldest first
            try:
                with open(path) as f:
                    prev = json.load(f)
                record["history"] = prev.pop("history", []) + [prev]
            except (OSError, ValueError):
                run.log(f"note: {path} was unreadable; its earlier segments are not kept")
        safedir.write_json(path, record, indent=1, default=str)
    run.log(f"adpo-train: {len(run.data.dataset)} pairs, {run.batches_per_epoch} batches/epoch of "
            f"{config.train_batch_size} pairs, {config.max_train_steps} steps, "
            f"{'Adaptive-DPO' if cfg.adaptive else 'Diffusion-DPO'} beta={cfg.beta:g} ({config.beta_convention}), "
            f"{len(config.ema_decays)} EMA annotator(s), "
            + ("full fine-tune" if config.full_finetune else f"LoRA r={config.rank}")
            + f" ({n_params:,} params), {run.scheduler.config.prediction_type}, device {st.device}"
            + (f" x {run.world} processes" if run.world > 1 else "") + (" (FSDP)" if run.sharded else ""))


def flush_pairs(run: _Run) -> None:
    """Append the per-pair rows kept since the last flush to pairs.jsonl (--dump_pairs)."""
    rows = run.state.pair_rows
    if run.main_proc and rows:
        jsonl.append(run.pairs_path, ({"step": int(r[0]), "pair": int(r[1]), "logit": r[2], "metric": r[3],
                                       "weight": r[4], "flipped": bool(r[5])} for r in torch.cat(rows).tolist()))
    rows.clear()


def _write_checkpoint_files(run: _Run, meta: dict, path: str) -> dict:
    """Fill checkpoint folder ``path`` with this rank's files; returns ``meta`` (trainer_state.json)."""
    from safetensors.torch import save_file

    st, acc = run.state, run.accelerator
    if run.sharded:
        _write_sharded(run, path)
    else:
        acc.save_state(path, safe_serialization=True)  # the TrainState too (registered for checkpointing)
    save_file(st.rank_state(), os.path.join(path, f"trainer_rng_{acc.process_index}.safetensors"))
    return meta


def _write_sharded(run: _Run, path: str) -> None:
    """--distributed fsdp: every rank's shards of the trained parameters, optimizer state and EMA annotators
    (DCP), the LR schedule, and (LoRA) the gathered adapter as a loadable LoRA, as in every checkpoint."""
    from accelerate.checkpointing import save_custom_state
    from safetensors.torch import save_file

    from . import fsdp

    st, config = run.state, run.config
    save_custom_state(st, path, 0)  # the main process writes the TrainState, as accelerate's save_state would
    fsdp.save(os.path.join(path, fsdp.DCP_FOLDER), st.models.unet, st.optimizer.optimizer, st.annotators)
    if run.main_proc:
        torch.save(st.lr_scheduler.state_dict(), os.path.join(path, SCHEDULER_FILE))
    if not config.full_finetune:  # the adapter is small: gathered on the main process, one tensor at a time
        full = fsdp.full_state_dict(st.models.unet, run.main_proc, trainable_only=True)
        if run.main_proc:
            save_file(lora_state_dict(st.models.base, full), os.path.join(path, "lora.safetensors"))
            save_lora_diffusers(st.models.base, path, full)


def write_checkpoint(run: _Run) -> str:
    """An atomic ``checkpoint-<step>`` of the run at its current step and data position."""
    flush_pairs(run)
    config, st, acc = run.config, run.state, run.accelerator
    step = st.global_step
    meta = {"global_step": step, "epoch": st.epoch, "batch_in_epoch": st.batch_in_epoch,
            "num_corrupt_seen": st.num_corrupt_seen, "steps_since_log": st.steps_since_log,
            "skipped_steps_total": st.skipped_total, "world_size": acc.num_processes,
            "distributed": config.distributed, "accelerator_step": acc.step, "recorded": _recorded(run),
            "ema": st.annotators.state_meta() if st.annotators is not None else None}
    write = functools.partial(_write_checkpoint_files, run, meta)
    acc.wait_for_everyone()
    if acc.num_processes == 1:
        return ckpt.save_atomic(config.output_dir, step, write, config.checkpoints_total_limit)
    # several processes: every rank writes its files into the main process's temporary folder
    tmp = ckpt.tmp_path(config.output_dir, step)
    if run.main_proc:
        ckpt.begin(config.output_dir, step)
    acc.wait_for_everyone()
    write(tmp)
    acc.wait_for_everyone()
    path = ckpt.finish(config.output_dir, step, meta, config.checkpoints_total_limit) if run.main_proc else tmp
    acc.wait_for_everyone()
    return path


def _end(accelerator) -> None:
    """Close the trackers and the process group, once every rank is here (a rank that tears the group
    down while another still talks to it aborts the other, under gloo)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _interrupted(run: _Run, signum: int) -> Interrupted:
    """Checkpoint (unless this step already has one) and end the run after a signal."""
    step = run.state.global_step
    path = ckpt.list_checkpoints(run.config.output_dir)
    path = path[-1][1] if path and path[-1][0] == step else None
    if path is None and step > 0:
        path = write_checkpoint(run)
    if run.progress is not None:
        run.progress.close()
    _end(run.accelerator)
    hint = ("Resume with the same command plus --resume_from_checkpoint latest." if path else
            "Nothing to resume: run again with --overwrite_output_dir.")
    return Interrupted(signum, step, path, hint)


def _loop(run: _Run) -> Optional[dict]:
    """Train to --max_train_steps; returns the result of a --stop_after_steps stop, else None."""
    config, st = run.config, run.state
    if run.main_proc and not config.quiet:
        from tqdm.auto import tqdm

        run.progress = tqdm(total=config.max_train_steps, initial=st.global_step, desc="adpo-train",
                            dynamic_ncols=True)
    run.t_log = time.time()
    st.models.unet.train()
    run.stop.arm()
    done = st.global_step >= config.max_train_steps
    while not done and st.epoch < run.num_epochs:
        run.sampler.set_epoch(st.epoch, st.batch_in_epoch)
        for batch in run.loader:
            st.batch_in_epoch += 1
            st.num_corrupt_seen += batch["num_corrupt"]
            if batch["num_pairs"] == 0:
                continue
            metrics = train_step(st, batch)
            if not metrics.synced:
                continue
            stopped = _after_step(run, metrics)
            if stopped is not None:
                return stopped
            if st.global_step >= config.max_train_steps:
                done = True
                break
        if not done:
            st.epoch, st.batch_in_epoch = st.epoch + 1, 0
    if run.progress is not None:
        run.progress.close()
    return None


def _after_step(run: _Run, metrics: StepMetrics) -> Optional[dict]:
    """Log, validate, checkpoint and honour stop requests after an optimisation step."""
    config, st, acc = run.config, run.state, run.accelerator
    synced, agreed_signal = False, None
    if run.progress is not None:
        run.progress.update(1)
    if st.global_step % config.logging_steps == 0 or st.global_step >= config.max_train_steps:
        _log_metrics(run, metrics.ready)
        synced = True
        if run.world > 1:  # a signal may reach one rank only (or arrive mid-sync): agree on a snapshot
            local = run.stop.signum
            sig = acc.reduce(torch.tensor([float(local or 0)], device=st.device), "sum")
            agreed_signal = (local or 15) if sig.item() > 0 else None  # 15: SIGTERM
    if run.validator is not None and st.global_step % config.validation_steps == 0:
        run.log(f"\nvalidation images: {run.validator.run(st.global_step)}")
    stop_signal = run.stop.signum if run.world == 1 else (agreed_signal if synced else None)
    stop_early = config.stop_after_steps is not None and st.global_step >= config.stop_after_steps
    if st.global_step % config.checkpointing_steps == 0 or stop_early or st.global_step >= config.max_train_steps:
        path = write_checkpoint(run)
        run.log(f"\ncheckpoint: {path}" if run.progress is not None else f"checkpoint: {path}")
    if stop_signal:
        raise _interrupted(run, stop_signal)
    if not stop_early:
        return None
    if run.progress is not None:
        run.progress.close()
    run.log(f"stopped after {st.global_step} steps (--stop_after_steps); resume with "
            f"--resume_from_checkpoint latest")
    _end(acc)
    return {"global_step": st.global_step, "stopped": True, "output_dir": config.output_dir}


def _log_metrics(run: _Run, ready: bool) -> None:
    """The one host sync per logging interval: read (and, with several processes, sum) the metric buffer,
    take skipped steps back from the schedules, append a metrics.jsonl record."""
    st, world = run.state, run.world
    vals = (run.accelerator.reduce(st.buf.clone(), "sum") if world > 1 else st.buf).tolist()
    st.buf.zero_()
    skipped = round(vals[F["skipped_steps"]] / world)  # the same on every rank
    skip.rewind(skipped, st.lr_scheduler, st.annotators, world)
    st.skipped_total += skipped
    st.steps_since_log -= skipped
    st.global_step -= skipped
    if run.progress is not None and skipped:
        run.progress.update(-skipped)
    n = max(vals[F["micro_batches"]] - vals[F["nonfinite"]], 1.0)
    rec = {"step": st.global_step, "epoch": st.epoch}
    rec.update({k: vals[F[k]] / n for k in ("loss", "implicit_acc", "weight_mean", "metric_mean", "logit_mean",
                                            "model_mse", "ref_mse")})
    rec.update({"grad_norm": vals[F["grad_norm"]] / max(st.steps_since_log, 1) / world,  # real steps
                "nonfinite_micro_batches": int(vals[F["nonfinite"]]), "skipped_steps": skipped,
                "skipped_steps_total": st.skipped_total, "lr": st.lr_scheduler.get_last_lr()[0],
                "annotators_ready": ready, "corrupt_pairs_seen": st.num_corrupt_seen,
                "steps_per_s": st.steps_since_log / max(time.time() - run.t_log, 1e-9)})
    if vals[F["flipped_count"]] > 0:
        rec["weight_mean_flipped"] = vals[F["flipped_weight_sum"]] / vals[F["flipped_count"]]
        rec["weight_mean_clean"] = vals[F["clean_weight_sum"]] / max(vals[F["clean_count"]], 1.0)
    run.t_log, st.steps_since_log = time.time(), 0
    flush_pairs(run)
    if not run.main_proc:
        return
    jsonl.append(run.metrics_path, [rec])  # one whole line (a full disk leaves at most a torn tail)
    if run.use_tb:
        run.accelerator.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=st.global_step)
    if run.progress is not None:
        run.progress.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['implicit_acc']:.3f}",
                                 w=f"{rec['weight_mean']:.3f}")


def _finish(run: _Run, t_start: float) -> dict:
    """Write the final weights, the EMA annotators, the per-rank memory and the plot; report where they are."""
    config, st, acc = run.config, run.state, run.accelerator
    acc.wait_for_everyone()
    result = {"global_step": st.global_step, "output_dir": config.output_dir, "stopped": False,
              "metrics": run.metrics_path,
              "lora": None if config.full_finetune else os.path.join(config.output_dir, LORA_WEIGHT_NAME)}
    if config.full_finetune:
        result["unet"] = os.path.join(config.output_dir, "unet")
    _export(run, result)
    memory = _rank_memory(run)
    if run.main_proc:
        with open(os.path.join(config.output_dir, MEMORY_FILE), "w") as f:
            json.dump(memory, f, indent=1)
        plot = None
        if not config.no_plot:
            from .plot import plot_metrics

            plot = plot_metrics(run.metrics_path, os.path.join(config.output_dir, "training_curves.png"))
        result["plot"] = plot
        _report(run, result, t_start)
    _end(acc)
    if st.global_step < config.max_train_steps:
        raise RunCutShort(f"the run ended at step {st.global_step} of --max_train_steps {config.max_train_steps}: "
                          f"the data ran out ({st.num_corrupt_seen} corrupt pairs dropped, {st.skipped_total} "
                          f"non-finite steps skipped); outputs are written. Use more data or fewer steps.")
    return result


def _export(run: _Run, result: dict) -> None:
    """The trained UNet (diffusers folder) or LoRA (diffusers file) and the EMA annotators, written by the
    main process; under FSDP gathered one tensor at a time (every rank takes part, no rank holds more
    than one whole tensor beyond the small LoRA)."""
    from safetensors.torch import save_file

    from . import fsdp

    config, st, acc, main = run.config, run.state, run.accelerator, run.main_proc
    if config.full_finetune and run.sharded:
        if main:
            st.models.base.save_config(result["unet"])
        fsdp.save_gathered(os.path.join(result["unet"], "diffusion_pytorch_model.safetensors"),
                           st.models.unet.state_dict(), main, {"format": "pt"})
    elif config.full_finetune and main:
        acc.unwrap_model(st.models.unet).save_pretrained(result["unet"], safe_serialization=True)
    elif not config.full_finetune:
        full = fsdp.full_state_dict(st.models.unet, main, trainable_only=True) if run.sharded else None
        if main:
            save_lora_diffusers(st.models.base, config.output_dir, full)
    if st.annotators is None:
        return
    path = os.path.join(config.output_dir, "ema_annotators.safetensors")
    meta = {"decays": json.dumps(st.annotators.decays)}
    if run.sharded:
        fsdp.save_gathered(path, fsdp.ema_state(st.annotators), main, meta)
    elif main:
        save_file(st.annotators.state_tensors(), path, metadata=meta)


def _rank_memory(run: _Run) -> dict:
    """Bytes each rank holds of parameters, optimizer state and EMA shadows (tensor sizes, counted)."""
    from . import fsdp

    st = run.state
    mine = fsdp.rank_memory(st.models.unet, st.models.reference_unet, st.optimizer, st.annotators)
    return {"distributed": run.config.distributed if run.world > 1 else "none", "world_size": run.world,
            "ranks": fsdp.all_ranks(mine, run.world)}


def _report(run: _Run, result: dict, t_start: float) -> None:
    config, log = run.config, run.log
    log(f"\ndone: {run.state.global_step} steps in {time.time() - t_start:.0f}s")
    if config.full_finetune:
        log(f"  UNet (diffusers format): {result['unet']}")
    else:
        log(f"  LoRA (diffusers format): {result['lora']}")
    log(f"  metrics:                 {run.metrics_path}")
    if result["plot"]:
        log(f"  plot:                    {result['plot']}")
    if run.data.flip_record and run.data.flip_record.get("flipped_pairs"):
        log(f"  flipped pairs:           {os.path.join(config.output_dir, 'flipped_pairs.json')}")
    if config.dump_pairs:
        log(f"  per-pair dump:           {run.pairs_path}")
    if run.validator is not None:
        log(f"  validation images:       {run.validator.run(run.state.global_step, final=True)}")
