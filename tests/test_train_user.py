"""The trainer as a user meets it (issue 12): a real diffusers pipeline folder and a Pick-a-Pic
parquet with ties and corrupt images, through the command line: cache -> train -> SIGINT ->
resume -> load_lora_weights (alpha honoured) -> an image; then every bad input ends with a
short message, a non-zero exit code and the input files byte-identical."""
import hashlib
import json
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.test_train_fixtures import FAST, toy_assets

RANK, ALPHA = 4, 16.0  # the LoRA must act alpha / rank = 4x, as trained


def _digest(path) -> dict:
    """Every file under ``path`` (or the file itself) -> sha256: 'byte-identical after'."""
    path = str(path)
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    return {f: hashlib.sha256(open(f, "rb").read()).hexdigest() for f in sorted(files)}


def _main(argv, capsys):
    from adpo_train.cli import main

    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _train_args(model, cache, out, *extra):
    return ["train", "--pretrained_model_name_or_path", model, "--latent_cache", cache, "--output_dir", str(out),
            "--train_batch_size", "4", "--max_train_steps", "6", "--checkpointing_steps", "100",
            "--logging_steps", "2", "--rank", str(RANK), "--lora_alpha", str(ALPHA), "--learning_rate", "5e-3",
            "--ema_decays", "0.9", "--beta", "500", *extra, *FAST]


def _lora_pairs(state: dict) -> dict:
    """diffusers-format LoRA file -> {module: (A, B)}."""
    out = {}
    for k, v in state.items():
        if ".lora_A." in k or ".lora.down." in k:
            mod = k.split(".lora_A.")[0] if ".lora_A." in k else k.split(".lora.down.")[0]
            up = k.replace("lora_A", "lora_B").replace("lora.down", "lora.up")
            out[mod] = (v, state[up])
    return out


