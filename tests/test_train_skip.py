"""A step with a non-finite loss changes nothing: optimizer state (moments, step count), weight
decay, EMA annotators; the LR schedule and the step counter are taken back at the next sync."""
import json

import pytest
import torch

from tests.test_train_fixtures import train_on_toy_cache


def _optimizer(fused: bool):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, **({"fused": True} if fused else {}))
    return params, opt


def _snapshot(params, opt):
    return [p.detach().clone() for p in params] + [v.clone() for p in params for v in opt.state[p].values()]


def _restoring_step(opt, nonfinite):
    from adpo_train import skip

    skip._step_and_restore(opt, opt, nonfinite)


@pytest.mark.parametrize("fused", [True, False, "restore"], ids=["fused", "cpu-read", "snapshot-restore"])
@pytest.mark.parametrize("first", [True, False], ids=["first-step", "later-step"])
def test_optimizer_step_skipped_bit_for_bit(fused, first, monkeypatch):
    """fused: found_inf; cpu-read: the flag read on the CPU; snapshot-restore: the GPU path (non-fused
    AdamW off the CPU), called directly."""
    from adpo_train import skip

    if fused == "restore":
        monkeypatch.setattr(skip, "optimizer_step", _restoring_step)
    params, opt = _optimizer(fused is True)
    if not first:  # momentum and weight decay would move the weights even with zero gradients
        for p in params:
            p.grad = torch.randn_like(p)
        skip.optimizer_step(opt, torch.tensor(False))
    before = _snapshot(params, opt)
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    skip.optimizer_step(opt, torch.tensor(True))
    after = _snapshot(params, opt)
    if first:  # the state is created by the skipped step: zeros and step 0, as if fresh
        assert all(torch.equal(a, b) for a, b in zip(before, after[:len(params)]))
        assert all(v.abs().sum() == 0 for v in after[len(params):])
    else:
        assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
    for p in params:
        p.grad = torch.ones_like(p)
    skip.optimizer_step(opt, torch.tensor(False))
    assert not torch.equal(params[0].detach(), before[0]), "a finite step must still update"


def test_ema_step_skipped_and_schedules_rewound():
    from diffusers.optimization import get_scheduler

    from adpo_train import skip
    from adpo_train.annotators import EMAAnnotators

    params, opt = _optimizer(False)
    ema = EMAAnnotators(params, ["a", "b"], [0.9, 0.5])
    ema.step()
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    shadows = [[s.clone() for s in e.shadow_params] for e in ema.emas]
    skip.ema_step(ema, torch.tensor(True))
    assert all(torch.equal(a, b) for e, sh in zip(ema.emas, shadows) for a, b in zip(e.shadow_params, sh))
    skip.ema_step(ema, torch.tensor(False))
    assert not torch.equal(ema.emas[0].shadow_params[0], shadows[0][0])

    sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=2, num_training_steps=10)
    lrs = []
    for _ in range(4):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    steps = [e.optimization_step for e in ema.emas]
    skip.rewind(2, sched, ema)  # the last two steps were skipped
    assert sched.get_last_lr()[0] == lrs[1] and opt.param_groups[0]["lr"] == lrs[1]
    assert [e.optimization_step for e in ema.emas] == [s - 2 for s in steps]


def test_trainer_counts_and_takes_back_a_nonfinite_step(tmp_path, monkeypatch):
    """One micro-batch's loss is NaN: the run still makes --max_train_steps real steps, logs the skip,
    and its LoRA stays finite."""
    from safetensors.torch import load_file

    from adpo_train.step import StepModels

    real, calls = StepModels.loss, {"n": 0}

    def loss_nan_once(self, x, cfg, ready, backend="auto"):
        out = real(self, x, cfg, ready, backend)
        calls["n"] += 1
        if calls["n"] == 2:
            x["noisy"] = x["noisy"] * float("nan")
            out = real(self, x, cfg, ready, backend)
        return out

    monkeypatch.setattr(StepModels, "loss", loss_nan_once)
    res = train_on_toy_cache(tmp_path, "--max_train_steps", "4", "--logging_steps", "2", "--ema_decays", "0.9",
                             "--ema_warmup_steps", "0")
    assert res["global_step"] == 4
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 4]  # step 2 was taken back and logged again at the next sync
    assert rows[0]["skipped_steps"] == 1 and rows[-1]["skipped_steps_total"] == 1
    assert all(r["loss"] == r["loss"] for r in rows)  # the NaN micro-batch is left out of the averages
    assert calls["n"] == 5
    assert all(torch.isfinite(v).all() for v in load_file(res["lora"]).values())
