"""EMA annotators: the in-place swap gives exactly what a separately held EMA model gives."""
import copy

import pytest
import torch

import adpo_kernels as ak

from .utils import check_close_to_exact


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny UNet runs fastest on one thread, and CI shares 2 cores
    yield
    torch.set_num_threads(n)


def _unet_with_lora():
    from adpo_train import models, toy
    from tests.test_train_fixtures import root

    torch.manual_seed(0)
    unet = toy.build_toy_components(f"{root()}/tok-annotators")["unet"]
    named = models.add_lora(unet, rank=4)
    return unet, named


def test_swapped_annotator_logits_equal_a_separate_ema_model():
    from adpo_train.annotators import EMAAnnotators

    unet, named = _unet_with_lora()
    names, params = [n for n, _ in named], [p for _, p in named]
    decays = [0.9, 0.5]
    ann = EMAAnnotators(params, names, decays)
    # separately held EMA models: full UNet copies whose LoRA weights follow the spec's formula
    separate = [copy.deepcopy(unet) for _ in decays]
    sep_params = [[dict(m.named_parameters())[n] for n in names] for m in separate]
    # the same formula in float64 on the same trajectory: the exact value both fp32 updates round
    exact = [[s.detach().double().clone() for s in ps] for ps in sep_params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 16, 16, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    e = torch.randn(4, 16, 32, generator=g)
    for step in range(1, 6):
        opt.zero_grad()
        unet(x, t, e).sample.square().mean().backward()
        opt.step()
        ann.step()
        with torch.no_grad():
            for d, ps in zip(decays, sep_params):
                tt = step - 1  # EMAModel: the first update copies, then min(decay, (1 + t) / (10 + t))
                decay = 0.0 if tt == 0 else min(d, (1 + tt) / (10 + tt))
                for s, p in zip(ps, params):
                    s.sub_((1 - decay) * (s - p))
            for d, ps in zip(decays, exact):
                tt = step - 1
                decay = 0.0 if tt == 0 else min(d, (1 + tt) / (10 + tt))
                for s, p in zip(ps, params):
                    s.sub_((1 - decay) * (s - p.double()))
    before = [p.detach().clone() for p in params]
    noisy = torch.randn(8, 4, 16, 16, generator=g)
    t2 = torch.randint(0, 1000, (4,), generator=g).repeat(2)
    enc = torch.randn(4, 16, 32, generator=g).repeat(2, 1, 1)
    target = torch.randn(4, 4, 16, 16, generator=g)
    fwd = lambda m: m(noisy, t2, enc).sample  # noqa: E731
    with torch.no_grad():
        unet.disable_adapters()
        ref = fwd(unet)
        unet.enable_adapters()
        swapped = ann.predict(lambda: fwd(unet))
        held = [fwd(m) for m in separate]
        # the exact logits: a float64 UNet holding the float64 EMA weights, on float64 inputs
        held64 = []
        for m, ws in zip(separate, exact):
            m64 = copy.deepcopy(m).double()
            for n, w in zip(names, ws):
                dict(m64.named_parameters())[n].copy_(w)
            held64.append(m64(noisy.double(), t2, enc.double()).sample)
        unet.disable_adapters()
        ref64 = copy.deepcopy(unet).double()(noisy.double(), t2, enc.double()).sample
        unet.enable_adapters()
    for p, b in zip(params, before):
        assert torch.equal(p, b), "the policy's LoRA weights must come back bit for bit"
    for k in range(len(decays)):
        # the spec's formula and EMAModel's foreach arithmetic agree to rounding: the annotator's fp32
        # shadows are at most twice as far from the float64 EMA as the spec's formula run in fp32 ...
        for i, (s, e, x) in enumerate(zip(sep_params[k], ann.emas[k].shadow_params, exact[k])):
            check_close_to_exact(e, s, x, torch.float32, f"annotator {k} shadow {i}")
        z_swap = ak.pair_logits(swapped[k], ref, target)
        z_held = ak.pair_logits(held[k], ref, target)
        z64 = ak.pair_logits(held64[k], ref64, target.double())
        # z is a difference of O(1) MSEs: a different summation order moves it by ulps of the MSEs
        mse = (held64[k] - target.double().repeat(2, 1, 1, 1)).square().mean((1, 2, 3)).max()
        check_close_to_exact(z_swap, z_held, z64, torch.float32, f"annotator {k} logits",
                             sensitivity=torch.finfo(torch.float32).eps * mse)
        assert not torch.equal(swapped[k], fwd(unet).detach()), "annotator differs from the policy"
        # ... and with identical weights, swapping in place is bit-identical to a held copy
        with torch.no_grad():
            for s, e in zip(sep_params[k], ann.emas[k].shadow_params):
                s.copy_(e)
            assert torch.equal(ak.pair_logits(fwd(separate[k]), ref, target), z_swap)


def test_ema_matches_diffusers_emamodel_and_round_trips():
    from diffusers.training_utils import EMAModel

    from adpo_train.annotators import EMAAnnotators

    unet, named = _unet_with_lora()
    names, params = [n for n, _ in named], [p for _, p in named]
    ann = EMAAnnotators(params, names, [0.9999, 0.5])
    ref = EMAModel([p for p in params], decay=0.5, foreach=False)
    exact = [p.detach().double().clone() for p in params]  # EMAModel's schedule and update, in float64
    for step in range(4):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * 0.01)
        ann.step()
        ref.step(params)
        decay = 0.0 if step == 0 else min(0.5, (1 + step) / (10 + step))
        for x, p in zip(exact, params):
            x.sub_((1 - decay) * (x - p.detach().double()))
    for i, (a, b, x) in enumerate(zip(ann.emas[1].shadow_params, ref.shadow_params, exact)):
        check_close_to_exact(a, b, x, torch.float32, f"shadow {i} vs EMAModel")
    state, meta = ann.state_tensors(), ann.state_meta()
    assert meta["optimization_steps"] == [4, 4]
    other = EMAAnnotators(params, names, [0.9999, 0.5])
    other.load(state, meta)
    for e1, e2 in zip(ann.emas, other.emas):
        assert e1.optimization_step == e2.optimization_step
        assert all(torch.equal(a, b) for a, b in zip(e1.shadow_params, e2.shadow_params))
    with pytest.raises(ValueError, match="decays"):
        EMAAnnotators(params, names, [0.9]).load(state, {"decays": [0.9999, 0.5], "optimization_steps": [4, 4]})


