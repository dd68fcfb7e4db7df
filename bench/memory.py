"""Memory per GPU of the trainer's long-lived tensors, DDP vs FSDP, before activations.

For each UNet (``--models``, the trainer's built-in ``--unet_config`` names) the parameter
counts are real: the UNet is instantiated on the ``meta`` device (no memory, no download)
and, for LoRA, given the adapter the trainer adds (:func:`adpo_train.models.add_lora`,
targets ``to_q,to_k,to_v,to_out.0``).  With ``N`` parameters in the UNet, ``T`` trained
parameters (LoRA: the adapter; full fine-tune: ``N``), ``K`` EMA annotators, ``w`` bytes
per weight of the ``--mixed_precision`` dtype and ``s`` = 1 (DDP: every GPU holds
everything) or ``P`` (FSDP: every tensor sharded over the P GPUs), the bytes per GPU are

    trainable  (4 + 4 + 8) T / s    fp32 master weights + fp32 gradients + AdamW's two moments
    frozen     w N / s              full fine-tune: the frozen reference UNet (a copy);
                                    LoRA: the base UNet, shared by policy and reference
    ema        4 (K + 1) T / s      K fp32 EMA copies + the swap backup of the live weights
                                    (:class:`adpo_train.annotators.EMAAnnotators`)

(LoRA: the base UNet is cast to ``w``; its LoRA weights are the T in fp32.)  Not counted:
activations, DDP's gradient buckets (another 4T per GPU unless ``gradient_as_bucket_view``),
AdamW's per-tensor step counters, the VAE/text encoders (cached latents need neither),
allocator slack.

``source=measured`` FSDP rows (``--measure``, the tiny configs, fp32, P = 2): the trainer itself
under ``torchrun --nproc_per_node 2 ... --distributed fsdp`` for one step; each rank counts the
bytes of its shards (``memory_per_rank.json``, :func:`adpo_train.fsdp.rank_memory`): trained
parameters, AdamW's moments, the frozen weights, the EMA copies and the swap backup.  Gradients
are freed after every step, so they are not there to count: they are taken as the trained
parameters' bytes (the same shards, the same dtype).  They must equal the computed rows.

``source=measured`` rows (``--measure``, the tiny configs, fp32): the trainer's own model
building (``adpo_train.trainer._build_models``), an AdamW step and the EMA annotators in
one process, counting the bytes of every distinct tensor storage in each group; under DDP
every rank holds exactly these (DDP replicates).  They must equal the computed tiny rows.
"""
from __future__ import annotations

import argparse

import torch

COLUMNS = ["bench", "name", "model", "mode", "rank", "strategy", "processes", "mixed_precision", "source",
           "unet_params", "trained_params", "trainable_gib", "frozen_gib", "ema_gib", "total_gib",
           "trainable_bytes", "frozen_bytes", "ema_bytes", "total_bytes"]
DTYPE_BYTES = {"no": 4, "fp16": 2, "bf16": 2}
GIB = 2 ** 30


