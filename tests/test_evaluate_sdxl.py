"""``adpo-train evaluate`` on an SDXL model folder with an SDXL LoRA, end to end (issue 24 asks for
SDXL; tests/test_evaluate.py covers the SD1.5 toy).  The tiny SDXL-style toy (two text encoders,
pooled embeddings, micro-conditioning) from tests/test_train_scale_sdxl.py, a LoRA with random
non-zero B so that tuned differs from base, the toy reward."""
import csv
import json
import os

import numpy as np

from tests.test_train_fixtures import require_trainer_packages, root
from tests.test_train_scale_sdxl import _sdxl_assets


def _sdxl_lora(model: str) -> str:
    out = os.path.join(root(), "evaluate-sdxl", "run")
    if not os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors")):
        import torch

        from adpo_train.models import add_lora, load_unet, save_lora_diffusers

        unet = load_unet(model)
        torch.manual_seed(2)
        for n, p in add_lora(unet, 4):
            if "lora_B" in n:
                p.data.normal_(0, 0.2)
        save_lora_diffusers(unet, out)
    return out


def test_sdxl_model_and_lora_evaluate_end_to_end(tmp_path, capsys):
    require_trainer_packages()
    from PIL import Image

    from adpo_train.cli import main

    model, _, _ = _sdxl_assets()
    lora = _sdxl_lora(model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "out"
    argv = ["evaluate", "--pretrained_model_name_or_path", model, "--lora", lora, "--prompts", str(prompts),
            "--reward", "toy", "--num_images_per_prompt", "2", "--num_inference_steps", "2", "--seed", "5",
            "--output_dir", str(out), "--quiet"]
    assert main(argv) == 0
    settings = json.load(open(out / "eval_settings.json"))
    assert settings["sdxl"] is True and settings["num_prompts"] == 2
    res = json.load(open(out / "results.json"))
    toy = res["rewards"]["toy"]
    assert set(toy) >= {"base", "tuned", "win_rate", "win_rate_ci95"}
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 and {r["model"] for r in rows} == {"base", "tuned"}
    size = settings["resolution"]
    pixels = {}
    for r in rows:
        with Image.open(out / r["image"]) as im:
            assert im.size == (size, size)
            pixels[r["image"]] = np.asarray(im.convert("RGB"), dtype=np.int16)
    # the LoRA reached the SDXL pipeline: every tuned image differs from its base image (same seed)
    for r in rows:
        if r["model"] == "tuned":
            base = r["image"].replace(os.path.join("images", "tuned"), os.path.join("images", "base"))
            assert np.abs(pixels[r["image"]] - pixels[base]).max() > 0, f"{r['image']} equals {base}"
    # the scores are the toy reward of those images
    from adpo_train.rewards import toy_reward

    for r in rows:
        with Image.open(out / r["image"]) as im:
            assert float(r["score"]) == toy_reward(im, r["prompt"])
    capsys.readouterr()
    # a rerun reuses every image and gives the same numbers
    assert main(argv) == 0
    assert "0 images drawn, 8 reused" in capsys.readouterr().out
    assert json.load(open(out / "results.json")) == res
