"""Backends as declarations, and the choice among them.

A backend says which devices and dtypes it handles, whether it is usable at all
(``unavailable()``: not built, import failed, no device) and whether it can run a given
call (``unsupported(...)``).  ``backend="auto"`` (or the ``ADPO_BACKEND`` environment
variable) picks the first usable one in :data:`AUTO_ORDER` for the inputs' device; a
forced backend that cannot run raises with its reasons; when nothing can run, the error
lists every backend and why, like xformers' dispatcher.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import _jit, distributed, reference
from .config import AdaptiveDPOConfig
from .output import AdaptiveDPOOutput

AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
HALF_AND_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    description: str

    def unavailable(self) -> list[str]:
        return []

    def supports_device(self, device_type: str) -> bool:
        return device_type in self.devices

    def unsupported(self, device: torch.device, dtype: torch.dtype, num_annotators: int) -> list[str]:
        reasons = []
        if not self.supports_device(device.type):
            reasons.append(f"device {device.type!r} not supported (supports {', '.join(self.devices)})")
        if dtype not in self.dtypes:
            reasons.append(f"dtype {dtype} not supported")
        return reasons

    def forward(self, model_pred, ref_pred, target, annotators, cfg, annotators_ready) -> AdaptiveDPOOutput:
        raise NotImplementedError

    def row_mse(self, pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(2, 2B)`` per-row MSE of ``pred`` and ``ref_pred``, no grad."""
        raise NotImplementedError


@dataclass(frozen=True)
class TorchBackend(Backend):
    def forward(self, model_pred, ref_pred, target, annotators, cfg, annotators_ready):
        return reference.forward(model_pred, ref_pred, target, annotators, cfg, annotators_ready)

    def row_mse(self, pred, ref_pred, target):
        with torch.no_grad():
            return torch.stack([reference.row_mse(pred, target), reference.row_mse(ref_pred, target)])


@dataclass(frozen=True)
class FusedBackend(Backend):
    """A backend that implements the three ``adpo::{name}_*`` ops of ``ops.py``."""

    loader: Callable[[], Optional[str]] = lambda: "no loader"
    interpret_env: Optional[str] = None  # env var that lets this backend run on CPU tensors

    def unavailable(self) -> list[str]:
        return _load(self)

    def supports_device(self, device_type: str) -> bool:
        if device_type == "cpu" and self.interpret_env and os.environ.get(self.interpret_env) == "1":
            return True
        return device_type in self.devices

    def _op(self, stage: str):
        return getattr(torch.ops.adpo, f"{self.name}_{stage}")

    def row_mse(self, pred, ref_pred, target):
        rows = pred.shape[0]
        p, r = (x.detach().reshape(rows, -1).contiguous() for x in (pred, ref_pred))
        t = target.detach().reshape(target.shape[0], -1).contiguous()
        return self._op("mse")(p, r, t, [])

    def forward(self, model_pred, ref_pred, target, annotators, cfg, annotators_ready):
        rows = model_pred.shape[0]
        B = rows // 2
        mp = model_pred.reshape(rows, -1)
        if not mp.is_contiguous():
            mp = mp.contiguous()
        rp = ref_pred.detach().reshape(rows, -1).contiguous()
        t = target.detach().reshape(target.shape[0], -1).contiguous()
        an = [a.detach().reshape(rows, -1).contiguous() for a in annotators]
        mse = self._op("mse")(mp.detach(), rp, t, an)  # (2 + K, 2B)
        mse3, offset = distributed.gather_pairs(mse.view(mse.shape[0], 2, B), cfg.sync_stats)
        fparams, iparams = cfg.op_params(annotators_ready)
        loss, logits, metric, weights, margin, acc, _ = self._op("pairs")(
            mse3.contiguous(), mp, t, offset, B, fparams, iparams)
        return AdaptiveDPOOutput(loss=loss, logits=logits.detach(), metric=metric.detach(),
                                 weights=weights.detach(), margin=margin.detach(),
                                 implicit_acc=acc.detach(), model_mse=mse[0], ref_mse=mse[1])


_LOADED: dict[str, tuple[str, ...]] = {}


def _load_cached(name: str) -> tuple[str, ...]:
    if name not in _LOADED:
        reason = BACKENDS[name].loader()
        _LOADED[name] = (reason,) if reason else ()
    return _LOADED[name]


# torch.compile(fullgraph=True) must not trace the loader (importlib is not traceable):
# treat its result as a constant.  This is what torch.compiler.assume_constant_result sets;
# calling that would import torch._dynamo here, which takes seconds.
_load_cached._dynamo_marked_constant = True