def add_arguments(p: argparse.ArgumentParser) -> None:
    from adpo_train.config import TrainConfig

    p.add_argument("--models", type=lambda s: s.split(","), default=["sd15", "sdxl"],
                   help="comma-separated --unet_config names (default sd15,sdxl)")
    p.add_argument("--rank", type=int, default=TrainConfig().rank,
                   help=f"LoRA rank (default: the trainer's, {TrainConfig().rank})")
    p.add_argument("--processes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8],
                   help="GPU counts P (default 1,8); FSDP rows for every P > 1")
    p.add_argument("--mixed-precision", choices=sorted(DTYPE_BYTES), default="bf16",
                   help="dtype of the frozen weights (default bf16)")
    p.add_argument("--annotators", type=int, default=len(TrainConfig().ema_decays),
                   help="number of EMA annotators K (default: the trainer's, 2)")
    p.add_argument("--measure", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the tiny configs' tensors (default on)")


def count_params(spec: str, rank: int = 0) -> tuple[int, int]:
    """``(UNet parameters, LoRA parameters)`` of ``--unet_config spec``, counted on ``meta``
    (LoRA: after :func:`adpo_train.models.add_lora` with ``rank``; 0 when ``rank`` is 0)."""
    from adpo_train.models import add_lora, build_unet

    with torch.device("meta"):
        unet = build_unet(spec)
    n = sum(p.numel() for p in unet.parameters())
    lora = sum(p.numel() for _, p in add_lora(unet, rank)) if rank else 0
    return n, lora


def bytes_per_gpu(n: int, trained: int, full_finetune: bool, shards: int, weight_bytes: int,
                  annotators: int) -> dict[str, int]:
    """The formula of the module docstring; ``shards`` = 1 for DDP, P for FSDP (ceil per GPU)."""
    def per(x: int) -> int:
        return -(-x // shards)

    out = {"trainable_bytes": per(16 * trained),
           "frozen_bytes": per(weight_bytes * n),
           "ema_bytes": per(4 * (annotators + 1) * trained)}
    out["total_bytes"] = sum(out.values())
    return out


def _row(model, mode, rank, strategy, p, mp, source, n, trained, b) -> dict:
    gib = {k.replace("_bytes", "_gib"): round(v / GIB, 2) for k, v in b.items()}
    name = f"{model}/{mode}/{strategy}x{p}/{source}"
    return dict(bench="memory", name=name, model=model, mode=mode, rank=rank if mode == "lora" else "", strategy=strategy,
                processes=p, mixed_precision=mp, source=source, unet_params=n, trained_params=trained, **gib, **b)


def computed_rows(models, rank, processes, mp, annotators) -> list[dict]:
    rows = []
    for model in models:
        n, lora = count_params(model, rank)
        for mode, trained in (("lora", lora), ("full", n)):
            # DDP: the same on every GPU whatever P (one row, processes=1); FSDP with one shard is DDP
            for strategy, p in [("ddp", 1)] + [("fsdp", p) for p in processes if p > 1]:
                b = bytes_per_gpu(n, trained, mode == "full", p, DTYPE_BYTES[mp], annotators)
                rows.append(_row(model, mode, rank, strategy, p, mp, "computed", n, trained, b))
    return rows


def _storage_bytes(tensors, seen: set) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def measure(spec: str, full_finetune: bool, rank: int, annotators: int) -> dict[str, int]:
    """Bytes of the trainer's long-lived tensors for ``spec`` in one fp32 process (see docstring)."""
    from adpo_train.annotators import EMAAnnotators
    from adpo_train.config import TrainConfig
    from adpo_train.models import text_shape
    from adpo_train.trainer import _build_models

    cfg = TrainConfig(unet_config=spec, full_finetune=full_finetune, rank=rank,
                      ema_decays=tuple(0.5 for _ in range(annotators)))
    _, unet, reference, named = _build_models(cfg, torch.device("cpu"), torch.float32, lambda *a: None)
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=1e-4)
    tokens, width, _ = text_shape(spec)
    size = unet.config.sample_size
    out = unet(torch.randn(1, 4, size, size), torch.tensor([10]), torch.randn(1, tokens, width)).sample
    out.square().mean().backward()
    opt.step()
    ema = EMAAnnotators(params, [n for n, _ in named], cfg.ema_decays)
    ema.step()
    seen: set = set()
    trainable = _storage_bytes(params, seen) + _storage_bytes([p.grad for p in params], seen)
    trainable += _storage_bytes([s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")], seen)
    frozen_src = reference.parameters() if reference is not None else unet.parameters()
    frozen = _storage_bytes(list(frozen_src), seen)
    ema_b = _storage_bytes([t for e in ema.weights.emas for t in e.shadow_params] + ema._backup, seen)
    return {"trainable_bytes": trainable, "frozen_bytes": frozen, "ema_bytes": ema_b,
            "total_bytes": trainable + frozen + ema_b}


def measure_sharded(spec: str, full_finetune: bool, rank: int, annotators: int, processes: int = 2) -> dict:
    """Bytes on rank 0 of the trainer under ``--distributed fsdp`` with ``processes`` CPU processes (gloo),
    after one step of ``spec`` in fp32 (see the module docstring)."""
    import json
    import os
    import tempfile

    from .launch import torchrun

    with tempfile.TemporaryDirectory(prefix="adpo-bench-memory-") as tmp:
        out = os.path.join(tmp, "run")
        argv = ["-m", "adpo_train", "--unet_config", spec, "--synthetic_pairs", str(2 * processes),
                "--train_batch_size", "1", "--max_train_steps", "1", "--distributed", "fsdp", "--rank", str(rank),
                "--ema_decays", *["0.5"] * annotators, "--ema_warmup_steps", "0", "--output_dir", out,
                "--quiet", "--no_plot", "--report_to", "jsonl", "--checkpointing_steps",
                "100"] + (["--full_finetune"] if full_finetune else [])
        torchrun(argv, os.path.join(tmp, "logs"), nproc=processes)  # raises with each rank's first error
        with open(os.path.join(out, "memory_per_rank.json")) as f:
            m = json.load(f)["ranks"][0]
    trainable = 2 * m["trained_param_bytes"] + m["optimizer_state_bytes"]  # + gradients (see docstring)
    out = {"trainable_bytes": trainable, "frozen_bytes": m["frozen_param_bytes"], "ema_bytes": m["ema_bytes"]}
    out["total_bytes"] = sum(out.values())
    return out


def markdown(rows: list[dict], unit: str = "GiB") -> str:
    """The table of docs/trainer.md: ``unit`` (GiB or bytes) per GPU, one line per (model, mode, strategy, P)."""
    head = (f"| UNet | training | strategy | GPUs | params + grads + AdamW | frozen | EMA annotators | total "
            f"| source |\n|---|---|---|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for r in rows:
        gpus = "any" if r["strategy"] == "ddp" else r["processes"]
        cells = [f"{r[k + '_gib']:.2f}" if unit == "GiB" else f"{r[k + '_bytes']:,}"
                 for k in ("trainable", "frozen", "ema", "total")]
        mode = f"LoRA r{r['rank']} ({r['trained_params']:,} params)" if r["mode"] == "lora" else \
            f"full ({r['trained_params']:,} params)"
        lines.append(f"| {r['model']} | {mode} | {r['strategy'].upper()} | {gpus} | {cells[0]} | {cells[1]} | "
                     f"{cells[2]} | **{cells[3]}** | {r['source']} |")
    return "\n".join(lines)


def run(args, env, log) -> list[dict]:
    rows = computed_rows(args.models, args.rank, args.processes, args.mixed_precision, args.annotators)
    log(f"GiB per GPU, --mixed_precision {args.mixed_precision}, {args.annotators} EMA annotators, before "
        f"activations\n" + markdown(rows))
    if args.measure:
        tiny = []
        for spec in ("tiny",):
            n, lora = count_params(spec, args.rank)
            for mode, trained in (("lora", lora), ("full", n)):
                b = measure(spec, mode == "full", args.rank, args.annotators)
                calc = bytes_per_gpu(n, trained, mode == "full", 1, 4, args.annotators)
                tiny.append(_row(spec, mode, args.rank, "ddp", 1, "no", "computed", n, trained, calc))
                tiny.append(_row(spec, mode, args.rank, "ddp", 1, "no", "measured", n, trained, b))
                b = measure_sharded(spec, mode == "full", args.rank, args.annotators, 2)
                calc = bytes_per_gpu(n, trained, mode == "full", 2, 4, args.annotators)
                tiny.append(_row(spec, mode, args.rank, "fsdp", 2, "no", "computed", n, trained, calc))
                tiny.append(_row(spec, mode, args.rank, "fsdp", 2, "no", "measured", n, trained, b))
        log("\nbytes per GPU, the tiny config in fp32: the formula vs the tensors the trainer builds\n"
            + markdown(tiny, unit="bytes"))
        rows += tiny
    return rows
