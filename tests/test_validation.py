"""Bad input fails early with a message naming the argument; config errors likewise."""
import pytest
import torch

import adpo_kernels as ak
from adpo_kernels import AdaptiveDPOConfig

from .utils import make_inputs


def _inputs():
    model, ref, target, annots = make_inputs(3, (4, 5), torch.float32, K=2)
    return model, ref, target, annots


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("case,exc,match", [
    ("odd", ValueError, r"model_pred: first dimension must be 2B .* got 5, which is odd"),
    ("empty", ValueError, r"model_pred: empty batch"),
    ("zero_n", ValueError, r"model_pred: per-row size N"),
    ("ref_shape", ValueError, r"ref_pred: expected shape \(6, 4, 5\), got \(6, 5, 4\)"),
    ("ref_dtype", TypeError, r"ref_pred: expected dtype torch.float32 .* got torch.float64"),
    ("target_shape", ValueError, r"target: expected shape \(6, 4, 5\) or \(3, 4, 5\), got \(2, 4, 5\)"),
    ("target_dtype", TypeError, r"target: expected dtype torch.float32"),
    ("annot_shape", ValueError, r"annotator_preds\[1\]: expected shape \(6, 4, 5\)"),
    ("annot_stack", ValueError, r"annotator_preds: expected shape \(2, 6, 4, 5\)"),
    ("annot_plain", ValueError, r"annotator_preds: expected a \(K, 2B, \*S\)"),
    ("annot_type", TypeError, r"annotator_preds: expected None, a tensor or a list/tuple"),
    ("int_dtype", TypeError, r"model_pred: expected dtype float64, float32, bfloat16 or float16, got torch.int64"),
    ("not_tensor", TypeError, r"model_pred: expected a torch.Tensor, got list"),
    ("scalar", ValueError, r"model_pred: expected shape \(2B, \*S\)"),
    ("config", TypeError, r"config: expected an AdaptiveDPOConfig, got dict"),
    ("ready", TypeError, r"annotators_ready: expected a bool"),
])
def test_bad_inputs(case, exc, match, backend):
    model, ref, target, annots = _inputs()
    kw = dict(annotator_preds=annots, config=AdaptiveDPOConfig(), backend=backend)
    if case == "odd":
        model, ref, target = model[:5], ref[:5], target
    elif case == "empty":
        model, ref, target = model[:0], ref[:0], target[:0]
    elif case == "zero_n":
        model, ref, target = model[:, :0], ref[:, :0], target[:, :0]
    elif case == "ref_shape":
        ref = ref.transpose(1, 2)
    elif case == "ref_dtype":
        ref = ref.double()
    elif case == "target_shape":
        target = target[:2]
    elif case == "target_dtype":
        target = target.half()
    elif case == "annot_shape":
        kw["annotator_preds"] = [annots[0], annots[1][:, :3]]
    elif case == "annot_stack":
        kw["annotator_preds"] = torch.stack(annots)[:, :, :3]
    elif case == "annot_plain":
        kw["annotator_preds"] = annots[0]
    elif case == "annot_type":
        kw["annotator_preds"] = {"a": annots[0]}
    elif case == "int_dtype":
        model = model.detach().long()
    elif case == "not_tensor":
        model = [1.0, 2.0]
    elif case == "scalar":
        model = torch.tensor(1.0)
    elif case == "config":
        kw["config"] = {"beta": 1.0}
    elif case == "ready":
        kw["annotators_ready"] = 1
    with pytest.raises(exc, match=match):
        ak.adaptive_dpo_loss(model, ref, target, **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a CUDA device")
def test_device_mismatch():
    model, ref, target, _ = _inputs()
    with pytest.raises(ValueError, match=r"ref_pred: expected device cpu"):
        ak.adaptive_dpo_loss(model, ref.cuda(), target)


def test_device_mismatch_meta():
    """Device mismatch, checked with the meta device so it also runs without a GPU."""
    model, ref, target, _ = _inputs()
    with pytest.raises(ValueError, match=r"target: expected device cpu \(that of model_pred\), got meta"):
        ak.adaptive_dpo_loss(model, ref, target.to("meta"))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(beta=0.0), ValueError, r"AdaptiveDPOConfig.beta: expected a finite value > 0, got 0.0"),
    (dict(beta=-1.0), ValueError, r"beta"),
    (dict(beta=float("inf")), ValueError, r"beta"),
    (dict(rho=0), ValueError, r"AdaptiveDPOConfig.rho"),
    (dict(tau=-2.0), ValueError, r"AdaptiveDPOConfig.tau"),
    (dict(intercept=0.0), ValueError, r"AdaptiveDPOConfig.intercept"),
    (dict(beta_ipo=0.0), ValueError, r"AdaptiveDPOConfig.beta_ipo"),
    (dict(beta="1"), TypeError, r"AdaptiveDPOConfig.beta: expected a number"),
    (dict(loss_type="kto"), ValueError, r"AdaptiveDPOConfig.loss_type: expected one of"),
    (dict(weight_type="cubic"), ValueError, r"AdaptiveDPOConfig.weight_type"),
    (dict(margin_type="none"), ValueError, r"AdaptiveDPOConfig.margin_type"),
    (dict(label_smoothing=0.5), ValueError, r"AdaptiveDPOConfig.label_smoothing"),
    (dict(flip_ratio=1.5), ValueError, r"AdaptiveDPOConfig.flip_ratio"),
    (dict(flip_threshold=float("nan")), ValueError, r"AdaptiveDPOConfig.flip_threshold"),
    (dict(adaptive=1), TypeError, r"AdaptiveDPOConfig.adaptive: expected a bool"),
])
def test_bad_config(kw, exc, match):
    with pytest.raises(exc, match=match):
        AdaptiveDPOConfig(**kw)


def test_module_validates_config_at_construction():
    with pytest.raises(ValueError, match="loss_type"):
        ak.AdaptiveDPOLoss(loss_type="nope")
    with pytest.raises(ValueError, match="backend"):
        ak.AdaptiveDPOLoss(backend="fortran")
    with pytest.raises(TypeError, match="either config or keyword options"):
        ak.AdaptiveDPOLoss(AdaptiveDPOConfig(), beta=1.0)


def test_ref_pred_requiring_grad_is_a_constant():
    model, ref, target, _ = _inputs()
    ref.requires_grad_(True)
    out = ak.adaptive_dpo_loss(model, ref, target, backend="torch")
    out.loss.backward()
    assert ref.grad is None and model.grad is not None