def _load(b: FusedBackend) -> list[str]:
    return list(_load_cached(b.name))


def _import(module: str, what: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # an extension that is missing or fails to load must not break import
        return f"{what} not usable: {type(exc).__name__}: {exc}"
    return None


def _load_triton() -> Optional[str]:
    return _import("adpo_kernels.triton", "Triton kernels")


def _load_cpu() -> Optional[str]:
    # the prebuilt adpo_kernels._C, else a just-in-time build of csrc/ (adpo_kernels/_jit.py)
    return _jit.load_extension("cpu")


def _load_cuda() -> Optional[str]:
    if not torch.cuda.is_available():
        reason = _jit.load_extension("cuda", jit=False)  # a prebuilt one still loads: say so
        built = "not built, " if reason else "built, but "
        return f"adpo_kernels._C_cuda {built}no CUDA device visible (torch.cuda.is_available() is False)"
    return _jit.load_extension("cuda")


BACKENDS: dict[str, Backend] = {
    "cuda": FusedBackend("cuda", ("cuda",), HALF_AND_FLOAT, "hand-written CUDA kernels (csrc/)", _load_cuda),
    "triton": FusedBackend("triton", ("cuda",), HALF_AND_FLOAT, "fused Triton kernels",
                           _load_triton, interpret_env="TRITON_INTERPRET"),
    "cpu": FusedBackend("cpu", ("cpu",), ALL_DTYPES, "fused C++ CPU kernels (csrc/)", _load_cpu),
    "torch": TorchBackend("torch", ("cpu", "cuda"), ALL_DTYPES, "the literal torch reference"),
}


def available_backends(detail: bool = False) -> dict:
    """``{name: []}`` for every usable backend, ``{name: [reasons]}`` for the others.

    ``detail=True`` gives ``{name: {"usable", "origin", "reasons", "how"}}`` instead, where
    ``origin`` says where the backend's code came from: ``"prebuilt"`` (compiled at install
    time), ``"jit-built"`` (compiled now, on first use), ``"jit-cached"`` (compiled on an
    earlier first use, reused), ``"python"`` (torch reference, Triton) or ``"unavailable"``
    (no code: see ``reasons``); a prebuilt CUDA module without a GPU is ``"prebuilt"`` and
    not usable.  ``how`` is one line with paths and timings (``python -m adpo_kernels.info``).
    """
    reasons = {name: b.unavailable() for name, b in BACKENDS.items()}
    if not detail:
        return reasons
    out = {}
    for name, why in reasons.items():
        origin = _jit.STATUS.get(name, {}).get("origin")  # set for cpu and cuda by their loaders
        if origin is not None and origin != "unavailable":
            how = _jit.describe(name)
        elif why:
            origin, how = "unavailable", "; ".join(why)
        else:
            origin, how = "python", BACKENDS[name].description
        out[name] = {"usable": not why, "origin": origin, "reasons": why, "how": how}
    return out


def select(backend: str, device: torch.device, dtype: torch.dtype, num_annotators: int) -> Backend:
    """The backend that will run a call (see the module docstring)."""
    name = backend
    if name == "auto":
        name = os.environ.get("ADPO_BACKEND", "auto") or "auto"
    if name != "auto" and name not in BACKENDS:
        src = "backend" if backend != "auto" else "ADPO_BACKEND"
        raise ValueError(f"{src}: expected 'auto' or one of {sorted(BACKENDS)}, got {name!r}")
    if name != "auto":
        b = BACKENDS[name]
        reasons = b.unavailable() or b.unsupported(device, dtype, num_annotators)
        if reasons:
            raise NotImplementedError(f"backend {name!r} cannot run this call: " + "; ".join(reasons))
        return b
    tried = []
    order = AUTO_ORDER.get(device.type, ("torch",))
    for candidate in order:
        b = BACKENDS[candidate]
        reasons = b.unavailable() or b.unsupported(device, dtype, num_annotators)
        if not reasons:
            return b
        tried.append(f"  {candidate}: " + "; ".join(reasons))
    for name, b in BACKENDS.items():  # the error lists every backend, not only those tried
        if name not in order:
            tried.append(f"  {name}: " + "; ".join(b.unavailable() or b.unsupported(device, dtype, num_annotators)))
    raise NotImplementedError(f"no backend can run a call on {device} with dtype {dtype}:\n" + "\n".join(tried))
