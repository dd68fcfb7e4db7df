"""adpo_train: the bundled Adaptive-DPO / Diffusion-DPO trainer (diffusers UNet + peft LoRA + accelerate).

``adpo-train`` (or ``python -m adpo_train``) with no arguments trains a built-in toy
that is built offline; see ``docs/trainer.md``.  Heavy imports (diffusers, peft,
accelerate) happen inside the functions, so importing this package is cheap.
"""
from __future__ import annotations

__all__ = ["main", "train"]


def main(argv=None) -> int:
    from .cli import main as _main
    return _main(argv)


def train(args):
    """Run training from a parsed argument namespace (see :func:`adpo_train.cli.build_parser`)."""
    from .trainer import train as _train
    return _train(args)
