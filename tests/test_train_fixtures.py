"""Shared, lazily built assets of the trainer tests (no tests here).

One toy model folder, one toy Pick-a-Pic parquet and one latent cache per test session,
built offline in a temporary folder; every trainer test reuses them.

Nothing here skips at import: a test that needs the trainer's packages calls
:func:`require_trainer_packages` (the helpers below do), so one missing optional package
skips the tests that need it, not every module that imports this one.
"""
import atexit
import os
import shutil
import tempfile

import pytest

TRAINER_PACKAGES = ("diffusers", "peft", "accelerate")

_ROOT = None
_ASSETS = {}

# Flags every in-process trainer run of the tests shares: small, quiet, one CPU thread.
FAST = ["--cpu_threads", "1", "--quiet", "--no_plot", "--report_to", "jsonl"]


def require_trainer_packages(*packages: str) -> None:
    """Skip the calling test unless ``packages`` (default: diffusers, peft, accelerate) import."""
    for name in packages or TRAINER_PACKAGES:
        pytest.importorskip(name)


def root() -> str:
    global _ROOT
    require_trainer_packages()
    if _ROOT is None:
        _ROOT = tempfile.mkdtemp(prefix="adpo-train-tests-")
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def toy_assets(num_pairs: int = 24) -> dict:
    """``dict(model, data, cache)``: the toy model folder, a parquet (with 2 ties, 1 corrupt) and its cache."""
    if num_pairs not in _ASSETS:
        from adpo_train import toy
        from adpo_train.cache import build_cache

        base = os.path.join(root(), f"assets-{num_pairs}")
        model = toy.write_toy_model(os.path.join(root(), "model"))
        data = toy.write_toy_dataset(os.path.join(base, "data.parquet"), num_pairs)
        cache = os.path.join(base, "cache")
        build_cache(model, data, cache, resolution=toy.RESOLUTION, batch_size=32, flip_ratio=0.25, flip_seed=3,
                    device="cpu", log=lambda *a: None)
        _ASSETS[num_pairs] = {"model": model, "data": data, "cache": cache}
    return _ASSETS[num_pairs]


def run_trainer(argv):
    require_trainer_packages()
    from adpo_train.cli import build_parser, resolve
    from adpo_train.trainer import train

    return train(resolve(build_parser().parse_args(list(argv) + FAST)))


def train_on_toy_cache(out_dir, *flags: str):
    """:func:`run_trainer` on the toy model and its latent cache, 4 pairs per batch, into ``out_dir``."""
    a = toy_assets()
    return run_trainer(["--pretrained_model_name_or_path", a["model"], "--latent_cache", a["cache"],
                        "--output_dir", str(out_dir), "--train_batch_size", "4", *flags])


def toy_pipeline(model: str):
    """``(pipe, sample)``: the toy model's ``StableDiffusionPipeline`` (local files only) and a function
    that draws one fixed-seed 32 px image with it (two inference steps)."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True, use_safetensors=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    return pipe, sample
