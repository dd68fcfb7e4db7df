"""diffusers' ``train_diffusion_dpo.py`` / ``train_diffusion_dpo_sdxl.py`` flags.

Every flag of both scripts is accepted by ``adpo-train`` with the script's meaning, or refused
with a one-line reason (:data:`REFUSED`).  Flags that exist under the same name in
:mod:`adpo_train.cli` are the same option; this module adds the ones that only make sense as
aliases or refusals, and checks values the scripts accept that this trainer cannot honour.

Beta (the one flag whose meaning depends on the model family): ``--beta_dpo`` is what the
matching script multiplies the logit by.  ``train_diffusion_dpo.py`` (SD1.5/2.x) computes
``-log sigmoid(beta_dpo * (ref_diff - model_diff))``: ``beta = beta_dpo``.
``train_diffusion_dpo_sdxl.py`` computes ``-log sigmoid(-0.5 * beta_dpo * (model_diff -
ref_diff))``: ``beta = beta_dpo / 2``.  Their defaults (2500 and 5000) are both ``beta = 2500``.
"""
from __future__ import annotations

import argparse
import importlib.util
from typing import Optional

from .errors import UserError

# flag -> why it is refused (the run stops before loading anything)
REFUSED = {
    "push_to_hub": "the trainer never touches the network; upload OUTPUT_DIR yourself "
                   "(e.g. `huggingface-cli upload REPO OUTPUT_DIR`)",
    "hub_token": "the trainer never touches the network (no --push_to_hub)",
    "hub_model_id": "the trainer never touches the network (no --push_to_hub)",
    "is_turbo": "SDXL-Turbo's 4-timestep schedule with zero terminal SNR is not implemented",
}
# flags accepted for compatibility that change nothing here, and why
ACCEPTED_NO_EFFECT = {
    "local_rank": "set by the launcher; accelerate reads LOCAL_RANK itself",
    "prior_generation_precision": "diffusers' DPO scripts parse it but never use it",
}


def add_flags(p: argparse.ArgumentParser) -> None:
    """The diffusers-only flags (refused ones included, so the refusal can name its reason)."""
    g = p.add_argument_group("diffusers' train_diffusion_dpo(_sdxl).py compatibility")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="same as --attention xformers")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' AdamW8bit (needs bitsandbytes)")
    g.add_argument("--local_rank", type=int, default=-1, help=ACCEPTED_NO_EFFECT["local_rank"])
    g.add_argument("--prior_generation_precision", choices=["no", "fp32", "fp16", "bf16"],
                   help=ACCEPTED_NO_EFFECT["prior_generation_precision"])
    g.add_argument("--push_to_hub", action="store_true", help="refused: " + REFUSED["push_to_hub"])
    g.add_argument("--hub_token", help="refused: " + REFUSED["hub_token"])
    g.add_argument("--hub_model_id", help="refused: " + REFUSED["hub_model_id"])
    g.add_argument("--is_turbo", action="store_true", help="refused: " + REFUSED["is_turbo"])


def check(args: argparse.Namespace) -> None:
    """Refuse what cannot be honoured, with the reason (aliases are mapped when the TrainConfig is built)."""
    for flag, why in REFUSED.items():
        if getattr(args, flag, None):
            raise UserError(f"--{flag} is not supported: {why}")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--use_8bit_adam needs bitsandbytes (`pip install bitsandbytes`); or drop the flag "
                        "for torch's AdamW")
    if args.loss_type == "cpo":
        raise UserError("--loss_type cpo: diffusers' script lists it but raises 'Unknown loss type'; choose "
                        "sigmoid, hinge, ipo, robust or conservative")
    for tracker in _trackers(args.report_to):
        if tracker in ("wandb", "comet_ml") and importlib.util.find_spec(tracker) is None:
            raise UserError(f"--report_to {args.report_to}: {tracker} is not installed (`pip install {tracker}`)")


def _trackers(report_to) -> list[str]:
    if report_to in (None, "none", "jsonl"):
        return []
    if report_to == "all":
        return [t for t in ("tensorboard", "wandb", "comet_ml") if importlib.util.find_spec(t) is not None]
    return [t.strip() for t in report_to.split(",") if t.strip()]


def trackers(report_to) -> list[str]:
    """accelerate trackers to start; tensorboard is dropped quietly when it is not installed."""
    return [t for t in _trackers(report_to) if t != "tensorboard" or importlib.util.find_spec("tensorboard")]


def beta_from_beta_dpo(beta_dpo: float, sdxl: bool) -> float:
    """This package's ``beta`` for diffusers' ``--beta_dpo`` (see the module docstring)."""
    return beta_dpo / 2.0 if sdxl else float(beta_dpo)


def beta_note(beta_dpo: Optional[float], beta: Optional[float], sdxl: bool) -> str:
    """How the effective beta came about from ``--beta_dpo``/``--beta`` (printed, in train_config.json)."""
    if beta_dpo is not None:
        if sdxl:
            return f"--beta_dpo {beta_dpo:g} / 2, as diffusers' train_diffusion_dpo_sdxl.py"
        return f"--beta_dpo {beta_dpo:g}, as diffusers' train_diffusion_dpo.py"
    return "--beta" if beta is not None else "default"
