"""Fused Triton kernels of the Adaptive-DPO loss, registered as the ``adpo::triton_*`` ops.

Importing this package registers the implementations of the three ops whose schemas,
fake (meta) implementations and autograd formula live in :mod:`adpo_kernels.ops`:

* ``adpo::triton_mse``       -> :func:`.mse.row_mse`      (one pass over every input)
* ``adpo::triton_pairs``     -> :func:`.pairs.pairs_forward`  (one small launch)
* ``adpo::triton_pairs_bwd`` -> :func:`.backward.pairs_backward` (one pass)

for the ``cuda`` dispatch key (native) and the ``cpu`` key (Triton interpreter, only when
``TRITON_INTERPRET=1`` was set before triton was imported).  The ops are opaque to
``torch.compile``, which traces them through their fake implementations.  Design notes:
docs/triton.md.
"""
from __future__ import annotations

import torch

from .. import ops as _ops  # noqa: F401  (defines the op schemas)
from .backward import pairs_backward
from .mse import row_mse
from .pairs import pairs_forward

_DEVICES = ("cpu", "cuda")


def _mse_impl(model_pred, ref_pred, target, annotators):
    return row_mse(model_pred, ref_pred, target, annotators)


def _pairs_impl(mse, model_pred, target, offset, num_pairs, fparams, iparams):
    return pairs_forward(mse, model_pred, target, offset, num_pairs, fparams, iparams)


def _pairs_bwd_impl(grad_loss, grad_coef, model_pred, target):
    return pairs_backward(grad_loss, grad_coef, model_pred, target)


torch.library.register_kernel("adpo::triton_mse", _DEVICES, _mse_impl)
torch.library.register_kernel("adpo::triton_pairs", _DEVICES, _pairs_impl)
torch.library.register_kernel("adpo::triton_pairs_bwd", _DEVICES, _pairs_bwd_impl)

__all__ = ["row_mse", "pairs_forward", "pairs_backward"]
