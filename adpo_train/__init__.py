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


def train(config):
    """Run training from a frozen :class:`adpo_train.config.TrainConfig` (built from flags by
    :func:`adpo_train.cli.resolve`, or a preset such as ``TrainConfig.toy_demo()``)."""
    from .trainer import train as _train
    return _train(config)
