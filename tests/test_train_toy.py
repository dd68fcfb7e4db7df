"""The embedded default (shortened) end to end, the image (non-cache) path and the CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.test_train_fixtures import FAST, root, run_trainer, toy_assets, train_on_toy_cache


def test_embedded_default_shortened(tmp_path, capsys):
    from adpo_train.cli import main

    out = tmp_path / "toy"
    rc = main(["--output_dir", str(out), "--max_train_steps", "4", "--checkpointing_steps", "2",
               "--toy_pairs", "24", "--train_batch_size", "4", "--logging_steps", "2"] + FAST[:-3])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "toy model: pre-training step 20/20" in printed  # the demo is never silent while it builds
    from safetensors.torch import load_file

    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("unet.") for k in lora), list(lora)[:3]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert all(k in r for k in ("loss", "implicit_acc", "weight_mean", "metric_mean"))
        assert r["nonfinite_micro_batches"] == 0
    assert rows[-1]["annotators_ready"] is True
    assert (out / "training_curves.png").stat().st_size > 1000
    flips = json.load(open(out / "flipped_pairs.json"))
    assert len(flips["flipped_pairs"]) == round(0.2 * 24)
    # the last step always gets a checkpoint; the toy keeps one (--checkpoints_total_limit 1)
    assert (out / "checkpoint-4" / "trainer_state.json").is_file() and not (out / "checkpoint-2").exists()
    cfg = json.load(open(out / "train_config.json"))
    assert cfg["data"]["num_ties"] == 2 and cfg["data"]["num_corrupt"] == 1


def test_train_from_images_with_corrupt_pair(tmp_path):
    """No cache: the VAE and text encoder run in the step; the corrupt pair is dropped and counted."""
    a = toy_assets()
    res = run_trainer(["--pretrained_model_name_or_path", a["model"], "--dataset_name", a["data"],
                       "--output_dir", str(tmp_path), "--train_batch_size", "8", "--max_train_steps", "3",
                       "--num_train_epochs", "1", "--logging_steps", "3", "--resolution", "32"])
    assert res["global_step"] == 3
    row = json.loads(open(tmp_path / "metrics.jsonl").read().splitlines()[-1])
    assert row["corrupt_pairs_seen"] == 1  # all 24 kept pairs were visited in 3 batches of 8
    assert os.path.isfile(res["lora"])


def test_plain_dpo_and_v_prediction(tmp_path):
    """--preset dpo (no annotators) on a v-prediction scheduler override."""
    res = train_on_toy_cache(tmp_path, "--max_train_steps", "2", "--preset", "dpo", "--prediction_type",
                             "v_prediction", "--logging_steps", "1")
    assert res["global_step"] == 2
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(r["weight_mean"] == 1.0 and r["metric_mean"] == 0.0 for r in rows)
    assert not (tmp_path / "ema_annotators.safetensors").exists()


def test_cli_help_and_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "adpo_train", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for flag in ("--pretrained_model_name_or_path", "--beta_dpo", "--ema_warmup_steps", "--preset",
                 "--checkpoints_total_limit", "--resume_from_checkpoint", "--flip_ratio", "--latent_cache"):
        assert flag in r.stdout


def test_beta_mapping_and_paper_preset():
    import adpo_kernels as ak
    from adpo_train.cli import build_parser, resolve

    model = ["--pretrained_model_name_or_path", toy_assets()["model"]]  # an SD1.5-style folder
    # --beta_dpo means what diffusers' script for the family means: train_diffusion_dpo.py's beta_dpo * logits
    a = resolve(build_parser().parse_args(model + ["--beta_dpo", "5000"]))
    assert a.loss_config.beta == 5000.0 and not a.sdxl
    a = resolve(build_parser().parse_args(["--unet_config", "tiny-sdxl", "--beta_dpo", "5000"]))
    assert a.loss_config.beta == 2500.0 and a.sdxl  # train_diffusion_dpo_sdxl.py's -0.5 * beta_dpo
    a = resolve(build_parser().parse_args(model + ["--beta", "1234"]))
    assert a.loss_config.beta == 1234.0
    a = resolve(build_parser().parse_args(model + ["--preset", "paper"]))
    assert a.loss_config == ak.AdaptiveDPOConfig.paper()
    assert (a.rank, a.lora_alpha, a.learning_rate, a.gradient_accumulation_steps, a.train_batch_size) == (8, 8, 1e-5, 2, 16)
    assert a.ema_decays == (0.9999, 0.5) and a.ema_warmup_steps == 2 and a.gradient_checkpointing
    a = resolve(build_parser().parse_args(model + ["--preset", "paper", "--rank", "4", "--rho", "3",
                                                   "--margin_type", "none"]))
    assert a.rank == 4 and a.loss_config.rho == 3.0 and a.loss_config.margin_type is None
    a = resolve(build_parser().parse_args(model + ["--no-adaptive"]))
    assert not a.loss_config.adaptive and a.ema_decays == ()


def test_experiment_dispatch(monkeypatch):
    import types

    from adpo_train.cli import main

    seen = {}
    fake = types.ModuleType("adpo_train.experiments.label_flip")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "adpo_train.experiments.label_flip", fake)
    if "adpo_train.experiments" not in sys.modules:
        try:
            import adpo_train.experiments  # noqa: F401
        except ImportError:
            monkeypatch.setitem(sys.modules, "adpo_train.experiments", types.ModuleType("adpo_train.experiments"))
    assert main(["experiment", "label-flip", "--x", "1"]) == 0
    assert seen["argv"] == ["--x", "1"]
    assert main(["experiment", "nope"]) == 2  # a user error: one line, exit code 2


def test_no_downloads_for_a_missing_model(tmp_path):
    from adpo_train.models import check_local_model

    with pytest.raises(FileNotFoundError, match="never downloads"):
        check_local_model("runwayml/stable-diffusion-v1-5")


def test_local_model_and_dataset_flow_through_the_cli(tmp_path):
    """make-toy -> `adpo-train cache` -> train from the cache: the documented local-data workflow."""
    from adpo_train.cli import main

    assert main(["make-toy", str(tmp_path / "toy"), "--toy_pairs", "12"]) == 0
    model, data = str(tmp_path / "toy" / "model"), str(tmp_path / "toy" / "data")
    assert main(["cache", "--pretrained_model_name_or_path", model, "--dataset_name", data,
                 "--latent_cache", str(tmp_path / "cache"), "--resolution", "32", "--device", "cpu"]) == 0
    assert main(["train", "--pretrained_model_name_or_path", model, "--latent_cache", str(tmp_path / "cache"),
                 "--output_dir", str(tmp_path / "out"), "--train_batch_size", "4", "--max_train_steps", "2"]
                + FAST) == 0
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_toy_model_rebuilt_when_its_recipe_changes(tmp_path, monkeypatch):
    """A toy model folder records its recipe: the same recipe is reused, another one (other pre-training
    steps, or a folder from before recipes were recorded) is rebuilt, and the toy's latent cache with
    it; a model folder that is not the toy is refused."""
    from adpo_train import toy
    from adpo_train.config import TrainConfig
    from adpo_train.errors import UserError
    from adpo_train.models import encoder_fingerprint
    from adpo_train.trainer import _prepare_toy

    def recipe(path):
        return json.load(open(os.path.join(path, toy.RECIPE_FILE)))

    monkeypatch.setenv("ADPO_TOY_PRETRAIN_STEPS", "0")
    config = TrainConfig.toy_demo(output_dir=str(tmp_path / "run"), toy_pairs=12)
    prepared = _prepare_toy(config, lambda *a, **k: None)
    model, cache = prepared.pretrained_model_name_or_path, prepared.latent_cache
    weights = os.path.join(model, "vae", "diffusion_pytorch_model.safetensors")
    stamp = os.stat(weights).st_mtime_ns
    assert recipe(model) == toy.toy_recipe(pretrain_steps=0)
    assert _prepare_toy(config, lambda *a, **k: None) == prepared and os.stat(weights).st_mtime_ns == stamp  # reused

    monkeypatch.setenv("ADPO_TOY_PRETRAIN_STEPS", "1")  # another recipe: the VAE changes, so must the cache
    _prepare_toy(config, lambda *a, **k: None)
    assert recipe(model)["pretrain"]["unet_steps"] == 1 and os.stat(weights).st_mtime_ns != stamp
    assert json.load(open(os.path.join(cache, "index.json")))["model_fingerprint"] == encoder_fingerprint(model)

    os.remove(os.path.join(model, toy.RECIPE_FILE))  # a toy folder written before recipes were recorded
    stamp = os.stat(weights).st_mtime_ns
    toy.write_toy_model(model)
    assert recipe(model)["pretrain"]["unet_steps"] == 1 and os.stat(weights).st_mtime_ns != stamp

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match="not the toy"):
        toy.write_toy_model(str(foreign))
    assert os.listdir(foreign) == ["model_index.json"]
