"""The trainer under ``--distributed fsdp`` (FSDP2 over gloo, two processes under torchrun):

* stopped after N steps and resumed, it ends bit for bit where a straight run ends (gathered
  parameters and EMA annotators), for LoRA and for a full fine-tune;
* its exports load with diffusers: the LoRA into a pipeline, the UNet folder with ``from_pretrained``;
* each rank holds about half of DDP's bytes of parameters, optimizer state and EMA annotators
  (tensor bytes counted on each rank, ``memory_per_rank.json``);
* what it does not combine with is refused with a reason.

The numerical equivalence with one process (loss, metric, weights, gradients, updated
parameters) is tested in tests/test_train_scale_ddp.py, next to DDP's.
"""
import json
import os
import types

import numpy as np
import pytest
import torch

from bench.launch import torchrun
from tests.test_train_fixtures import require_trainer_packages, toy_assets, toy_pipeline

TORCHRUN = ["-m", "adpo_train"]
COMMON = ["--train_batch_size", "2", "--logging_steps", "2", "--checkpointing_steps", "2", "--sync_batch_stats",
          "--ema_warmup_steps", "1", "--max_train_steps", "4", "--quiet", "--no_plot", "--report_to", "jsonl"]
FULL = ["--unet_config", "tiny", "--synthetic_pairs", "16", "--full_finetune"]


def _logs(out_dir):
    """A fresh folder for the ranks' logs of one run writing to ``out_dir``."""
    n = 0
    while os.path.exists(f"{out_dir}-logs{n}"):
        n += 1
    return f"{out_dir}-logs{n}"


def _torchrun(args, out_dir):
    return torchrun(TORCHRUN + COMMON + args + ["--output_dir", str(out_dir)], _logs(out_dir)).stdout