def _pick_a_pic_with_jpegs(path) -> str:
    """The toy's Pick-a-Pic rows (2 ties, 2 corrupt) with every other image re-encoded as JPEG."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from adpo_train import toy

    cols = toy.toy_records(24, num_ties=2, num_corrupt=2)
    for key in ("jpg_0", "jpg_1"):
        for i in range(0, len(cols[key]), 2):
            try:
                img = Image.open(io.BytesIO(cols[key][i])).convert("RGB")
            except Exception:  # noqa: BLE001 - the corrupt rows stay corrupt
                continue
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            cols[key][i] = buf.getvalue()
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    pq.write_table(pa.table(cols), str(path))
    return str(path)


def test_cache_train_sigint_resume_load_lora_generate(tmp_path, capsys, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from adpo_train import skip

    from adpo_train import toy

    # a diffusers pipeline folder with CLIP's real 77-token context (the shared toy uses 16)
    model = toy.write_toy_model(str(tmp_path / "sd-tiny-77"), pretrain_steps=0, max_tokens=77)
    a = {"model": model}
    data = _pick_a_pic_with_jpegs(tmp_path / "pick_a_pic" / "train-00000.parquet")
    data_before = _digest(data)
    cache = str(tmp_path / "cache")
    rc, out, err = _main(["cache", "--pretrained_model_name_or_path", a["model"], "--dataset_name", data,
                          "--latent_cache", cache, "--resolution", "32", "--device", "cpu"], capsys)
    assert rc == 0, err
    assert "24 pairs" in out and "2 ties dropped, 2 corrupt pairs skipped" in out
    assert load_file(os.path.join(cache, "text-00000.safetensors"))["text"].shape[1] == 77  # text once per caption
    run = tmp_path / "run"

    # SIGINT arrives during step 3: the run stops at the step boundary with checkpoint-3 and exit code 130
    real, calls = skip.ema_step, {"n": 0}

    def ema_step_then_sigint(ann, nonfinite):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(ann, nonfinite)

    monkeypatch.setattr(skip, "ema_step", ema_step_then_sigint)
    rc, out, err = _main(_train_args(a["model"], cache, run), capsys)
    monkeypatch.setattr(skip, "ema_step", real)
    assert rc == 130, err
    assert "SIGINT at step 3" in err and "--resume_from_checkpoint latest" in err and "Traceback" not in err
    assert (run / "checkpoint-3" / "trainer_state.json").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    rc, out, err = _main(_train_args(a["model"], cache, run, "--resume_from_checkpoint", "latest"), capsys)
    assert rc == 0, err
    assert (run / "checkpoint-6" / "pytorch_lora_weights.safetensors").is_file()  # final checkpoint
    cfg = json.load(open(run / "train_config.json"))
    assert cfg["args"]["resolution"] == 32 and cfg["beta"] == 500.0  # the cache's true resolution
    assert _digest(data) == data_before

    # the exported LoRA: fused weights == base + (alpha / r) * B @ A
    lora = load_file(str(run / "pytorch_lora_weights.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(a["model"], local_files_only=True, use_safetensors=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(run), weight_name="pytorch_lora_weights.safetensors")
    pipe.fuse_lora()
    fused = pipe.unet.state_dict()
    pairs = _lora_pairs(lora)
    assert len(pairs) > 0
    eps = torch.finfo(torch.float32).eps
    worst = 0.0
    for mod, (A, B) in pairs.items():
        name = mod.removeprefix("unet.") + ".weight"
        w = base[name].double()
        delta = fused[name.replace(".weight", ".base_layer.weight")].double() - w
        want = (ALPHA / RANK) * (B.double() @ A.double())  # float64
        assert want.abs().max() > 0, mod
        # fp32 rounding of the fuse (B @ A, the scale, the add) and of our subtraction, element by element
        bound = 8 * eps * (w.abs() + want.abs() + (ALPHA / RANK) * (B.double().abs() @ A.double().abs()))
        worst = max(worst, ((delta - want).abs() / bound).max().item())
    assert worst <= 1.0, f"fused LoRA is not base + (alpha/r) B A ({worst:.3g} x the fp32 rounding bound)"
    pipe.unfuse_lora()
    pipe.unload_lora_weights()

    def sample():
        return pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    plain = sample()
    pipe.load_lora_weights(str(run / "checkpoint-3"), weight_name="pytorch_lora_weights.safetensors")
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(run), weight_name="pytorch_lora_weights.safetensors")
    img = sample()
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()
    assert np.abs(img - plain).max() > 1e-4


# -- bad inputs: exit code, message, inputs untouched ----------------------------------------------
def _parquet(path, kind: str) -> str:
    """A Pick-a-Pic parquet whose every row is a tie (``ties``) or has an undecodable image (``corrupt``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from adpo_train import toy

    cols = toy.toy_records(4, num_ties=0, num_corrupt=0)
    if kind == "ties":
        cols["label_0"] = [0.5] * 4
    elif kind == "corrupt":
        cols["jpg_0"] = [b"not an image"] * 4
    elif kind == "no_caption":
        del cols["caption"]
    pq.write_table(pa.table(cols), str(path))
    return str(path)


def test_cache_into_a_used_folder_is_refused(tmp_path, capsys):
    a = toy_assets()
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    data = _parquet(folder / "train.parquet", "good")
    before = _digest(folder)
    rc, _, err = _main(["cache", "--pretrained_model_name_or_path", a["model"], "--dataset_name", data,
                        "--latent_cache", str(folder), "--resolution", "32"], capsys)
    assert rc == 2 and "--latent_cache" in err and "not written by adpo-train" in err
    assert len(err.strip().splitlines()) <= 2 and _digest(folder) == before
    # a stale temporary folder that is not ours is refused too, and kept
    (tmp_path / "new.tmp").mkdir()
    (tmp_path / "new.tmp" / "x").write_text("x")
    rc, _, err = _main(["cache", "--pretrained_model_name_or_path", a["model"], "--dataset_name", data,
                        "--latent_cache", str(tmp_path / "new"), "--resolution", "32"], capsys)
    assert rc == 2 and (tmp_path / "new.tmp" / "x").read_text() == "x"


@pytest.mark.parametrize("kind, message", [("ties", "no usable pair"), ("corrupt", "no usable pair"),
                                           ("no_caption", "missing Pick-a-Pic columns")])
def test_unusable_datasets(tmp_path, capsys, kind, message):
    a = toy_assets()
    data = _parquet(tmp_path / "d.parquet", kind)
    before = _digest(data)
    rc, _, err = _main(["cache", "--pretrained_model_name_or_path", a["model"], "--dataset_name", data,
                        "--latent_cache", str(tmp_path / "cache"), "--resolution", "32"], capsys)
    assert rc == 2 and message in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cache.tmp").exists()
    assert _digest(data) == before


def test_all_corrupt_images_without_cache_is_a_cut_short_run(tmp_path, capsys):
    a = toy_assets()
    data = _parquet(tmp_path / "d.parquet", "corrupt")
    rc, _, err = _main(["train", "--pretrained_model_name_or_path", a["model"], "--dataset_name", data,
                        "--output_dir", str(tmp_path / "out"), "--train_batch_size", "2", "--max_train_steps", "2",
                        "--resolution", "32", *FAST], capsys)
    assert rc == 3 and "ended at step 0 of --max_train_steps 2" in err, err


def test_user_errors_are_one_line_and_name_the_flag(tmp_path, capsys, monkeypatch):
    a = toy_assets()
    out = tmp_path / "out"
    base = ["train", "--pretrained_model_name_or_path", a["model"], "--latent_cache", a["cache"],
            "--train_batch_size", "4", "--max_train_steps", "1", *FAST]
    cases = [
        (["--output_dir", str(tmp_path / "missing-model")], "--pretrained_model_name_or_path", "/no/such/model"),
        (["--output_dir", str(tmp_path / "f.txt")], "is not a folder", None),
        (["--output_dir", str(out), "--resume_from_checkpoint", str(tmp_path / "nope")], "--resume_from_checkpoint",
         None),
        (["--output_dir", str(out), "--push_to_hub"], "--push_to_hub is not supported", None),
        (["--output_dir", str(out), "--loss_type", "cpo"], "--loss_type cpo", None),
        (["--output_dir", str(out), "--revision", "main"], "--revision", None),
        # numbers out of range (a 0 batch size was a ZeroDivisionError in the sampler)
        (["--output_dir", str(out), "--train_batch_size", "0"], "--train_batch_size must be at least 1", None),
        (["--output_dir", str(out), "--learning_rate=-1e-4"], "--learning_rate must be a positive", None),
        (["--output_dir", str(out), "--lr_warmup_steps=-1"], "--lr_warmup_steps must be at least 0", None),
        (["--output_dir", str(out), "--adam_beta2", "1"], "--adam_beta2 must be in [0, 1)", None),
    ]
    (tmp_path / "f.txt").write_text("keep me")
    for extra, needle, model in cases:
        argv = list(base) + extra
        if model:
            argv[argv.index(a["model"])] = model
        rc, _, err = _main(argv, capsys)
        assert rc == 2 and needle in err and "Traceback" not in err, (extra, err)
        assert len(err.strip().splitlines()) <= 2, err
    assert (tmp_path / "f.txt").read_text() == "keep me"
    # --debug (or ADPO_TRAIN_DEBUG=1) shows the traceback instead
    from adpo_train.cli import main
    from adpo_train.errors import UserError

    with pytest.raises(UserError):
        main(base + ["--output_dir", str(out), "--push_to_hub", "--debug"])


def test_output_dir_reuse_needs_overwrite_or_resume(tmp_path, capsys):
    a = toy_assets()
    out = tmp_path / "out"
    argv = ["train", "--pretrained_model_name_or_path", a["model"], "--latent_cache", a["cache"],
            "--output_dir", str(out), "--train_batch_size", "4", "--max_train_steps", "2", *FAST]
    assert _main(argv, capsys)[0] == 0
    (out / "mine.txt").write_text("user file")
    before = _digest(out)
    rc, _, err = _main(argv, capsys)
    assert rc == 2 and "--overwrite_output_dir" in err and "--resume_from_checkpoint latest" in err
    assert _digest(out) == before
    rc, _, err = _main(argv + ["--overwrite_output_dir"], capsys)
    assert rc == 0, err
    assert (out / "mine.txt").read_text() == "user file"  # only the old run's outputs were replaced


def test_cache_from_another_model_is_refused(tmp_path, capsys):
    import shutil

    a = toy_assets()
    other = tmp_path / "other-model"
    shutil.copytree(a["model"], other)
    cfg = other / "text_encoder" / "config.json"
    cfg.write_text(cfg.read_text() + "\n")  # any change to the text encoder or VAE makes it another model
    argv = ["train", "--pretrained_model_name_or_path", str(other), "--latent_cache", a["cache"],
            "--output_dir", str(tmp_path / "out"), "--train_batch_size", "4", "--max_train_steps", "1", *FAST]
    rc, _, err = _main(argv, capsys)
    assert rc == 2 and "--allow_cache_model_mismatch" in err
    rc, out, err = _main(argv + ["--allow_cache_model_mismatch"], capsys)
    assert rc == 0 and "warning" in out


def test_diffusers_readme_command_runs(tmp_path, capsys):
    """diffusers' README command for train_diffusion_dpo.py, hub names replaced by local folders, steps
    and sizes shrunk; --push_to_hub is refused with its reason, --use_8bit_adam needs bitsandbytes."""
    import importlib.util

    a = toy_assets()
    readme = ["--pretrained_model_name_or_path=" + a["model"], "--output_dir=" + str(tmp_path / "dpo"),
              "--mixed_precision=fp16", "--dataset_name=" + a["data"], "--resolution=32", "--train_batch_size=4",
              "--gradient_accumulation_steps=2", "--gradient_checkpointing", "--rank=8", "--learning_rate=1e-5",
              "--report_to=tensorboard", "--lr_scheduler=constant", "--lr_warmup_steps=0", "--max_train_steps=2",
              "--checkpointing_steps=2000", "--run_validation", "--validation_steps=1", "--seed=0",
              "--validation_inference_steps=2", "--validation_prompts", "a red circle", "a blue square",
              "--cpu_threads", "1", "--quiet"]
    rc, _, err = _main(["train", *readme, "--push_to_hub"], capsys)
    assert rc == 2 and "never touches the network" in err
    if importlib.util.find_spec("wandb") is None:  # the README's --report_to="wandb"
        rc, _, err = _main(["train", *readme, "--report_to=wandb"], capsys)
        assert rc == 2 and "wandb is not installed" in err
    if importlib.util.find_spec("bitsandbytes") is None:
        rc, _, err = _main(["train", *readme, "--use_8bit_adam"], capsys)
        assert rc == 2 and "bitsandbytes" in err
    # a process of its own, as a user runs it (accelerate keeps its mixed precision per process)
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "adpo_train", "train", *readme], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    grids = sorted(os.listdir(tmp_path / "dpo" / "validation"))
    assert grids == ["step-000001.png", "step-000002-final.png", "step-000002.png"]
    from PIL import Image

    assert Image.open(tmp_path / "dpo" / "validation" / "step-000002-final.png").size == (2 * 32, 2 * 32)  # + no-LoRA row


