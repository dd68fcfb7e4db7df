"""The trainer benchmark: pairs/s, step time, MFU and peak memory of one training step.

Variants (same shapes, same random-init weights, in one run):

``baseline``          a faithful re-creation of the published Adaptive-DPO script's step (on
                      diffusers' ``train_diffusion_dpo.py``): eager, fp16 autocast on GPU with
                      fp16 UNet weights, fp32 LoRA and a GradScaler; the VAE encodes both images
                      and the text encoder runs in every step; two ``EMAModel`` over the *whole*
                      UNet, each evaluated with ``store`` / ``copy_to`` / ``restore`` (store copies
                      every parameter to the host) and stepped over every parameter; the loss in
                      plain torch (``backend="torch"``); ``.item()`` of loss and accuracy every step.
``dpo``               the step users run: ``adpo_train.state.train_step`` (what the trainer loop
                      calls) on cached latents and text, bf16 weights and accelerate's autocast on
                      GPU, SDPA, ``torch.compile`` on CUDA, fused AdamW on CUDA, gradient clipping,
                      the on-device skip of a non-finite step and metric buffer; no annotators.
``adaptive``          the same with two EMA annotators (LoRA-only EMA swapped in place).
``adaptive-batched``  the same with the reference and both annotators in one mixed-batch forward
                      (:class:`adpo_train.annotators.MixedBatchAnnotators`).
``adaptive-noskip``   ``adaptive`` without the skip machinery: a plain ``optimizer.step()`` and EMA update in
                      place of :func:`adpo_train.skip.optimizer_step` / ``ema_step`` (what the skip of a
                      non-finite step costs a finite one: ``adaptive`` minus this; CPU default only).
``adaptive-k0``       Adaptive-DPO without annotators (``m = 1 - sigmoid(rho z)``, spec section 4): the
                      paper's loss options, no EMA (docs/method-study.md, "Are the annotators worth it").

Suites: ``gpu`` (SD1.5-architecture UNet, 64x64 latents, 77x768 text, LoRA r8, 8 pairs/step,
bf16) and ``cpu`` (the toy's tiny UNet at 16x16 latents, 16x32 text, LoRA r4, 8 pairs, fp32).

Method: per variant, the models are built from fixed seeds; one step is run eagerly under
``torch.utils.flop_counter.FlopCounterMode`` (``flops_per_step``: every matmul/conv FLOP the
step executes, backward included); then ``warmup`` steps (the first, timed alone as
``first_step_s``, includes compilation), then ``steps`` steps each timed with a device sync
at its end (``step_ms`` median, ``p10_ms``, ``p90_ms``); ``pairs_per_s`` = pairs / median
step; ``speedup_vs_baseline``, ``mem_vs_baseline``, ``time_vs_dpo``, ``flops_vs_dpo``: the
goals as ratios within the run; ``mfu`` = flops_per_step / median step / the
device's dense bf16/fp16 peak (GPU only; blank on CPU, whose peak is not defined here); ``peak_mem_gb``: on GPU the allocator's peak
over the timed steps (weights, optimiser, EMA, activations: everything), on CPU (one torch
thread unless ``--threads``: the tiny model on a shared 2-core machine) the bytes of
every long-lived tensor (parameters, optimiser state, EMA copies) plus the peak of live
allocations during one step under the profiler.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from . import harness

COLUMNS = ["bench", "suite", "variant", "status", "reason", "unet", "pairs", "latent", "text", "rank", "dtype",
           "compiled", "annotators", "pairs_per_s", "step_ms", "p10_ms", "p90_ms", "steps", "first_step_s",
           "flops_per_step", "tflops", "mfu", "peak_mem_gb", "speedup_vs_baseline", "mem_vs_baseline",
           "time_vs_dpo", "flops_vs_dpo"]
VARIANTS = ("baseline", "dpo", "adaptive", "adaptive-batched", "adaptive-k0", "adaptive-noskip")
# On CUDA the compiled variants run in this order so that "dpo" reuses "adaptive"'s compiled graphs
GPU_ORDER = ("baseline", "adaptive", "dpo", "adaptive-batched", "adaptive-k0")
SUITES = {
    "gpu": dict(unet="sd15", pairs=8, rank=8, dtype="bf16", res=512, steps=20, warmup=3, quick_steps=8,
                quick_warmup=2),
    "cpu": dict(unet="tiny", pairs=8, rank=4, dtype="fp32", res=32, steps=10, warmup=2, quick_steps=4,
                quick_warmup=1),
}
# dense bf16/fp16 tensor-core peaks (FLOP/s) by device-name fragment; first match wins
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989.4e12), ("H200", 989.4e12), ("H800", 989.4e12),
              ("A100", 312e12), ("L40S", 362e12), ("A10G", 125e12), ("4090", 165e12)]
DTYPES = harness.DTYPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", choices=sorted(SUITES), help="default: gpu on CUDA, cpu otherwise")
    p.add_argument("--variants", type=lambda s: s.split(","), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--steps", type=int, help="timed steps per variant")
    p.add_argument("--warmup", type=int, help="untimed steps per variant (the first includes compilation)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the trainer's UNet (auto: on with CUDA, like the trainer)")
    p.add_argument("--time-budget", type=float, help="seconds; variants not started within it are written as "
                   "skipped (default: 150 with --quick on CUDA, none otherwise)")


def _peak_flops(env: dict, device: torch.device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for frag, flops in PEAK_FLOPS:
        if frag in name:
            return flops
    return None


# -- inputs ------------------------------------------------------------------------------------
def _scheduler():
    from adpo_train.models import sd_scheduler

    return sd_scheduler()


def _cached_batch(spec: dict, unet_cfg, device) -> dict:
    from adpo_train.data import SyntheticPairDataset, collate_cached
    from adpo_train.models import text_shape

    tokens, width, pooled = text_shape(spec["unet"])
    ss = unet_cfg.sample_size
    data = SyntheticPairDataset(spec["pairs"], (unet_cfg.in_channels, ss, ss), (tokens, width), pooled,
                                resolution=spec["res"], seed=0)
    return collate_cached([data[i] for i in range(spec["pairs"])])


def _encoders(spec: dict, device, dtype):
    """Random-init VAE and CLIP text encoder of the suite's architecture (SD1.5's or the toy's)."""
    torch.manual_seed(1)
    with torch.device(device):
        vae, te, tokens, vocab = _build_encoders(spec)
    for m in (vae, te):
        m.requires_grad_(False).eval().to(device, dtype=dtype)
    g = torch.Generator().manual_seed(2)
    pixels = torch.rand((spec["pairs"], 6, spec["res"], spec["res"]), generator=g) * 2 - 1  # the script's layout
    ids = torch.randint(0, vocab, (spec["pairs"], tokens), generator=g)
    return vae, te, pixels.to(device), ids.to(device)


