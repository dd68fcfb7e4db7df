"""Exact resume and crash-safe checkpoints."""
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train_fixtures import run_trainer, toy_assets


def _args(a, out, extra=()):
    # 24 kept pairs / 4 per batch = 6 micro-batches per epoch, 2 per optimisation step; the
    # stop after step 4 falls mid-epoch (epoch 1, batch 2); warm-up 2 so the annotators switch on mid-run; cosine schedule
    # with warm-up so the scheduler state matters.
    return ["--pretrained_model_name_or_path", a["model"], "--latent_cache", a["cache"], "--output_dir", str(out),
            "--train_batch_size", "4", "--gradient_accumulation_steps", "2", "--max_train_steps", "8",
            "--learning_rate", "1e-3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2",
            "--ema_warmup_steps", "2", "--ema_decays", "0.9", "0.5", "--beta", "500", "--rho", "15",
            "--logits_normalize", "--margin_type", "quadratic", "--logging_steps", "3", "--rank", "4",
            "--checkpointing_steps", "100", "--dump_pairs", *extra]


def _assert_bitwise(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max {(a[k] - b[k]).abs().max().item():.3g})"


def test_resume_is_bitwise_exact(tmp_path):
    a = toy_assets()
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_trainer(_args(a, straight))
    r1 = run_trainer(_args(a, split, ["--stop_after_steps", "4"]))
    assert r1["stopped"] and os.path.isdir(split / "checkpoint-4")
    assert not (split / "pytorch_lora_weights.safetensors").exists()
    r2 = run_trainer(_args(a, split, ["--resume_from_checkpoint", "latest"]))
    assert r2["global_step"] == 8
    _assert_bitwise(load_file(str(straight / "pytorch_lora_weights.safetensors")),
                    load_file(str(split / "pytorch_lora_weights.safetensors")), "LoRA")
    _assert_bitwise(load_file(str(straight / "ema_annotators.safetensors")),
                    load_file(str(split / "ema_annotators.safetensors")), "EMA")
    # the logs agree too: same pairs in the same order with the same logits
    assert open(straight / "pairs.jsonl").read() == open(split / "pairs.jsonl").read()
    m1 = [line for line in open(straight / "metrics.jsonl")]
    m2 = [line for line in open(split / "metrics.jsonl")]
    strip = lambda rows: [{k: v for k, v in __import__("json").loads(r).items() if k != "steps_per_s"} for r in rows]
    assert strip(m1) == strip(m2)


def test_crash_between_checkpoint_files_is_never_latest(tmp_path, monkeypatch):
    import safetensors.torch as st

    from adpo_train import checkpoint as ckpt

    a = toy_assets()
    out = tmp_path / "run"
    real_save = st.save_file
    calls = {"rank": 0}

    def flaky_save(tensors, path, *args, **kw):
        if os.path.basename(path) == "trainer_rng_0.safetensors":
            calls["rank"] += 1
            if calls["rank"] == 2:  # the second checkpoint dies after accelerate's files, before the rank's own
                raise RuntimeError("simulated crash")
        return real_save(tensors, path, *args, **kw)

    monkeypatch.setattr(st, "save_file", flaky_save)
    extra = ["--checkpointing_steps", "2", "--checkpoints_total_limit", "5"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_trainer(_args(a, out, extra)[:-2] + extra)
    monkeypatch.setattr(st, "save_file", real_save)
    assert os.path.isdir(out / ".tmp-checkpoint-4")
    assert ckpt.resolve(str(out), "latest") == str(out / "checkpoint-2")
    res = run_trainer(_args(a, out, ["--resume_from_checkpoint", "latest"]))
    assert res["global_step"] == 8
    assert not any(n.startswith(".tmp-") for n in os.listdir(out))


def test_prune_and_resolve(tmp_path):
    from adpo_train import checkpoint as ckpt

    for step in (1, 2, 3):
        ckpt.save_atomic(str(tmp_path), step, lambda d: {"global_step": step}, total_limit=2)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [2, 3]
    os.makedirs(tmp_path / "checkpoint-9")  # no trainer_state.json: incomplete, never picked
    assert ckpt.resolve(str(tmp_path), "latest").endswith("checkpoint-3")
    assert ckpt.resolve(str(tmp_path / "empty"), "latest") is None
    with pytest.raises(FileNotFoundError):
        ckpt.resolve(str(tmp_path), "checkpoint-9")
