"""EMA annotators over the LoRA parameters, evaluated by swapping weights in place.

The Adaptive-DPO reference script keeps EMA copies of the trainable weights (decays
0.9999 and 0.5) and evaluates them on the policy's noisy inputs (spec section 9).
Only the LoRA parameters differ between the policy and its EMA copies, so the EMA of
the LoRA parameters alone is exact.  Each annotator is a diffusers ``EMAModel`` over
those parameters (its decay schedule: ``min(decay, (1 + t) / (10 + t))``, the first
update copies).  To evaluate annotator k, the live LoRA parameters are saved into one
preallocated backup, overwritten with the EMA shadow, the UNet runs under no_grad,
and the backup is copied back: no extra UNet exists, and the policy's weights return
bit for bit.  Annotator forwards must run before the policy's grad-enabled forward
(the in-place swap would otherwise invalidate tensors saved for backward).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch


class EMAWeights:
    """K EMA copies of ``params`` (diffusers ``EMAModel`` semantics), with their checkpoint form."""

    def __init__(self, params: Sequence[torch.nn.Parameter], names: Sequence[str], decays: Sequence[float]):
        from diffusers.training_utils import EMAModel

        self.params = list(params)
        self.names = list(names)
        self.decays = [float(d) for d in decays]
        self.trainable = [p.requires_grad for p in self.params]
        # under FSDP each shadow is a copy of this rank's shard only (fsdp.local): no gather, ever
        self.emas = [EMAModel(self.local(), decay=d, min_decay=0.0, update_after_step=0, use_ema_warmup=False,
                              foreach=True) for d in self.decays]

    def local(self) -> list[torch.Tensor]:
        """The live parameters (this rank's shards under FSDP), detached views of their storage."""
        from .fsdp import local

        return [local(p) for p in self.params]

    @torch.no_grad()
    def step(self, keep: Optional[torch.Tensor] = None) -> None:
        """One EMA update of every copy from the current parameters (after an optimiser step), with
        ``EMAModel``'s decay schedule and step count.  ``keep``: a 0-d bool tensor on the device; where
        it is False the copies stay exactly as they are (``s + 0 * (p - s)``), without a host sync.

        The update ``s += (1 - decay) * keep * (p - s)`` runs in chunks of about :data:`CHUNK_BYTES`, so
        its temporaries stay that small (``EMAModel``'s foreach update allocates a whole extra copy)."""
        live = self.local()
        keep = torch.ones((), dtype=torch.bool, device=live[0].device) if keep is None and live else keep
        for ema in self.emas:
            ema.optimization_step += 1
            decay = ema.get_decay(ema.optimization_step)
            ema.cur_decay_value = decay
            for shadows, params, trainable in _chunks(ema.shadow_params, live, self.trainable):
                if not trainable:  # EMAModel copies what is not trained
                    torch._foreach_copy_(shadows, [torch.where(keep, p, s) for s, p in zip(shadows, params)])
                    continue
                weight = keep.to(shadows[0].dtype) * (1.0 - decay)
                diff = torch._foreach_sub(params, shadows)
                torch._foreach_mul_(diff, weight)
                torch._foreach_add_(shadows, diff)

    # -- checkpointing (safetensors tensors + JSON scalars) ---------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"ema{k}.{name}": s.detach().contiguous().cpu()  # this rank's shards under FSDP
                for k, ema in enumerate(self.emas) for name, s in zip(self.names, ema.shadow_params)}

    def state_meta(self) -> dict:
        return {"decays": self.decays, "optimization_steps": [e.optimization_step for e in self.emas]}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.load_meta(meta)
        for k, ema in enumerate(self.emas):
            for name, s in zip(self.names, ema.shadow_params):
                s.copy_(tensors[f"ema{k}.{name}"])

    def load_meta(self, meta: dict) -> None:
        """The decays (checked) and the EMA step counts of a checkpoint (FSDP: the shards come from DCP)."""
        if [float(d) for d in meta["decays"]] != self.decays:
            raise ValueError(f"checkpoint EMA decays {meta['decays']} differ from --ema_decays {self.decays}")
        for k, ema in enumerate(self.emas):
            ema.optimization_step = int(meta["optimization_steps"][k])


CHUNK_BYTES = 64 << 20  # the EMA update's temporaries, at most (one tensor may exceed it)


def _chunks(shadows, params, trainable):
    """``(shadows, params, trainable)`` in runs of one trainable flag, of about CHUNK_BYTES each."""
    run_s, run_p, size, flag = [], [], 0, None
    for s, p, t in zip(shadows, params, trainable):
        if run_s and (t != flag or size >= CHUNK_BYTES):
            yield run_s, run_p, flag
            run_s, run_p, size = [], [], 0
        run_s.append(s)
        run_p.append(p)
        size, flag = size + s.numel() * s.element_size(), t
    if run_s:
        yield run_s, run_p, flag