def _build_encoders(spec: dict):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    if spec["unet"] == "sd15":
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, norm_num_groups=32, sample_size=512)
        te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                          num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77))
        tokens, vocab = 77, 49408
    else:
        vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=32, sample_size=spec["res"])
        te = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                          num_hidden_layers=2, max_position_embeddings=16))
        tokens, vocab = 16, 1000
    return vae, te, tokens, vocab


# -- (a) the published script's step --------------------------------------------------------------
class BaselineStep:
    def __init__(self, spec: dict, device):
        from diffusers.training_utils import EMAModel

        import adpo_kernels as ak
        from adpo_train.models import add_lora, build_unet

        cuda = device.type == "cuda"
        self.device, self.spec = device, spec
        self.dtype = torch.float16 if cuda else torch.float32  # --mixed_precision fp16 on GPU
        with torch.device(device):  # random init on the device: seconds, not minutes, at SD size
            self.unet = build_unet(spec["unet"]).to(device, dtype=self.dtype)
        torch.manual_seed(0)
        self.params = [p for _, p in add_lora(self.unet, spec["rank"])]  # fp32 LoRA (cast_training_params)
        self.unet.train()
        self.vae, self.te, self.pixels, self.ids = _encoders(spec, device, self.dtype)
        self.sched = _scheduler()
        self.opt = torch.optim.AdamW(self.params, lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.scaler = torch.amp.GradScaler("cuda") if cuda else None
        self.emas = [EMAModel(self.unet.parameters(), decay=d) for d in (0.9999, 0.5)]  # full-UNet copies
        self.cfg = ak.AdaptiveDPOConfig(sync_stats=False)  # the script's defaults
        self.ak = ak
        self.step_no = 0
        self.annotators = 2

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def __call__(self) -> float:
        unet, B = self.unet, self.spec["pairs"]
        feed = torch.cat(self.pixels.chunk(2, dim=1))
        with torch.no_grad():
            latents = self.vae.encode(feed.to(self.dtype)).latent_dist.sample() * self.vae.config.scaling_factor
            enc = self.te(self.ids)[0].repeat(2, 1, 1)
        noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
        t = torch.randint(0, 1000, (B,), device=self.device).long().repeat(2)
        noisy = self.sched.add_noise(latents, noise, t)
        with self._autocast():
            model_pred = unet(noisy, t, enc).sample
            with torch.no_grad():
                unet.disable_adapters()
                ref_pred = unet(noisy, t, enc).sample.detach()
                unet.enable_adapters()
                ann = []
                if self.step_no >= 2:  # ema_warmup_steps
                    for ema in self.emas:
                        ema.store(unet.parameters())
                        ema.copy_to(unet.parameters())
                        ann.append(unet(noisy, t, enc).sample.detach().float())
                        ema.restore(unet.parameters())
        out = self.ak.adaptive_dpo_loss(model_pred.float(), ref_pred.float(), noise.chunk(2)[0].float(),
                                        ann or None, config=self.cfg, annotators_ready=bool(ann), backend="torch")
        if self.scaler is not None:
            self.scaler.scale(out.loss).backward()
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        for ema in self.emas:
            ema.step(unet.parameters())
        self.step_no += 1
        loss = out.loss.item()  # logged every step
        out.implicit_acc.item()
        return loss

    def static_bytes(self) -> int:
        ts = list(self.unet.parameters()) + list(self.vae.parameters()) + list(self.te.parameters())
        ts += [s for e in self.emas for s in e.shadow_params]
        ts += [v for st in self.opt.state.values() for v in st.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in ts)


# -- (b), (c): this trainer's step ---------------------------------------------------------------
class TrainerStep:
    """``adpo_train.state.train_step`` on a ``TrainState`` set up as the trainer sets it up: accelerate's
    ``prepare`` (autocast under mixed precision), AdamW (fused on CUDA), clipping at 1.0, the skip of a
    non-finite step, the EMA updates and the device-side metric buffer; the annotators join after
    ``ema_warmup_steps`` = 2 optimisation steps, the trainer's default."""

    def __init__(self, spec: dict, device, variant: str, compile_: bool):
        from accelerate import Accelerator

        import adpo_kernels as ak
        from adpo_train.annotators import EMAAnnotators, MixedBatchAnnotators
        from adpo_train.models import add_lora, build_unet, set_attention
        from adpo_train.state import StepOptions, TrainState
        from adpo_train.step import StepModels

        cuda = device.type == "cuda"
        self.device, self.spec, self.variant = device, spec, variant
        self.dtype = DTYPES[spec["dtype"]] if cuda else torch.float32
        accelerator = Accelerator(cpu=not cuda, mixed_precision=spec["dtype"] if self.dtype != torch.float32 else "no")
        with torch.device(device):
            unet = build_unet(spec["unet"]).to(device, dtype=self.dtype)
        set_attention(unet, "sdpa")
        torch.manual_seed(0)
        named = add_lora(unet, spec["rank"])
        params = [p for _, p in named]
        if variant == "dpo":
            ann, cfg = None, ak.AdaptiveDPOConfig.dpo()
        elif variant == "adaptive-k0":
            ann, cfg = None, ak.AdaptiveDPOConfig.paper()
        else:
            cfg = ak.AdaptiveDPOConfig.paper()
            names = [n for n, _ in named]
            ann = (MixedBatchAnnotators(unet, params, names, [0.9999, 0.5]) if variant == "adaptive-batched"
                   else EMAAnnotators(params, names, [0.9999, 0.5]))
        self.annotators = 0 if ann is None else 2
        self.opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8,
                                     **({"fused": True} if cuda else {}))
        sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda _: 1.0)
        wrapped, opt, sched = accelerator.prepare(unet, self.opt, sched)
        self.unet, self.ann, self.compile = unet, ann, compile_
        self.state = TrainState(accelerator=accelerator, models=StepModels(wrapped, unet, None, ann), optimizer=opt,
                                lr_scheduler=sched, params=params, noise_scheduler=_scheduler(), cfg=cfg,
                                gen=torch.Generator(device=device).manual_seed(0), weight_dtype=self.dtype,
                                options=StepOptions(ema_warmup_steps=2, max_grad_norm=1.0), annotators=ann)
        self.batch = _cached_batch(spec, unet.config, device)
        wrapped.train()

    @property
    def step_no(self) -> int:
        return self.state.global_step

    @step_no.setter
    def step_no(self, value: int) -> None:
        self.state.global_step = value

    def enable_compile(self) -> None:
        if self.compile:
            from adpo_train.step import compile_unet

            compile_unet(self.unet)

    def __call__(self):
        from adpo_train.state import train_step

        with self._without_skip() if self.variant == "adaptive-noskip" else contextlib.nullcontext():
            train_step(self.state, self.batch)
        return None

    @contextlib.contextmanager
    def _without_skip(self):
        """``train_step`` with the optimiser and EMA steps unconditional (the skip's cost, by difference)."""
        from adpo_train import skip

        saved = skip.optimizer_step, skip.ema_step
        skip.optimizer_step = lambda opt, nonfinite: opt.step()
        skip.ema_step = lambda annotators, nonfinite: annotators.step()
        try:
            yield
        finally:
            skip.optimizer_step, skip.ema_step = saved

    def static_bytes(self) -> int:
        ts = list(self.unet.parameters())
        if self.ann is not None:
            ts += [s for e in self.ann.emas for s in e.shadow_params if not any(s is p for p in ts)]
            ts += getattr(self.ann, "_backup", [])
        ts += [v for st in self.opt.state.values() for v in st.values() if torch.is_tensor(v)]
        seen, total = set(), 0
        for t in ts:
            key = (t.data_ptr(), t.numel())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total