# The flags of diffusers' examples/research_projects/diffusion_dpo/train_diffusion_dpo.py and
# train_diffusion_dpo_sdxl.py (diffusers main, 2026-08).
DIFFUSERS_DPO_FLAGS = """pretrained_model_name_or_path revision dataset_name dataset_split_name variant run_validation
validation_steps max_train_samples output_dir cache_dir seed resolution vae_encode_batch_size no_hflip random_crop
train_batch_size num_train_epochs max_train_steps checkpointing_steps checkpoints_total_limit resume_from_checkpoint
gradient_accumulation_steps gradient_checkpointing beta_dpo loss_type learning_rate scale_lr lr_scheduler
lr_warmup_steps lr_num_cycles lr_power dataloader_num_workers use_8bit_adam adam_beta1 adam_beta2 adam_weight_decay
adam_epsilon max_grad_norm push_to_hub hub_token hub_model_id logging_dir allow_tf32 report_to mixed_precision
prior_generation_precision local_rank enable_xformers_memory_efficient_attention rank tracker_name
pretrained_vae_model_name_or_path is_turbo""".split()


def test_every_diffusers_flag_is_accepted_or_refused_with_a_reason():
    from adpo_train import compat
    from adpo_train.cli import build_parser

    known = {s.lstrip("-") for action in build_parser()._actions for s in action.option_strings}
    assert [f for f in DIFFUSERS_DPO_FLAGS if f not in known] == []
    for flag, why in compat.REFUSED.items():
        assert flag in DIFFUSERS_DPO_FLAGS and len(why) > 20