class Annotators:
    """The interface the training step uses: EMA weights (:class:`EMAWeights`, held, not inherited)
    and one way to evaluate them, :meth:`predict_with_reference`.  Two strategies:
    :class:`EMAAnnotators` (swap the weights in place) and :class:`MixedBatchAnnotators` (one
    mixed-adapter forward)."""

    def __init__(self, weights: EMAWeights):
        self.weights = weights

    params = property(lambda self: self.weights.params)
    names = property(lambda self: self.weights.names)
    decays = property(lambda self: self.weights.decays)
    emas = property(lambda self: self.weights.emas)

    def __len__(self) -> int:
        return len(self.weights.emas)

    def step(self, keep: Optional[torch.Tensor] = None) -> None:
        self.weights.step(keep)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.weights.state_tensors()

    def state_meta(self) -> dict:
        return self.weights.state_meta()

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.weights.load(tensors, meta)

    def predict_with_reference(self, forward: Callable[..., torch.Tensor], reference: Callable[[], torch.Tensor],
                               rows: int, *inputs):
        """``(reference prediction, [annotator k's prediction])``, all under no_grad: ``forward(*inputs)``
        runs the UNet, ``reference()`` gives the reference prediction, ``rows``: rows of ``inputs``."""
        raise NotImplementedError


class EMAAnnotators(Annotators):
    """Evaluated by swapping each EMA copy into the live parameters in place."""

    def __init__(self, params: Sequence[torch.nn.Parameter], names: Sequence[str], decays: Sequence[float],
                 after_swap: Optional[Callable[[], None]] = None):
        """``after_swap``: called after every copy into the live parameters (under FSDP:
        :func:`adpo_train.fsdp.reshard`, so that the next forward gathers the copied shards)."""
        super().__init__(EMAWeights(params, names, decays))
        self._backup = [t.clone() for t in self.weights.local()] if self.decays else []
        self._after_swap = after_swap or (lambda: None)

    @contextlib.contextmanager
    def swapped(self, k: int):
        """Within the block the live parameters hold annotator ``k``'s EMA weights."""
        live = self.weights.local()
        with torch.no_grad():
            torch._foreach_copy_(self._backup, live)
            torch._foreach_copy_(live, self.emas[k].shadow_params)
        self._after_swap()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, self._backup)
            self._after_swap()

    @torch.no_grad()
    def predict(self, forward: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
        """``[forward() under annotator k for k in range(K)]``, all under no_grad."""
        preds = []
        for k in range(len(self.emas)):
            with self.swapped(k):
                preds.append(forward())
        return preds

    @torch.no_grad()
    def predict_with_reference(self, forward, reference, rows, *inputs):
        ref = reference()
        return ref, self.predict(lambda: forward(*inputs))


class MixedBatchAnnotators(Annotators):
    """The EMA annotators held as extra (frozen) peft LoRA adapters of the UNet, so that the
    reference and every annotator run as ONE no-grad forward over ``(1 + K) * 2B`` rows with
    per-row adapter selection (peft's mixed-batch LoRA forward: the base layer runs once over all
    rows, each adapter's low-rank update only over its rows; ``"__base__"`` rows get none, which
    is the reference).  The ``EMAModel`` shadows *are* the adapter weights (updated in place),
    so nothing is swapped and no backup is kept.

    ``adapter_names`` is routed to the LoRA layers by forward pre-hooks registered once; they read
    :attr:`names_now` (``None`` outside :meth:`predict_with_reference`), so a compiled UNet sees two
    stable states and never recompiles per step.  LoRA mode only (a full fine-tune has no adapters).
    """

    PREFIX = "adpo_ema"

    def __init__(self, unet, params, names, decays):
        import copy

        from peft.tuners.lora import LoraLayer

        super().__init__(EMAWeights(params, names, decays))
        cfg = unet.peft_config["default"]
        self.adapter_names = [f"{self.PREFIX}{k}" for k in range(len(self.decays))]
        import warnings

        for name in self.adapter_names:
            with warnings.catch_warnings():  # peft warns that a second adapter is being added: intended
                warnings.simplefilter("ignore", UserWarning)
                unet.add_adapter(copy.deepcopy(cfg), adapter_name=name)
        unet.set_adapter("default")
        by_name = dict(unet.named_parameters())
        for k, (ema, name) in enumerate(zip(self.emas, self.adapter_names)):
            shadow = []
            for pname, s in zip(self.names, ema.shadow_params):
                p = by_name[pname.replace(".default.", f".{name}.")]
                p.requires_grad_(False)
                p.data = s.detach().clone().to(p.device)  # fp32, like the policy's LoRA parameters
                shadow.append(p.data)
            ema.shadow_params = shadow
        for p in params:
            p.requires_grad_(True)
        self.names_now = None
        self._hooks = [m.register_forward_pre_hook(self._route, with_kwargs=True)
                       for m in unet.modules() if isinstance(m, LoraLayer)]

    def _route(self, module, args, kwargs):
        if self.names_now is None:
            return None
        return args, {**kwargs, "adapter_names": self.names_now}

    @torch.no_grad()
    def predict_with_reference(self, forward, reference, rows, *inputs):
        """``(reference, [annotator k])`` from one forward of ``forward(*repeated inputs)`` (``reference``
        is not called: the ``"__base__"`` rows are the reference)."""
        groups = ["__base__"] + self.adapter_names
        self.names_now = [g for g in groups for _ in range(rows)]
        try:
            out = forward(*[None if x is None else _repeat_rows(x, len(groups)) for x in inputs])
        finally:
            self.names_now = None
        chunks = out.split(rows)
        return chunks[0], list(chunks[1:])


def _repeat_rows(x, n):
    if isinstance(x, dict):
        return {k: _repeat_rows(v, n) for k, v in x.items()}
    return x.repeat(n, *([1] * (x.dim() - 1)))
