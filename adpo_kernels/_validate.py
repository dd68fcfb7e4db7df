"""One validation layer for every backend: bad input fails here with a message that
names the argument, what was expected and what was given."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .config import AdaptiveDPOConfig

SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

Annotators = Optional[Union[torch.Tensor, Sequence[torch.Tensor]]]


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_pred(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: expected dtype float64, float32, bfloat16 or float16, got {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"{name}: expected shape (2B, *S) with rows [winners; losers], got a 0-d tensor")
    if t.shape[0] == 0:
        raise ValueError(f"{name}: empty batch (first dimension is 0); expected 2B > 0 rows")
    if t.shape[0] % 2:
        raise ValueError(f"{name}: first dimension must be 2B (rows [winners; losers]), "
                         f"got {t.shape[0]}, which is odd")
    if t.numel() == 0:
        raise ValueError(f"{name}: per-row size N = prod(S) must be > 0, got shape {tuple(t.shape)}")


def _check_like(name: str, t, model_pred: torch.Tensor, shape) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device != model_pred.device:
        raise ValueError(f"{name}: expected device {model_pred.device} (that of model_pred), got {t.device}")
    if t.dtype != model_pred.dtype:
        raise TypeError(f"{name}: expected dtype {model_pred.dtype} (that of model_pred), got {t.dtype}; "
                        f"cast it with .to(model_pred.dtype)")
    if tuple(t.shape) not in [tuple(s) for s in shape]:
        want = " or ".join(str(tuple(s)) for s in shape)
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")


def check_inputs(model_pred, ref_pred, target, annotator_preds: Annotators = None) -> list[torch.Tensor]:
    """Validate the loss inputs; returns the annotators as a list of ``(2B, *S)`` tensors."""
    check_pred("model_pred", model_pred)
    full = tuple(model_pred.shape)
    B = full[0] // 2
    shared = (B,) + full[1:]
    _check_like("ref_pred", ref_pred, model_pred, [full])
    _check_like("target", target, model_pred, [full, shared])
    if annotator_preds is None:
        return []
    if isinstance(annotator_preds, torch.Tensor):
        if annotator_preds.dim() != model_pred.dim() + 1:
            raise ValueError(f"annotator_preds: expected a (K, 2B, *S) = (K,) + {full} tensor or a sequence "
                             f"of K tensors of shape {full}, got a tensor of shape {tuple(annotator_preds.shape)}")
        _check_like("annotator_preds", annotator_preds, model_pred, [(annotator_preds.shape[0],) + full])
        return list(annotator_preds.unbind(0))
    if not isinstance(annotator_preds, (list, tuple)):
        raise TypeError(f"annotator_preds: expected None, a tensor or a list/tuple of tensors, "
                        f"got {type(annotator_preds).__name__}")
    out = list(annotator_preds)
    for k, a in enumerate(out):
        _check_like(f"annotator_preds[{k}]", a, model_pred, [full])
    return out


def check_call(config, annotators_ready, backend) -> None:
    if not isinstance(config, AdaptiveDPOConfig):
        raise TypeError(f"config: expected an AdaptiveDPOConfig, got {type(config).__name__}")
    if not isinstance(annotators_ready, bool):
        raise TypeError(f"annotators_ready: expected a bool, got {annotators_ready!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, got {type(backend).__name__}")
