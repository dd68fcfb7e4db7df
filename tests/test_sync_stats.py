"""sync_stats: P processes with B/P pairs each reproduce one process with B pairs."""
import pytest
import torch

import adpo_kernels as ak

from bench.launch import torchrun

from .dist_worker import CONFIGS, local_slice
from .utils import assert_close, make_inputs


def _torchrun(tmp_path, splits):
    torchrun(["-m", "tests.dist_worker", str(tmp_path), splits], tmp_path / "logs", timeout=300)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("splits", ["3,3", "4,2"])
def test_two_process_gloo_matches_single_process(tmp_path, splits):
    ranks = _torchrun(tmp_path, splits)
    B = sum(int(s) for s in splits.split(","))
    equal = len(set(splits.split(","))) == 1
    for (name, backend) in ranks[0]["results"]:
        cfg = CONFIGS[name]
        model, ref, target, annots = make_inputs(B, (3, 8, 8), torch.float32, K=2, seed=42)
        full = ak.adaptive_dpo_loss(model, ref, target, annots, config=cfg, backend=backend)
        full.loss.backward()
        weighted_loss = 0.0
        for r in ranks:
            got, lo, hi = r["results"][(name, backend)], r["lo"], r["hi"]
            tag = f"{name}/{backend}/rank{lo}:{hi}"
            for f in ("metric", "weights", "margin"):
                assert_close(got[f], getattr(full, f)[lo:hi], 1e-6, 1e-5, f"{tag} {f}")
            # The local loss is a mean over local pairs: scale the gradient back to the global mean.
            scale = (hi - lo) / B
            assert_close(got["grad"] * scale, local_slice(model.grad, lo, hi, B), 1e-9, 1e-4, f"{tag} grad")
            weighted_loss = weighted_loss + got["loss"] * scale
        assert_close(weighted_loss, full.loss.detach(), 1e-7, 1e-5, f"{name}/{backend} loss")
        if equal:  # DDP's gradient averaging over equal shares gives the global mean exactly
            mean_loss = sum(r["results"][(name, backend)]["loss"] for r in ranks) / 2
            assert_close(mean_loss, full.loss.detach(), 1e-7, 1e-5, f"{name}/{backend} mean loss")


def test_sync_stats_without_process_group_is_local():
    model, ref, target, annots = make_inputs(4, (6,), torch.float64, K=2, seed=1)
    cfg = CONFIGS["all-opts"]
    a = ak.adaptive_dpo_loss(model, ref, target, annots, config=cfg, backend="torch")
    b = ak.adaptive_dpo_loss(model, ref, target, annots, config=cfg.replace(sync_stats=True), backend="torch")
    assert torch.equal(a.loss, b.loss) and torch.equal(a.metric, b.metric)