def _straight_and_resumed(tmp_path, args):
    """A straight 4-step run and a run stopped after 2 steps then resumed; returns their folders."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    out = _torchrun(args, straight)
    assert "x 2 processes (FSDP)" in out
    _torchrun(args + ["--stop_after_steps", "2"], resumed)
    assert "resumed from" in _torchrun(args + ["--resume_from_checkpoint", "latest"], resumed)
    return straight, resumed


def _assert_bit_identical(a, b, name):
    from safetensors.torch import load_file

    x, y = load_file(os.path.join(a, name)), load_file(os.path.join(b, name))
    assert x.keys() == y.keys() and x, name
    differ = [k for k in x if not torch.equal(x[k], y[k])]
    assert not differ, f"{name}: {len(differ)} of {len(x)} tensors differ after the resume, e.g. {differ[:2]}"
    return x


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    require_trainer_packages()
    tmp = tmp_path_factory.mktemp("fsdp-full")
    straight, resumed = _straight_and_resumed(tmp, FULL + ["--distributed", "fsdp"])
    _torchrun(FULL, tmp / "ddp")
    return straight, resumed, tmp / "ddp"


def test_fsdp_lora_resume_is_bit_identical_and_the_lora_loads_into_a_pipeline(tmp_path):
    require_trainer_packages()
    a = toy_assets()
    args = ["--pretrained_model_name_or_path", a["model"], "--latent_cache", a["cache"], "--learning_rate", "5e-3",
            "--distributed", "fsdp"]
    straight, resumed = _straight_and_resumed(tmp_path, args)
    lora = _assert_bit_identical(straight, resumed, "pytorch_lora_weights.safetensors")
    _assert_bit_identical(straight, resumed, "ema_annotators.safetensors")
    assert (resumed / "checkpoint-2" / "sharded" / ".metadata").is_file()  # DCP, every rank's shards
    assert (resumed / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()  # loadable in each checkpoint
    pipe, sample = toy_pipeline(a["model"])
    base = sample()
    pipe.load_lora_weights(str(straight), weight_name="pytorch_lora_weights.safetensors")
    assert np.abs(sample() - base).max() > 1e-4, "the gathered LoRA must change the pipeline's output"
    loaded = {k: v for k, v in pipe.unet.state_dict().items() if "lora_B" in k}
    exported = [k for k in lora if "lora_B" in k or "lora.up" in k]
    assert len(loaded) == len(exported) > 0  # every adapter matrix arrived whole


def test_fsdp_full_finetune_resume_is_bit_identical_and_the_unet_loads(full_runs):
    from diffusers import UNet2DConditionModel

    straight, resumed, _ = full_runs
    weights = _assert_bit_identical(straight, resumed, os.path.join("unet", "diffusion_pytorch_model.safetensors"))
    ema = _assert_bit_identical(straight, resumed, "ema_annotators.safetensors")
    unet = UNet2DConditionModel.from_pretrained(str(straight / "unet"))
    state = unet.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in state)
    from adpo_train.models import build_unet

    init = build_unet("tiny", 0).state_dict()  # the run's starting point: training moved it
    assert max(float((weights[k] - init[k]).abs().max()) for k in init) > 0
    assert len(ema) == 2 * len(weights)  # two annotators, every parameter, whole
    config = json.load(open(straight / "train_config.json"))
    assert config["args"]["distributed"] == "fsdp"


def test_fsdp_holds_half_of_ddps_bytes_per_rank(full_runs):
    straight, _, ddp = full_runs
    sharded = json.load(open(straight / "memory_per_rank.json"))
    whole = json.load(open(ddp / "memory_per_rank.json"))
    assert (sharded["distributed"], whole["distributed"]) == ("fsdp", "ddp")
    for r in range(2):
        s, w = sharded["ranks"][r], whole["ranks"][r]
        for key in ("trained_param_bytes", "optimizer_state_bytes", "ema_bytes", "frozen_param_bytes"):
            assert w[key] > 0 and 0.45 <= s[key] / w[key] <= 0.55, (r, key, s[key], w[key])
        ratio = (s["trained_param_bytes"] + s["optimizer_state_bytes"]) / (
            w["trained_param_bytes"] + w["optimizer_state_bytes"])
        assert 0.45 <= ratio <= 0.55, ratio


def _fake_accelerator(num_processes, distributed_type="MULTI_CPU"):
    from accelerate.utils import DistributedType

    return types.SimpleNamespace(num_processes=num_processes, distributed_type=DistributedType(distributed_type))


@pytest.mark.parametrize("change, phrase", [
    ({}, "several processes"),
    ({"mixed_precision": "fp16"}, "use bf16"),
    ({"compile": True}, "--compile"),
    ({"use_8bit_adam": True}, "--use_8bit_adam"),
    ({"run_validation": True}, "--run_validation"),
])
def test_what_fsdp_does_not_combine_with_is_refused_with_a_reason(change, phrase):
    require_trainer_packages()
    from adpo_train.config import TrainConfig
    from adpo_train.errors import UserError
    from adpo_train.trainer import _check_distributed

    cfg = TrainConfig(distributed="fsdp", **change)
    with pytest.raises(UserError, match=phrase):
        _check_distributed(cfg, _fake_accelerator(1 if not change else 2), print)
    _check_distributed(TrainConfig(distributed="fsdp"), _fake_accelerator(2), print)  # accepted as it is


def test_accelerates_fsdp_plugin_is_pointed_to_distributed_fsdp():
    require_trainer_packages()
    from adpo_train.config import TrainConfig
    from adpo_train.errors import UserError
    from adpo_train.trainer import _check_distributed

    with pytest.raises(UserError, match="--distributed fsdp"):
        _check_distributed(TrainConfig(), _fake_accelerator(2, "FSDP"), print)


def test_a_sharded_checkpoint_resumes_only_sharded(full_runs, tmp_path):
    """Resuming an FSDP checkpoint without --distributed fsdp is refused before anything is loaded."""
    import shutil

    _, resumed, _ = full_runs
    out = tmp_path / "run"
    shutil.copytree(resumed, out)
    proc = torchrun(TORCHRUN + COMMON + FULL + ["--output_dir", str(out), "--resume_from_checkpoint",
                                                "checkpoint-2"], _logs(out), check=False)
    assert proc.returncode != 0
    assert "--distributed fsdp; resume it with the same" in proc.stdout + proc.stderr


@pytest.mark.parametrize("mode", [[], ["--full_finetune"]], ids=["lora", "full"])
def test_fsdp_trains_in_bf16(tmp_path, mode):
    """FSDP's MixedPrecisionPolicy (bf16 compute, fp32 reduce) with fp32 LoRA parameters over a bf16 base,
    and with an fp32 full fine-tune over a bf16 reference."""
    require_trainer_packages()
    _torchrun(["--unet_config", "tiny", "--synthetic_pairs", "16", "--distributed", "fsdp", "--mixed_precision",
               "bf16", "--gradient_accumulation_steps", "2"] + mode, tmp_path)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4] and rows[-1]["annotators_ready"]
    assert all(np.isfinite(r["loss"]) and r["skipped_steps"] == 0 for r in rows)


def test_streamed_safetensors_file_reads_back_exactly(tmp_path):
    """adpo_train.fsdp.save_gathered writes the safetensors format itself (header first, then one tensor
    at a time): safetensors reads it back bit for bit, every dtype a UNet export holds, odd sizes too."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from adpo_train.fsdp import save_gathered

    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 5, generator=g), "b.half": torch.randn(7, generator=g).half(),
               "c.bf16": torch.randn(2, 3, 1, generator=g).bfloat16(), "d.double": torch.randn(1, generator=g).double(),
               "e.steps": torch.arange(3), "f.empty": torch.zeros(0, 4)}
    path = str(tmp_path / "x.safetensors")
    save_gathered(path, tensors, True, {"decays": "[0.5]"})
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"decays": "[0.5]"}
    save_gathered(str(tmp_path / "y.safetensors"), tensors, False)  # another rank writes nothing
    assert not (tmp_path / "y.safetensors").exists()
