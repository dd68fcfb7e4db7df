"""The label-flip experiment (adpo_train/experiments/label_flip.py).

One ``--quick`` run with its fixed seed (25-45 s on a 2-core CPU, all five methods), then
checks of properties its own output must have; no result is hard-coded.
"""
import csv
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from adpo_train.experiments import label_flip as lf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("label_flip_quick"))
    assert lf.main(["--quick", "--out", out]) == 0
    with open(os.path.join(out, "runs.csv")) as f:
        runs = list(csv.DictReader(f))
    with open(os.path.join(out, "summary.csv")) as f:
        summary = list(csv.DictReader(f))
    return out, runs, summary


def _run(runs, method, rate):
    sel = [r for r in runs if r["method"] == method and float(r["flip_rate"]) == rate]
    assert len(sel) == len(lf.Settings.quick().seeds), (method, rate, sel)
    return sel[0]


def test_every_method_and_flip_rate_has_a_row(quick):
    out, runs, summary = quick
    s = lf.Settings.quick()
    want = set(itertools.product(lf.METHODS, s.flip_rates))
    assert {(r["method"], float(r["flip_rate"])) for r in runs} == want
    assert {(r["method"], float(r["flip_rate"])) for r in summary} == want
    table = open(os.path.join(out, "table.md")).read()
    for method, rate in want:
        assert f"| {rate:.0%} | {method} |" in table
    for name in ("flip_fraction.png", "reward_curves.png"):
        assert 1000 < os.path.getsize(os.path.join(out, name)) < 200_000, name
    info = json.load(open(os.path.join(out, "run_info.json")))
    assert info["settings"]["seeds"] == list(s.seeds) and "--quick" in info["command"]
    for r in runs:
        assert np.isfinite(float(r["gain"])), r


def test_metric_finds_flipped_pairs_above_chance(quick):
    _, runs, _ = quick
    for rate in (0.2, 0.3):
        r = _run(runs, "adaptive", rate)
        # chance is AUROC 0.5 and AP = the flip rate
        assert float(r["metric_auroc"]) > 0.6, r
        assert float(r["metric_ap"]) > rate + 0.1, r
        # ... and the loss acts on it: flipped pairs get smaller weights on average
        assert float(r["weight_ratio"]) < 0.9, r
    for rate in (0.1, 0.2, 0.3):
        # one annotator: the paper's metric with K = 1, as selective as K = 2
        r = _run(runs, "adaptive-k1", rate)
        assert float(r["metric_auroc"]) > 0.6 and float(r["weight_ratio"]) < 0.9, r
        # no annotator: m = 1 - sigmoid(rho0 z) is decreasing in z, so it ranks pairs exactly like -z
        # (up to ties where the float32 sigmoid saturates)
        r = _run(runs, "adaptive-k0", rate)
        assert abs(float(r["metric_auroc"]) - float(r["logit_auroc"])) < 0.005, r
        assert float(r["metric_auroc"]) > 0.6, r
    for method in ("dpo", "robust"):  # the shadow metric, computed on the side
        assert float(_run(runs, method, 0.2)["metric_auroc"]) > 0.55
    for method in lf.METHODS:  # no flipped pair, nothing to detect
        assert _run(runs, method, 0.0)["metric_auroc"] == "nan"


def test_fine_tuning_on_clean_labels_raises_the_true_reward(quick):
    _, runs, _ = quick
    # adaptive-k0 is left out: over the full grid's 600 steps it diverges on clean labels
    # (docs/method-study.md); that it has not yet at 300 steps is no property worth pinning
    for method in ("dpo", "robust", "adaptive", "adaptive-k1"):
        assert float(_run(runs, method, 0.0)["gain"]) > 0.2, method
    # robust-DPO with label smoothing 0 is DPO: the same run, bit for bit
    assert _run(runs, "robust", 0.0)["gain"] == _run(runs, "dpo", 0.0)["gain"]


def test_flips_hurt_plain_dpo(quick):
    _, runs, _ = quick
    gains = [float(_run(runs, "dpo", rate)["gain"]) for rate in (0.0, 0.3)]
    assert gains[1] < gains[0]


def _auroc_pairs(scores, labels):
    pos, neg = scores[labels], scores[~labels]
    d = pos[:, None] - neg[None, :]
    return float(((d > 0) + 0.5 * (d == 0)).mean())


def _ap_by_rank(scores, labels):
    order = np.argsort(-scores)
    y = labels[order]
    hits = np.cumsum(y)
    return float(np.mean(hits[y] / (np.nonzero(y)[0] + 1)))


