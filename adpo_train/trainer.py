"""The training loop: Adaptive-DPO (or plain Diffusion-DPO) on a LoRA of a diffusers UNet.

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

import dataclasses
import json
import math
import os
import shutil
import time
from argparse import Namespace

import torch

import adpo_kernels as ak

from . import checkpoint as ckpt
from . import skip
from .annotators import EMAAnnotators, MixedBatchAnnotators
from .cache import check_cache_fits
from .compat import beta_note
from .data import (CachedPairDataset, ImagePairDataset, PairBatchSampler, PickAPicPairs, SyntheticPairDataset,
                   collate_cached, collate_images)
from .models import (LORA_WEIGHT_NAME, add_lora, build_unet, load_lora_state_dict, load_scheduler,
                     load_text_encoders, load_unet, load_vae, lora_state_dict, save_lora_diffusers, set_attention,
                     text_shape)
from .errors import Interrupted, RunCutShort, UserError
from .signals import StopRequest
from .step import StepModels, compile_unet, step_inputs

# Device-side metric buffer: one slot per field, summed over optimisation steps between logs.
FIELDS = ("loss", "implicit_acc", "weight_mean", "metric_mean", "logit_mean", "model_mse", "ref_mse",
          "grad_norm", "nonfinite", "micro_batches", "skipped_steps", "flipped_weight_sum", "flipped_count",
          "clean_weight_sum", "clean_count")
F = {name: i for i, name in enumerate(FIELDS)}
_COUNTERS = torch.tensor([name in ("nonfinite", "micro_batches", "skipped_steps") for name in FIELDS])


def _prepare_toy(args: Namespace, log) -> None:
    """Materialise the toy model, dataset and latent cache under OUTPUT_DIR/toy (reused when present)."""
    from . import toy
    from .cache import build_cache

    root = os.path.join(args.output_dir, "toy")
    pt = args.prediction_type or "epsilon"
    model = toy.write_toy_model(os.path.join(root, f"model-{pt}"), prediction_type=pt, log=log)
    data = os.path.join(root, "data", f"pick_a_pic_toy_{args.toy_pairs}.parquet")
    if not os.path.isfile(data):
        toy.write_toy_dataset(data, args.toy_pairs)
    cache = os.path.join(root, f"cache-{pt}-{args.toy_pairs}-flip{args.flip_ratio}-seed{args.flip_seed}")
    if not os.path.isfile(os.path.join(cache, "index.json")):
        build_cache(model, data, cache, resolution=toy.RESOLUTION, batch_size=64, flip_ratio=args.flip_ratio,
                    flip_seed=args.flip_seed, max_pairs=args.max_train_samples, seed=args.seed, device="cpu", log=log)
    args.pretrained_model_name_or_path, args.dataset_name, args.latent_cache = model, data, cache
    args.resolution = toy.RESOLUTION


def _trackers(args, accelerator, log):
    """Start the trackers accelerate was given (tensorboard is dropped quietly when not installed)."""
    if not accelerator.log_with:
        return False
    accelerator.init_trackers(args.tracker_name, config={k: v for k, v in vars(args).items()
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


def train(args: Namespace) -> dict:
    """Train; returns ``dict(lora=..., metrics=..., plot=..., global_step=...)``."""
    quiet_libraries()
    threads = torch.get_num_threads()
    try:
        with StopRequest() as stop:
            return _train(args, stop)
    finally:
        torch.set_num_threads(threads)  # --cpu_threads must not leak into a caller's process


def _train(args: Namespace, stop: StopRequest) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from safetensors.torch import load_file, save_file

    resuming = bool(args.resume_from_checkpoint) and (
        args.resume_from_checkpoint != "latest" or bool(ckpt.list_checkpoints(args.output_dir)))
    ckpt.check_output_dir(args.output_dir, resuming, bool(args.overwrite_output_dir), args.logging_dir,
                          remove=False)  # every rank refuses alike; the main process removes (below)
    from .compat import trackers

    log_with = trackers(args.report_to)
    # cpu=True without a visible GPU: under torchrun that is what makes accelerate set up DDP over gloo
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision,
                              log_with=log_with or None,
                              project_config=ProjectConfiguration(project_dir=args.output_dir,
                                                                  logging_dir=os.path.join(args.output_dir,
                                                                                           args.logging_dir)))
    main_proc = accelerator.is_main_process
    accelerator.wait_for_everyone()
    if main_proc:
        ckpt.check_output_dir(args.output_dir, resuming, bool(args.overwrite_output_dir), args.logging_dir)
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()
    if accelerator.device.type == "cpu" and getattr(args, "cpu_threads", None):
        torch.set_num_threads(args.cpu_threads)
    log = print if main_proc else (lambda *a, **k: None)
    t_start = time.time()
    if args.toy:
        if main_proc:
            _prepare_toy(args, log)
        accelerator.wait_for_everyone()
        if not main_proc:
            _prepare_toy(args, lambda *a, **k: None)
    if args.cache_latents and not args.latent_cache:
        from .cache import build_cache

        args.latent_cache = os.path.join(args.output_dir, "latent_cache")
        if main_proc:
            build_cache(args.pretrained_model_name_or_path, args.dataset_name, args.latent_cache,
                        split=args.dataset_split_name, resolution=args.resolution, flip_ratio=args.flip_ratio,
                        flip_seed=args.flip_seed, max_pairs=args.max_train_samples, seed=args.seed,
                        device=_dev(accelerator.device), variant=args.variant, log=log, hflip=not args.no_hflip,
                        random_crop=args.random_crop, vae_path=args.pretrained_vae_model_name_or_path)
        accelerator.wait_for_everyone()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)
    cfg: ak.AdaptiveDPOConfig = args.loss_config
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # -- models ---------------------------------------------------------------------------
    cuda = device.type == "cuda"
    if args.pretrained_model_name_or_path:
        scheduler = load_scheduler(args.pretrained_model_name_or_path, args.prediction_type)
    else:  # --unet_config without a model folder: SD's training scheduler
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", prediction_type=args.prediction_type or "epsilon",
                                  clip_sample=False)
    unet = (build_unet(args.unet_config, args.seed) if args.unet_config
            else load_unet(args.pretrained_model_name_or_path, args.variant))
    set_attention(unet, args.attention, log)
    reference_unet = None
    if args.full_finetune:
        # fp32 master weights (autocast runs them in --mixed_precision); the reference is a frozen copy
        import copy

        unet.to(device)
        reference_unet = copy.deepcopy(unet).to(dtype=weight_dtype).requires_grad_(False).eval()
        unet.requires_grad_(True)
        named = list(unet.named_parameters())
    else:
        unet.to(device, dtype=weight_dtype)
        named = add_lora(unet, args.rank, args.lora_alpha,
                         [t.strip() for t in args.lora_target_modules.split(",")], args.lora_init)
    lora_names, lora_params = [n for n, _ in named], [p for _, p in named]
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
        if reference_unet is not None:
            reference_unet.to(memory_format=torch.channels_last)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    # -- data -----------------------------------------------------------------------------
    vae = text_encoder = None
    flip_record = None
    if args.synthetic_pairs:
        tokens, width, pooled = text_shape(args.unet_config)
        ss = unet.config.sample_size
        dataset = SyntheticPairDataset(args.synthetic_pairs, (unet.config.in_channels, ss, ss), (tokens, width),
                                       pooled, resolution=ss * 8, seed=args.seed)
        args.resolution = ss * 8
        collate, meta = collate_cached, dataset.meta
        flip_record = None
        data_stats = {k: meta[k] for k in ("num_rows", "num_ties", "num_corrupt", "num_pairs")}
    elif args.latent_cache:
        if args.flip_ratio and not args.toy:
            log("note: --flip_ratio is applied when the cache is built; the cache's flips are used")
        dataset = CachedPairDataset(args.latent_cache)
        collate = collate_cached
        meta = dataset.meta
        check_cache_fits(args, meta, dataset, unet, log)
        args.resolution = meta.get("resolution", args.resolution)  # what the latents were made at
        flip_record = {k: meta[k] for k in ("flip_ratio", "flip_seed", "flipped_pairs", "flipped_rows")}
        data_stats = {k: meta[k] for k in ("num_rows", "num_ties", "num_corrupt", "num_pairs")}
    else:
        if not args.dataset_name:
            raise UserError("give --dataset_name or --latent_cache")
        pairs = PickAPicPairs(args.dataset_name, args.dataset_split_name, args.flip_ratio, args.flip_seed,
                              args.max_train_samples)
        vae = load_vae(args.pretrained_model_name_or_path, args.variant,
                       args.pretrained_vae_model_name_or_path).to(device, dtype=weight_dtype)
        text_encoder = load_text_encoders(args.pretrained_model_name_or_path, args.variant).to(device, weight_dtype)
        dataset = ImagePairDataset(pairs, text_encoder, args.resolution, hflip=not args.no_hflip,
                                   random_crop=args.random_crop, seed=args.seed)
        collate = collate_images
        flip_record = pairs.flip_record()
        data_stats = {"num_rows": pairs.num_rows, "num_ties": pairs.num_ties, "num_corrupt": None,
                      "num_pairs": len(pairs)}
    if main_proc and flip_record is not None:
        with open(os.path.join(args.output_dir, "flipped_pairs.json"), "w") as f:
            json.dump(flip_record, f)
    sampler = PairBatchSampler(len(dataset), args.train_batch_size, args.seed, rank=accelerator.process_index,
                               world=accelerator.num_processes)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=args.dataloader_num_workers)
    batches_per_epoch = sampler.num_batches()
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps * args.gradient_accumulation_steps / batches_per_epoch) + 1

    # -- optimisation -------------------------------------------------------------------
    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    fused = cuda if args.fused_adamw is None else args.fused_adamw
    adamw = torch.optim.AdamW
    if args.use_8bit_adam:  # compat.check made sure bitsandbytes is installed
        import bitsandbytes as bnb

        adamw, fused = bnb.optim.AdamW8bit, False
    optimizer = adamw(lora_params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                      weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, **({"fused": True} if fused else {}))
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    if cuda if args.compile is None else args.compile:
        compile_unet(unet, mode=args.compile_mode)
        if reference_unet is not None:
            compile_unet(reference_unet, mode=args.compile_mode)
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        # FSDP shards parameters into DTensors: the in-place EMA swaps, the LoRA/EMA checkpoint files and
        # the final LoRA export would need gathered (full_tensor) copies on every rank. Not implemented.
        raise UserError("FSDP is not supported yet (see docs/trainer.md, 'At scale'); use DDP or "
                         "DeepSpeed ZeRO-2 (docs/accelerate/deepspeed_zero2.yaml): both keep whole parameters "
                         "on every GPU, which the EMA swaps and the LoRA export rely on")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # no dataloader goes through prepare(): DeepSpeed needs the micro-batch size stated
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    base_unet = accelerator.unwrap_model(unet, keep_torch_compile=True)

    def save_hook(models, weights, output_dir):
        if main_proc:
            m = accelerator.unwrap_model(models[0])
            if args.full_finetune:
                save_file({k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()},
                          os.path.join(output_dir, "unet.safetensors"))
            else:
                save_file(lora_state_dict(m), os.path.join(output_dir, "lora.safetensors"))
                save_lora_diffusers(m, output_dir)  # the checkpoint loads into a pipeline as it is
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            m = accelerator.unwrap_model(models.pop())
            if args.full_finetune:
                m.load_state_dict(load_file(os.path.join(input_dir, "unet.safetensors")))
            else:
                load_lora_state_dict(m, load_file(os.path.join(input_dir, "lora.safetensors")))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    annotators = None
    if cfg.adaptive and args.ema_decays:
        if args.batched_annotators and not args.full_finetune:
            annotators = MixedBatchAnnotators(base_unet, lora_params, lora_names, args.ema_decays)
        else:
            if args.batched_annotators:
                log("note: --batched_annotators needs LoRA adapters; a full fine-tune swaps EMA weights in place")
            annotators = EMAAnnotators(lora_params, lora_names, args.ema_decays)
    models = StepModels(unet, base_unet, reference_unet, annotators)
    rank, world = accelerator.process_index, accelerator.num_processes
    # noise/timesteps: one stream for the global batch on every process (step_inputs takes this rank's
    # rows); VAE latent samples (image path): a stream per process, since each encodes its own images
    gen = torch.Generator(device=device).manual_seed(args.seed * 7919)
    vae_gen = torch.Generator(device=device).manual_seed(args.seed * 7919 + 104729 * (rank + 1))
    buf = torch.zeros(len(FIELDS), dtype=torch.float64, device=device)
    global_step, epoch, batch_in_epoch = 0, 0, 0
    num_corrupt_seen, skipped_total = 0, 0
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    pairs_path = os.path.join(args.output_dir, "pairs.jsonl")

    # -- resume ---------------------------------------------------------------------------
    if main_proc:
        for name in os.listdir(args.output_dir):
            if name.startswith(".tmp-checkpoint-"):  # left by a save that crashed: never complete
                shutil.rmtree(os.path.join(args.output_dir, name), ignore_errors=True)
    resume = ckpt.resolve(args.output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint and resume is None:
        log(f"no checkpoint in {args.output_dir}; starting fresh")
    if resume:
        state = ckpt.read_state(resume)
        accelerator.load_state(resume)
        if annotators is not None:
            annotators.load(load_file(os.path.join(resume, "ema.safetensors"), device=_dev(device)), state["ema"])
        rng = load_file(os.path.join(resume, f"trainer_rng_{accelerator.process_index}.safetensors"))
        gen.set_state(rng["noise_generator"])
        if "vae_generator" in rng:
            vae_gen.set_state(rng["vae_generator"])
        buf.copy_(rng["metrics"])
        global_step, epoch, batch_in_epoch = state["global_step"], state["epoch"], state["batch_in_epoch"]
        num_corrupt_seen = state.get("num_corrupt_seen", 0)
        skipped_total = state.get("skipped_steps_total", 0)
        resumed_steps_since_log = state.get("steps_since_log", 0)
        log(f"resumed from {resume} at step {global_step} (epoch {epoch}, batch {batch_in_epoch})")
        for path in (metrics_path, pairs_path):
            if main_proc and os.path.isfile(path):
                with open(path) as f:
                    keep = [ln for ln in f if json.loads(ln)["step"] <= global_step]
                with open(path, "w") as f:
                    f.writelines(keep)
    elif main_proc:
        for path in (metrics_path, pairs_path):
            if os.path.exists(path):
                os.remove(path)
    use_tb = _trackers(args, accelerator, log)
    with open(os.path.join(args.output_dir, "train_config.json"), "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items() if k != "loss_config"},
                   "beta": cfg.beta, "beta_convention": beta_note(args),
                   "loss_config": dataclasses.asdict(cfg), "data": data_stats,
                   "lora_parameters": sum(p.numel() for p in lora_params)}, f, indent=1, default=str)
    log(f"adpo-train: {len(dataset)} pairs, {batches_per_epoch} batches/epoch of {args.train_batch_size} pairs, "
        f"{args.max_train_steps} steps, {'Adaptive-DPO' if cfg.adaptive else 'Diffusion-DPO'} "
        f"beta={cfg.beta:g} ({beta_note(args)}), {len(args.ema_decays)} EMA annotator(s), "
        + ("full fine-tune" if args.full_finetune else f"LoRA r={args.rank}")
        + f" ({sum(p.numel() for p in lora_params):,} params), {scheduler.config.prediction_type}, device {device}"
        + (f" x {world} processes" if world > 1 else ""))

    def flush_pairs() -> None:
        if main_proc and pair_rows:
            with open(pairs_path, "a") as f:
                for r in torch.cat(pair_rows).tolist():
                    f.write(json.dumps({"step": int(r[0]), "pair": int(r[1]), "logit": r[2], "metric": r[3],
                                        "weight": r[4], "flipped": bool(r[5])}) + "\n")
        pair_rows.clear()

    def write_checkpoint(step: int, position: tuple[int, int]) -> str:
        flush_pairs()
        tmp = os.path.join(args.output_dir, f".tmp-checkpoint-{step}")
        state = {"global_step": step, "epoch": position[0], "batch_in_epoch": position[1],
                 "num_corrupt_seen": num_corrupt_seen, "steps_since_log": steps_since_log,
                 "skipped_steps_total": skipped_total,
                 "world_size": accelerator.num_processes,
                 "ema": annotators.state_meta() if annotators is not None else None}

        def write(path):
            accelerator.save_state(path, safe_serialization=True)
            if annotators is not None and main_proc:  # identical on every rank (whole parameters everywhere)
                save_file(annotators.state_tensors(), os.path.join(path, "ema.safetensors"))
            save_file({"noise_generator": gen.get_state(), "vae_generator": vae_gen.get_state(), "metrics": buf.cpu()},
                      os.path.join(path, f"trainer_rng_{accelerator.process_index}.safetensors"))
            return state

        accelerator.wait_for_everyone()
        if accelerator.num_processes == 1:
            return ckpt.save_atomic(args.output_dir, step, write, args.checkpoints_total_limit)
        # several processes: every rank writes its files into the main process's temporary folder
        if main_proc:
            ckpt.begin(args.output_dir, step)
        accelerator.wait_for_everyone()
        write(tmp)
        accelerator.wait_for_everyone()
        path = ckpt.finish(args.output_dir, step, state, args.checkpoints_total_limit) if main_proc else tmp
        accelerator.wait_for_everyone()
        return path

    validator = None
    if args.run_validation and main_proc:
        from .validation import Validator

        validator = Validator(args, base_unet, device, weight_dtype, lambda: accelerator.trackers)

    def interrupted(signum: int) -> Interrupted:
        path = ckpt.list_checkpoints(args.output_dir)
        path = path[-1][1] if path and path[-1][0] == global_step else None
        if path is None and global_step > 0:
            path = write_checkpoint(global_step, (epoch, batch_in_epoch))
        if progress is not None:
            progress.close()
        accelerator.end_training()
        hint = ("Resume with the same command plus --resume_from_checkpoint latest." if path else
                "Nothing to resume: run again with --overwrite_output_dir.")
        return Interrupted(signum, global_step, path, hint)

    # -- the loop -------------------------------------------------------------------------
    progress = None
    if main_proc and not args.quiet:
        from tqdm.auto import tqdm

        progress = tqdm(total=args.max_train_steps, initial=global_step, desc="adpo-train", dynamic_ncols=True)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    pair_rows: list[torch.Tensor] = []
    t_log, steps_since_log = time.time(), (resumed_steps_since_log if resume else 0)
    unet.train()
    stop.arm()
    done = global_step >= args.max_train_steps
    while not done and epoch < num_epochs:
        sampler.set_epoch(epoch, batch_in_epoch)
        for batch in loader:
            batch_in_epoch += 1
            num_corrupt_seen += batch["num_corrupt"]
            if batch["num_pairs"] == 0:
                continue
            with accelerator.accumulate(unet):
                x = step_inputs(batch, scheduler, gen, device, weight_dtype, rank=rank, world=world,
                                encoders=text_encoder, vae=vae, vae_gen=vae_gen, channels_last=args.channels_last,
                                vae_chunk=args.vae_encode_batch_size)
                ready = global_step >= args.ema_warmup_steps
                out = models.loss(x, cfg, ready, args.loss_backend)
                accelerator.backward(out.loss)
                nonfinite |= out.nonfinite
                grad_norm = None
                if accelerator.sync_gradients:
                    if args.max_grad_norm and args.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(lora_params, args.max_grad_norm)
                    if world > 1:  # the all-reduced gradients decide, identically on every rank
                        norm = grad_norm if grad_norm is not None else torch.linalg.vector_norm(torch.stack(
                            [torch.linalg.vector_norm(p.grad) for p in lora_params if p.grad is not None]))
                        nonfinite |= ~torch.isfinite(norm)
                    skip.optimizer_step(optimizer, nonfinite)
                    buf[F["skipped_steps"]] += nonfinite.double()
                    if grad_norm is not None:  # a skipped step's norm is not a measurement
                        grad_norm = torch.where(nonfinite, torch.zeros_like(grad_norm), grad_norm)
                else:
                    optimizer.step()  # accelerate makes this a no-op while accumulating
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                with torch.no_grad():
                    w = out.weights
                    fl = batch["flipped"].to(device)
                    row = torch.stack([out.loss.detach().double(), out.implicit_acc.double(), w.mean().double(),
                                       out.metric.mean().double(), out.logits.mean().double(),
                                       out.model_mse.mean().double(), out.ref_mse.mean().double(),
                                       (grad_norm.double() if isinstance(grad_norm, torch.Tensor)
                                        else torch.zeros((), dtype=torch.float64, device=device)),
                                       out.nonfinite.double(), torch.ones((), dtype=torch.float64, device=device),
                                       torch.zeros((), dtype=torch.float64, device=device),
                                       (w * fl).sum().double(), fl.sum().double(),
                                       (w * ~fl).sum().double(), (~fl).sum().double()])
                    # a non-finite micro-batch adds only to its counters (the averages stay finite)
                    buf += torch.where(out.nonfinite & ~_COUNTERS.to(device), 0.0, row)
                    if args.dump_pairs:
                        pair_rows.append(torch.stack([torch.full_like(out.logits, global_step + 1),
                                                      batch["index"].to(device, out.logits.dtype), out.logits,
                                                      out.metric, w, fl.to(out.logits.dtype)], 1))

            if not accelerator.sync_gradients:
                continue
            if annotators is not None:
                skip.ema_step(annotators, nonfinite)
            nonfinite.zero_()
            global_step += 1
            steps_since_log += 1
            synced, agreed_signal = False, None
            if progress is not None:
                progress.update(1)
            if global_step % args.logging_steps == 0 or global_step >= args.max_train_steps:
                # the one host sync per logging interval; with several processes, sums over all of them
                vals = (accelerator.reduce(buf.clone(), "sum") if world > 1 else buf).tolist()
                synced = True
                buf.zero_()
                skipped = round(vals[F["skipped_steps"]] / world)  # the same on every rank
                skip.rewind(skipped, lr_scheduler, annotators, accelerator.num_processes)
                skipped_total += skipped
                steps_since_log -= skipped
                global_step -= skipped
                if progress is not None and skipped:
                    progress.update(-skipped)
                n = max(vals[F["micro_batches"]] - vals[F["nonfinite"]], 1.0)
                elapsed = time.time() - t_log
                rec = {"step": global_step, "epoch": epoch, "loss": vals[F["loss"]] / n,
                       "implicit_acc": vals[F["implicit_acc"]] / n, "weight_mean": vals[F["weight_mean"]] / n,
                       "metric_mean": vals[F["metric_mean"]] / n, "logit_mean": vals[F["logit_mean"]] / n,
                       "model_mse": vals[F["model_mse"]] / n, "ref_mse": vals[F["ref_mse"]] / n,
                       "grad_norm": vals[F["grad_norm"]] / max(steps_since_log, 1) / world,  # real steps
                       "nonfinite_micro_batches": int(vals[F["nonfinite"]]), "skipped_steps": skipped,
                       "skipped_steps_total": skipped_total, "lr": lr_scheduler.get_last_lr()[0],
                       "annotators_ready": ready, "corrupt_pairs_seen": num_corrupt_seen,
                       "steps_per_s": steps_since_log / max(elapsed, 1e-9)}
                if vals[F["flipped_count"]] > 0:
                    rec["weight_mean_flipped"] = vals[F["flipped_weight_sum"]] / vals[F["flipped_count"]]
                    rec["weight_mean_clean"] = vals[F["clean_weight_sum"]] / max(vals[F["clean_count"]], 1.0)
                t_log, steps_since_log = time.time(), 0
                flush_pairs()
                if main_proc:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if use_tb:
                        accelerator.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=global_step)
                    if progress is not None:
                        progress.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['implicit_acc']:.3f}",
                                             w=f"{rec['weight_mean']:.3f}")
                if world > 1:  # a signal may reach one rank only (or arrive mid-sync): agree on a snapshot
                    local = stop.signum
                    sig = accelerator.reduce(torch.tensor([float(local or 0)], device=device), "sum")
                    agreed_signal = (local or 15) if sig.item() > 0 else None  # 15: SIGTERM
            if validator is not None and global_step % args.validation_steps == 0:
                log(f"\nvalidation images: {validator.run(global_step)}")
            stop_signal = stop.signum if world == 1 else (agreed_signal if synced else None)
            stop_early = args.stop_after_steps is not None and global_step >= args.stop_after_steps
            if global_step % args.checkpointing_steps == 0 or stop_early or global_step >= args.max_train_steps:
                path = write_checkpoint(global_step, (epoch, batch_in_epoch))
                log(f"\ncheckpoint: {path}" if progress is not None else f"checkpoint: {path}")
            if stop_signal:
                raise interrupted(stop_signal)
            if stop_early:
                if progress is not None:
                    progress.close()
                log(f"stopped after {global_step} steps (--stop_after_steps); resume with "
                    f"--resume_from_checkpoint latest")
                accelerator.end_training()
                return {"global_step": global_step, "stopped": True, "output_dir": args.output_dir}
            if global_step >= args.max_train_steps:
                done = True
                break
        if not done:
            epoch, batch_in_epoch = epoch + 1, 0
    if progress is not None:
        progress.close()

    # -- outputs --------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    result = {"global_step": global_step, "output_dir": args.output_dir, "stopped": False,
              "metrics": metrics_path,
              "lora": None if args.full_finetune else os.path.join(args.output_dir, LORA_WEIGHT_NAME)}
    if main_proc:
        if args.full_finetune:
            accelerator.unwrap_model(unet).save_pretrained(os.path.join(args.output_dir, "unet"),
                                                           safe_serialization=True)
            result["unet"] = os.path.join(args.output_dir, "unet")
        else:
            save_lora_diffusers(base_unet, args.output_dir)
        if annotators is not None:
            save_file(annotators.state_tensors(), os.path.join(args.output_dir, "ema_annotators.safetensors"),
                      metadata={"decays": json.dumps(annotators.decays)})
        plot = None
        if not args.no_plot:
            from .plot import plot_metrics

            plot = plot_metrics(metrics_path, os.path.join(args.output_dir, "training_curves.png"))
        result["plot"] = plot
        log(f"\ndone: {global_step} steps in {time.time() - t_start:.0f}s")
        if args.full_finetune:
            log(f"  UNet (diffusers format): {result['unet']}")
        else:
            log(f"  LoRA (diffusers format): {result['lora']}")
        log(f"  metrics:                 {metrics_path}")
        if plot:
            log(f"  plot:                    {plot}")
        if flip_record and flip_record.get("flipped_pairs"):
            log(f"  flipped pairs:           {os.path.join(args.output_dir, 'flipped_pairs.json')}")
        if args.dump_pairs:
            log(f"  per-pair dump:           {pairs_path}")
        if validator is not None:
            log(f"  validation images:       {validator.run(global_step, final=True)}")
    accelerator.end_training()
    if global_step < args.max_train_steps:
        raise RunCutShort(f"the run ended at step {global_step} of --max_train_steps {args.max_train_steps}: the "
                          f"data ran out ({num_corrupt_seen} corrupt pairs dropped, {skipped_total} non-finite "
                          f"steps skipped); outputs are written. Use more data or fewer steps.")
    return result
