"""``python -m bench experiment``: DPO against Adaptive-DPO on the built-in toy at several label-flip
rates, each run scored by ``adpo-train evaluate`` against the toy base model.

The paper's headline table in miniature.  For every flip rate ``r`` (``--flip-rates``, default
0 / 0.2 / 0.4) and training seed, one latent cache of the toy preference set with a fraction ``r``
of labels flipped (the same flips for both methods) trains two LoRA runs with the toy's settings
(``adpo-train`` with no model: :data:`adpo_train.config.TOY`):

* ``dpo``: ``--preset dpo`` (plain Diffusion-DPO, the toy's beta);
* ``adaptive``: the toy's Adaptive-DPO loss (:data:`adpo_train.config.TOY_LOSS`, two EMA annotators).

Each run is evaluated on the toy's 18 distinct captions (``--prompts`` = the toy parquet) with the
toy reward (:func:`adpo_train.rewards.toy_reward`: the caption's colour present, the other palette
colours absent), K images per prompt, paired seeds, with the sampler settings of ``make demo``
(K = 8, 10 steps, guidance 3).  One row per (method, flip rate, seed): base and tuned mean reward
with their bootstrap CIs over prompts, and the paired win rate with its CI.  The Adaptive-DPO run at
flip 0.2, seed 0 is the demo's own run; ``--methods adaptive --flip-rates 0.2 --min-win-ci-lo 0.5``
is the demo's check (exit 1 unless its win-rate CI lies above 0.5; a few minutes on 2 CPU cores).

Runs, caches and evaluations live under ``--workdir`` (default ``outputs/experiment``); a rerun
reuses finished training runs (their LoRA file) and evaluation images, so after a change to the toy
(adpo_train/toy.py's recipe) use a fresh ``--workdir``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

COLUMNS = ["bench", "method", "flip_rate", "seed", "train_steps", "num_prompts", "num_images_per_prompt",
           "eval_steps", "guidance_scale", "reward", "base_mean", "base_ci_lo", "base_ci_hi", "tuned_mean",
           "tuned_ci_lo", "tuned_ci_hi", "win_rate", "win_ci_lo", "win_ci_hi", "train_s", "eval_s"]
METHODS = {"dpo": ["--preset", "dpo"], "adaptive": []}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--flip-rates", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.2, 0.4])
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS), help="dpo,adaptive")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0],
                   help="training seeds (the flipped pairs are chosen by --flip_seed = the seed)")
    p.add_argument("--max-train-steps", type=int, help="default: the toy's (adpo_train.config.TOY)")
    # the evaluation settings of `make demo` (Makefile, TOY_EVAL)
    p.add_argument("--num-images-per-prompt", type=int, default=8)
    p.add_argument("--eval-steps", type=int, default=10, help="inference steps of the evaluation")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="guidance of the evaluation")
    p.add_argument("--min-win-ci-lo", type=float, help="exit 1 unless every run's win-rate 95%% CI lies "
                   "above this (0.5: the tuned model is better than the base; the demo's check)")
    p.add_argument("--workdir", default=os.path.join("outputs", "experiment"))


def _train(workdir: str, run_dir: str, method: str, flip: float, seed: int, steps, log) -> dict:
    """Train one toy run (reused when its LoRA exists); returns the trained config's paths."""
    from adpo_train.cli import build_parser, resolve
    from adpo_train.models import LORA_WEIGHT_NAME
    from adpo_train.trainer import _prepare_toy, train

    flags = ["--inject_label_noise", str(flip), "--flip_seed", str(seed), "--seed", str(seed), "--quiet",
             "--no_plot", "--output_dir", run_dir, *METHODS[method]]
    if steps:
        flags += ["--max_train_steps", str(steps)]
    config = resolve(build_parser().parse_args(flags))
    # one toy model, data set and per-flip-rate cache for every run (the trainer would build them under
    # each run's folder): both methods train on the same flipped pairs
    shared = _prepare_toy(config.replace(output_dir=workdir), lambda *a, **k: None)
    config = shared.replace(output_dir=run_dir, toy=False)
    if not os.path.isfile(os.path.join(run_dir, LORA_WEIGHT_NAME)):
        train(config)
    return {"model": config.pretrained_model_name_or_path, "data": config.dataset_name,
            "steps": config.max_train_steps}


def run(args, env, log) -> list[dict]:
    from adpo_train import evaluate

    for m in args.methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method {m!r} (known: {', '.join(METHODS)})")
    rows = []
    for seed in args.seeds:
        for flip in args.flip_rates:
            for method in args.methods:
                name = f"{method}-flip{flip:g}-seed{seed}"
                run_dir = os.path.join(args.workdir, "runs", name)
                t0 = time.perf_counter()
                paths = _train(args.workdir, run_dir, method, flip, seed, args.max_train_steps, log)
                t1 = time.perf_counter()
                out = os.path.join(args.workdir, "eval", name)
                res = evaluate.evaluate(evaluate.build_parser().parse_args([
                    "--pretrained_model_name_or_path", paths["model"], "--lora", run_dir, "--prompts", paths["data"],
                    "--reward", "toy", "--num_images_per_prompt", str(args.num_images_per_prompt),
                    "--num_inference_steps", str(args.eval_steps), "--guidance_scale", str(args.guidance_scale),
                    "--seed", "0", "--device", "cpu",
                    "--output_dir", out, "--quiet"]), log=lambda *a, **k: None)
                r = res["rewards"]["toy"]
                row = dict(bench="experiment", method=method, flip_rate=flip, seed=seed, train_steps=paths["steps"],
                           num_prompts=res["num_prompts"], num_images_per_prompt=res["num_images_per_prompt"],
                           eval_steps=args.eval_steps, guidance_scale=args.guidance_scale,
                           reward="toy", base_mean=r["base"]["mean"], base_ci_lo=r["base"]["ci95"][0],
                           base_ci_hi=r["base"]["ci95"][1], tuned_mean=r["tuned"]["mean"],
                           tuned_ci_lo=r["tuned"]["ci95"][0], tuned_ci_hi=r["tuned"]["ci95"][1],
                           win_rate=r["win_rate"], win_ci_lo=r["win_rate_ci95"][0], win_ci_hi=r["win_rate_ci95"][1],
                           train_s=round(t1 - t0, 1), eval_s=round(time.perf_counter() - t1, 1))
                rows.append(row)
                log(f"{name}: tuned {row['tuned_mean']:.4f} [{row['tuned_ci_lo']:.4f}, {row['tuned_ci_hi']:.4f}] "
                    f"vs base {row['base_mean']:.4f}; win rate {row['win_rate']:.3f} "
                    f"[{row['win_ci_lo']:.3f}, {row['win_ci_hi']:.3f}]")
    with open(os.path.join(args.workdir, "experiment.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def check(args, rows) -> str | None:
    """``--min-win-ci-lo X``: the runs whose win-rate 95% CI does not lie above X, or None."""
    if args.min_win_ci_lo is None:
        return None
    bad = [f"{r['method']} at flip {r['flip_rate']:g} (seed {r['seed']}): {r['win_rate']:.3f} "
           f"[{r['win_ci_lo']:.3f}, {r['win_ci_hi']:.3f}]" for r in rows if not r["win_ci_lo"] > args.min_win_ci_lo]
    if bad:
        return f"win-rate 95% CI not above {args.min_win_ci_lo:g}: " + "; ".join(bad)
    return None