def test_sigterm_is_recorded_not_raised():
    from adpo_train.signals import StopRequest

    before = signal.getsignal(signal.SIGTERM)
    with StopRequest(log=lambda *a: None) as stop:
        with pytest.raises(SystemExit):  # before arm() (loading, caching): stop at once, exit code 143
            os.kill(os.getpid(), signal.SIGTERM)
        stop.arm()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_cache_of_another_shape_is_refused_even_when_a_mismatch_is_allowed():
    from types import SimpleNamespace

    from adpo_train.errors import UserError
    from adpo_train.cache import _check_shapes

    item = {"latents": torch.zeros(2, 4, 8, 8), "text": torch.zeros(16, 64)}  # an SDXL-style cache
    unet = SimpleNamespace(config=SimpleNamespace(in_channels=4, cross_attention_dim=32))
    with pytest.raises(UserError, match="text width 64.*text width 32"):
        _check_shapes("c", [item], unet)
    unet.config.cross_attention_dim = 64
    _check_shapes("c", [item], unet)


def test_revision_and_cache_dir_find_a_repo_in_the_local_hf_cache(tmp_path):
    """--pretrained_model_name_or_path org/name --revision R --cache_dir C: the snapshot already in the
    local Hugging Face cache, offline; a repo id that is not there is a one-line error."""
    import shutil

    from adpo_train.errors import MissingInput
    from adpo_train.models import locate_model

    a = toy_assets()
    repo = tmp_path / "hub" / "models--org--toy"
    shutil.copytree(a["model"], repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    found = locate_model("org/toy", None, str(tmp_path / "hub"))
    assert os.path.samefile(found, repo / "snapshots" / ("a" * 40))
    assert os.path.samefile(locate_model("org/toy", "a" * 40, str(tmp_path / "hub")), found)
    with pytest.raises(MissingInput, match="never downloads"):
        locate_model("org/other", None, str(tmp_path / "hub"))


def test_vae_override_for_cache(tmp_path, capsys):
    a = toy_assets()
    argv = ["cache", "--pretrained_model_name_or_path", a["model"], "--dataset_name", a["data"],
            "--latent_cache", str(tmp_path / "c"), "--resolution", "32", "--max_train_samples", "4"]
    rc, _, err = _main(argv + ["--pretrained_vae_model_name_or_path", str(tmp_path / "nope")], capsys)
    assert rc == 2 and "--pretrained_vae_model_name_or_path" in err
    rc, _, err = _main(argv + ["--pretrained_vae_model_name_or_path", os.path.join(a["model"], "vae"),
                               "--vae_encode_batch_size", "2"], capsys)
    assert rc == 0, err
    assert json.load(open(tmp_path / "c" / "index.json"))["num_pairs"] == 4
