"""Issue 6: the compiled UNet never recompiles in steady state, although every step disables
the adapters for the reference, swaps EMA weights in place for the annotators (or routes
rows to EMA adapters in one mixed batch) and runs the policy with grad.

Dynamo's guards (and so its recompiles) do not depend on the backend; ``aot_eager`` traces
the same graphs (forward and backward through AOTAutograd) without inductor's code
generation, which keeps this test to seconds on a 2-core CPU.  The trainer uses inductor.
"""
import pytest
import torch

from tests.test_train_fixtures import root  # noqa: F401  (skips without diffusers/peft/accelerate)


@pytest.mark.parametrize("mode", ["swap", "mixed"])
def test_compiled_unet_no_recompiles_when_toggling_adapters_and_ema(mode):
    import torch._dynamo
    from diffusers import DDPMScheduler
    from torch._dynamo.utils import counters

    import adpo_kernels as ak
    from adpo_train.annotators import EMAAnnotators, MixedBatchAnnotators
    from adpo_train.data import SyntheticPairDataset, collate_cached
    from adpo_train.models import add_lora, build_unet
    from adpo_train.step import StepModels, compile_unet, step_inputs

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    unet = build_unet("tiny")
    named = add_lora(unet, 4)
    names, params = [n for n, _ in named], [p for _, p in named]
    ann = (MixedBatchAnnotators(unet, params, names, [0.9, 0.5]) if mode == "mixed"
           else EMAAnnotators(params, names, [0.9, 0.5]))
    eager = StepModels(unet, unet, None, ann)
    data = SyntheticPairDataset(8, (4, 16, 16), (16, 32), seed=1)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012)
    gen = torch.Generator().manual_seed(0)
    cfg = ak.AdaptiveDPOConfig(beta=500.0, rho=15.0, logits_normalize=True, margin_type="quadratic")
    opt = torch.optim.AdamW(params, lr=1e-2)
    x0 = step_inputs(collate_cached([data[i] for i in range(2)]), sched, gen, "cpu", torch.float32)
    want = eager.loss(x0, cfg, ready=True).loss.detach()

    compile_unet(unet, backend="aot_eager")
    models = StepModels(unet, unet, None, ann)
    got = models.loss(x0, cfg, ready=True).loss.detach()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    def step(i):
        x = step_inputs(collate_cached([data[j] for j in (2 * i % 8, (2 * i + 1) % 8)]), sched, gen, "cpu",
                        torch.float32)
        out = models.loss(x, cfg, ready=True)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ann.step()  # EMA weights change in place between steps

    step(0)  # warm-up: one graph per state (policy with grad, reference, annotators)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(1, 4):
            step(i)
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])
    torch._dynamo.reset()