def test_ema_update_in_chunks_is_the_same_update(monkeypatch):
    """The EMA update runs in chunks (bounded temporaries): any chunk size gives the same bits, and a
    False ``keep`` leaves every copy exactly as it was."""
    import adpo_train.annotators as A

    results = []
    for chunk in (A.CHUNK_BYTES, 1):  # one chunk; one tensor per chunk
        monkeypatch.setattr(A, "CHUNK_BYTES", chunk)
        unet, named = _unet_with_lora()
        params = [p for _, p in named]
        ann = A.EMAAnnotators(params, [n for n, _ in named], [0.9, 0.5])
        g = torch.Generator().manual_seed(3)
        for _ in range(3):
            with torch.no_grad():
                for p in params:
                    p.add_(0.01 * torch.randn(p.shape, generator=g))
            ann.step()
        before = [s.clone() for e in ann.emas for s in e.shadow_params]
        with torch.no_grad():
            for p in params:
                p.add_(1.0)
        ann.step(torch.tensor(False))
        assert all(torch.equal(a, b) for a, b in zip(before, [s for e in ann.emas for s in e.shadow_params]))
        results.append(before)
        n = len(list(A._chunks(params, params, [True] * len(params))))
        assert n == (1 if chunk > 1 else len(params)), (chunk, n)
    assert all(torch.equal(a, b) for a, b in zip(*results))