def test_auroc_and_average_precision_match_their_definitions():
    rng = np.random.default_rng(0)
    for n in (2, 7, 50, 301):
        labels = rng.random(n) < 0.3
        labels[0], labels[-1] = True, False
        tied = rng.integers(0, 4, n).astype(float)  # many ties
        distinct = rng.standard_normal(n) + labels
        for scores in (tied, distinct):
            assert lf.auroc(scores, labels) == pytest.approx(_auroc_pairs(scores, labels), abs=1e-12)
        assert lf.average_precision(distinct, labels) == pytest.approx(_ap_by_rank(distinct, labels), abs=1e-12)
    y = np.array([True, False, True, False])
    assert lf.auroc(np.array([4.0, 3, 2, 1]), y) == 0.75
    assert lf.average_precision(np.array([4.0, 3, 2, 1]), y) == pytest.approx((1 + 2 / 3) / 2)
    assert lf.average_precision(np.ones(4), y) == 0.5  # one tie group: precision = prevalence
    assert np.isnan(lf.auroc(np.ones(3), np.zeros(3, bool)))


def test_ema_follows_the_diffusers_schedule():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = lf.EMA(model, decay=0.5)
    values = []
    for w in (2.0, 3.0, 4.0):
        with torch.no_grad():
            model.weight.fill_(w)
        ema.update(model)
        values.append(ema.model.weight.item())
    d1 = min(0.5, 2 / 11)  # second update: s = 1
    d2 = min(0.5, 3 / 12)
    assert values[0] == 2.0  # the first update copies
    assert values[1] == pytest.approx(d1 * 2.0 + (1 - d1) * 3.0)
    assert values[2] == pytest.approx(d2 * values[1] + (1 - d2) * 4.0)


def test_module_runs_as_a_script():
    r = subprocess.run([sys.executable, "-m", "adpo_train.experiments.label_flip", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--quick" in r.stdout


def _mlp_forward_flops(rows: int) -> int:
    model = lf.EpsMLP(lf.Settings.quick().timesteps, lf.Settings.quick().hidden)
    return sum(2 * rows * m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_flops_per_step_count_one_forward_per_annotator(quick):
    """Toy: annotator k costs one forward of the MLP on the 2B rows; nothing else differs from DPO."""
    _, runs, summary = quick
    s = lf.Settings.quick()
    fwd = _mlp_forward_flops(2 * s.batch)
    flops = {m: int(float(_run(runs, m, 0.2)["flops"])) for m in lf.METHODS}
    for m in lf.METHODS:
        assert flops[m] == flops["dpo"] + len(lf.ANNOTATORS[m]) * fwd, (m, flops)
    # policy forward + backward + reference forward: between 3 and 4 forwards (no input grad at layer 1)
    assert 3 * fwd < flops["dpo"] < 4 * fwd
    by = {(r["method"], float(r["flip_rate"])): r for r in summary}
    ratio = flops["adaptive"] / flops["dpo"]
    assert float(by[("adaptive", 0.2)]["flops_vs_dpo"]) == pytest.approx(ratio, rel=1e-5)  # 6 digits in the CSV


def test_unet_flops_count_one_unet_forward_per_annotator(quick):
    """Trainer step on the LoRA UNet: annotator k adds exactly one no-grad UNet forward."""
    from torch.utils.flop_counter import FlopCounterMode

    from adpo_train.experiments import cost
    from adpo_train.models import build_unet, text_shape

    _, _, summary = quick
    unet = {r["method"]: int(float(r["unet_flops"])) for r in summary if float(r["flip_rate"]) == 0.0}
    model = build_unet(cost.UNET_SPEC["unet"])
    n = 2 * cost.UNET_SPEC["pairs"]
    tokens, width, _ = text_shape(cost.UNET_SPEC["unet"])
    ss, c = model.config.sample_size, model.config.in_channels
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.randn(n, c, ss, ss), torch.zeros(n, dtype=torch.long), torch.randn(n, tokens, width))
    fwd = fc.get_total_flops()
    for m in lf.METHODS:
        k = len(lf.ANNOTATORS[m])
        # LoRA r4 adds a few matmuls to each annotator's forward: within 2% of the bare UNet's
        assert unet[m] - unet["dpo"] == pytest.approx(k * fwd, rel=0.02), (m, unet, fwd)
    # the policy's backward runs through the frozen UNet (input grads) but computes weight grads for
    # LoRA only, so DPO is well under the 4 forwards of a full fine-tune
    assert 2.5 * fwd < unet["dpo"] < 3.6 * fwd


def test_rho0_matches_the_papers_scale_on_the_clean_logits():
    B = 4
    # per-batch RMS 1, 2 and 4: median 2, so rho0 * rms = 15 / sqrt(16)
    z = np.concatenate([np.full(B, 1.0), np.full(B, -2.0), np.array([4.0, -4.0, 4.0, -4.0])])
    assert lf.rho0_from_clean(z, B) == pytest.approx(3.75 / 2.0)
    s = lf.Settings.quick()
    with pytest.raises(ValueError, match="rho0"):
        lf.loss_config("adaptive-k0", s, 0.0)
    cfg = lf.loss_config("adaptive-k0", s, 0.0, rho0=2.5)
    assert cfg.adaptive and cfg.rho == 2.5 and lf.ANNOTATORS["adaptive-k0"] == ()