def _count_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step()
    return int(fc.get_total_flops())


def _measure(step, device, warmup: int, steps: int):
    t0 = time.perf_counter()
    step()
    harness.sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        step()
    harness.sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        harness.sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return first, times, peak


class _Terminated(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated()


def _quantile(xs, q):
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _measure_variant(row: dict, variant: str, spec: dict, device, compile_: bool, warmup: int, steps: int,
                     peak_flops, log) -> None:
    """Build one variant's step, count its FLOPs, time it; fill ``row``."""
    import gc

    gc.collect()
    base_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    torch.manual_seed(0)
    if variant == "baseline":
        step = BaselineStep(spec, device)
        row.update(compiled=False, dtype="fp16" if device.type == "cuda" else "fp32")
    else:
        step = TrainerStep(spec, device, variant, compile_)
        row.update(compiled=compile_, dtype=spec["dtype"] if device.type == "cuda" else "fp32")
    step.step_no = 2  # count FLOPs with the annotators on, as in the timed steps
    flops = _count_flops(step)
    step.step_no = 0
    if variant != "baseline":
        step.enable_compile()
    first, times, peak = _measure(step, device, warmup, steps)
    if peak is not None:
        peak -= base_alloc  # what this variant holds at its peak, not what earlier variants left
    else:
        prof = harness.profile_call(step, device)
        peak = step.static_bytes() + (prof.peak_bytes or 0)
    med = statistics.median(times)
    lat = step.unet.config.sample_size
    row.update(status="ok", reason="", annotators=step.annotators, latent=f"4x{lat}x{lat}",
               text="77x768" if spec["unet"] == "sd15" else "16x32", pairs_per_s=spec["pairs"] / med * 1e3,
               step_ms=med, p10_ms=_quantile(times, 0.1), p90_ms=_quantile(times, 0.9), steps=len(times),
               first_step_s=first, flops_per_step=flops, tflops=flops / med / 1e9,
               mfu=(flops / (med / 1e3) / peak_flops) if peak_flops else None, peak_mem_gb=peak / 1e9)
    log(f"  {variant:17s} {row['pairs_per_s']:8.2f} pairs/s  {med:8.1f} ms/step  first {first:6.1f} s  "
        f"{flops / 1e12:7.3f} TFLOP/step  peak {peak / 1e9:.2f} GB"
        + (f"  MFU {row['mfu'] * 100:.1f}%" if row["mfu"] else ""))


def run(args: argparse.Namespace, env: dict, log=print) -> list[dict]:
    from adpo_train.trainer import quiet_libraries

    quiet_libraries()
    device = torch.device(args.device)
    if device.type == "cpu" and not args.threads:
        # the tiny model on a shared 2-core machine: one thread is both faster and steadier (as the toy trainer)
        torch.set_num_threads(1)
        env["threads"] = 1
    suite_name = args.suite or ("gpu" if device.type == "cuda" else "cpu")
    spec = SUITES[suite_name]
    quick = getattr(args, "quick", False)
    steps = args.steps or spec["quick_steps" if quick else "steps"]
    warmup = args.warmup or spec["quick_warmup" if quick else "warmup"]
    warmup = max(warmup, 3)  # the annotators start after 2 optimisation steps (ema_warmup_steps)
    compile_ = device.type == "cuda" if args.compile == "auto" else args.compile == "on"
    variants = args.variants or list(GPU_ORDER if device.type == "cuda" else VARIANTS)
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; expected some of {VARIANTS}")
    budget = args.time_budget if args.time_budget is not None else (150.0 if quick and device.type == "cuda" else None)
    peak_flops = _peak_flops(env, device)
    cfg_cols = dict(bench="train", suite=suite_name, unet=spec["unet"], pairs=spec["pairs"], rank=spec["rank"])
    log(f"train benchmark, suite {suite_name}: {variants} on {env['device']} ({env['threads']} threads, "
        f"load {env['loadavg']}), {warmup} warm-up + {steps} timed steps, compile={compile_}")
    rows, t_start = [], time.perf_counter()
    import signal

    # A caller's timeout (gpu_check.sh: `timeout --kill-after=10`) sends SIGTERM: finish the rows measured so
    # far and write the rest as skipped, so that the CSV is complete and nothing measured is lost.
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    terminated = False
    for variant in variants:
        row = dict(cfg_cols, variant=variant)
        if terminated:
            rows.append(dict(row, status="skipped", reason="terminated by SIGTERM (the caller's time limit)"))
            continue
        if budget is not None and time.perf_counter() - t_start > budget:
            rows.append(dict(row, status="skipped", reason=f"time budget of {budget:.0f} s spent"))
            log(f"  {variant}: skipped (time budget)")
            continue
        try:
            _measure_variant(row, variant, spec, device, compile_, warmup, steps, peak_flops, log)
        except _Terminated:
            terminated = True
            row.update(status="skipped", reason="terminated by SIGTERM (the caller's time limit) while running")
            log(f"  {variant}: terminated")
        except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the others' rows
            import traceback

            traceback.print_exc()
            row.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            log(f"  {variant}: error {row['reason']}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    signal.signal(signal.SIGTERM, old)
    _ratios(rows)
    return rows


def _ratios(rows: list[dict]) -> None:
    """The goals as columns: pairs/s and peak memory relative to the baseline, step time and
    FLOPs relative to plain DPO (goal: time_vs_dpo <= flops_vs_dpo)."""
    ok = {r["variant"]: r for r in rows if r.get("status") == "ok"}
    base, dpo = ok.get("baseline"), ok.get("dpo")
    for r in ok.values():
        if base is not None and r is not base:
            r["speedup_vs_baseline"] = r["pairs_per_s"] / base["pairs_per_s"]
            r["mem_vs_baseline"] = r["peak_mem_gb"] / base["peak_mem_gb"]
        if dpo is not None and r["variant"].startswith("adaptive"):
            r["time_vs_dpo"] = r["step_ms"] / dpo["step_ms"]
            r["flops_vs_dpo"] = r["flops_per_step"] / dpo["flops_per_step"]
