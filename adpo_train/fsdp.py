"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``): ``--distributed fsdp``.

Under ``accelerate launch`` / ``torchrun`` with two or more processes, the trainer shards
instead of replicating (accelerate still sets up the process group, the devices, the
gradient-accumulation counter and the optimizer/scheduler wrappers; the UNet itself is
not handed to ``accelerator.prepare``):

* :func:`shard_unet`: ``fully_shard`` on every ResNet and transformer block, then on the
  UNet itself, over a 1-D device mesh of all processes.  Parameters become DTensors sharded
  on dim 0; each forward all-gathers one block at a time.  With LoRA the frozen base weights
  are sharded once and shared by the policy and the reference (adapters disabled), as without
  FSDP; a full fine-tune's frozen reference UNet is sharded the same way.  Mixed precision is
  FSDP's :class:`MixedPrecisionPolicy` (:func:`mixed_precision_policy`: bf16 parameters in the
  forward, fp32 gradient reduce-scatter);
* the EMA annotators (:mod:`adpo_train.annotators`) keep one shadow per LOCAL shard
  (:func:`local`): each rank updates its own shard, nothing is gathered for the EMA update;
  an annotator's forward copies its shards into the live shards in place and drops every
  all-gathered copy (:func:`reshard`) so the next forward gathers the swapped weights;
* :func:`save` / :func:`load`: the trained parameters, the optimizer state and the EMA shards
  through ``torch.distributed.checkpoint`` (DCP: each rank writes its shards; the folder
  can be read back by another world size);
* :func:`save_gathered`: the final export (a full fine-tune's UNet, the EMA annotators) written
  as one safetensors file by rank 0 while the tensors are gathered one at a time: no rank ever
  holds a whole copy of the model; :func:`full_state_dict` gathers a LoRA (small) on rank 0.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

# diffusers blocks that become one FSDP unit each (every UNet of SD1.5/2.x/SDXL is made of them)
SHARD_BLOCKS = ("ResnetBlock2D", "Transformer2DModel")
DCP_FOLDER = "sharded"


@functools.cache
def _dtensor_type():
    from torch.distributed.tensor import DTensor  # imported on first use, not with the trainer

    return DTensor


def is_dtensor(t) -> bool:
    return isinstance(t, _dtensor_type())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``t`` (a DTensor), or ``t`` itself, detached: the same storage, so an
    in-place change is a change of the parameter."""
    with torch.no_grad():
        return t.to_local() if is_dtensor(t) else t.detach()


def mixed_precision_policy(mixed_precision: str):
    """FSDP2's policy for accelerate's ``--mixed_precision``: bf16 compute, fp32 reduce (fp16 is refused
    by the trainer: it would need a sharded gradient scaler)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def device_mesh(device: torch.device):
    """A 1-D mesh of every process (the default process group, which accelerate created)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard_unet(unet: torch.nn.Module, mesh, mp_policy) -> torch.nn.Module:
    """``fully_shard`` every block of :data:`SHARD_BLOCKS`, then the UNet (in place); returns it."""
    from torch.distributed.fsdp import fully_shard

    for module in unet.modules():
        if type(module).__name__ in SHARD_BLOCKS:
            fully_shard(module, mesh=mesh, mp_policy=mp_policy)
    # the root too gives its gathered parameters back after each forward (FSDP's default keeps them for the
    # backward): the no-grad forwards (reference, annotators) leave nothing gathered behind
    fully_shard(unet, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=True)
    # FSDP settles each block's dtypes on its first forward, from the parameters that require grad then;
    # the first forward is the reference's, with the LoRA adapters disabled (peft clears their
    # requires_grad): settle them now, while the adapters are trainable (else bf16 runs fail in backward)
    unet._get_fsdp_state()._lazy_init()
    return unet


def reshard(module: torch.nn.Module) -> None:
    """Free every all-gathered parameter of ``module``, so that its next forward gathers the shards anew.
    (FSDP keeps the root's parameters gathered after a forward, expecting a backward.)"""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the gradients (sharded or whole) as a plain 0-d tensor, equal on every rank."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sq = torch.stack([local(g).double().pow(2).sum() for g in grads]).sum()
    if any(is_dtensor(g) for g in grads):
        dist.all_reduce(sq)
    return sq.sqrt().float()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every rank when ``t`` is a DTensor; collective)."""
    return t.full_tensor() if is_dtensor(t) else t


def as_dtensor(shard: torch.Tensor, like) -> torch.Tensor:
    """``shard`` (a rank's local piece) as a DTensor laid out like parameter ``like``."""
    from torch.distributed.tensor import DTensor

    if not is_dtensor(like):
        return shard
    return DTensor.from_local(shard, like.device_mesh, like.placements, shape=like.shape, stride=like.stride(),
                              run_check=False)


# safetensors' names of the dtypes a UNet, its EMA copies or a LoRA hold
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def save_gathered(path: str, tensors: dict, is_main: bool, metadata: Optional[dict] = None) -> None:
    """Write ``tensors`` (DTensor shards or whole tensors) as ONE safetensors file on the main process,
    gathering one tensor at a time: the header is made from the global shapes first, then each tensor
    is gathered (collective: every rank calls this with the same dict) and its bytes appended, so no
    rank ever holds more than one whole tensor of the set, in host or device memory."""
    import json
    import struct

    header, offset = {}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    f = open(path + ".part", "wb") if is_main else None
    try:
        if f is not None:
            f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            whole = full_tensor(t.detach())
            if f is not None:
                f.write(whole.cpu().contiguous().view(torch.uint8).numpy().tobytes())
            del whole
    finally:
        if f is not None:
            f.close()
    if is_main:
        import os

        os.replace(path + ".part", path)


def full_state_dict(unet: torch.nn.Module, is_main: bool, trainable_only: bool) -> dict:
    """The UNet's whole state dict (or its trained parameters) on the main process's CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(unet, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                            ignore_frozen_params=trainable_only))
    return sd if is_main else {}


def ema_state(annotators) -> dict:
    """The EMA shards as DTensors laid out like their parameters (what DCP saves and loads)."""
    if annotators is None:
        return {}
    w = annotators.weights
    return {f"ema{k}.{name}": as_dtensor(s, p) for k, ema in enumerate(w.emas)
            for name, s, p in zip(w.names, ema.shadow_params, w.params)}


def _state(unet, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(unet, optimizer, options=StateDictOptions(ignore_frozen_params=True))


def save(path: str, unet, optimizer, annotators) -> None:
    """Every rank writes its shards of the trained parameters, the optimizer state and the EMA annotators
    into ``path`` (collective)."""
    import torch.distributed.checkpoint as dcp

    model_sd, optim_sd = _state(unet, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, "ema": ema_state(annotators)}, checkpoint_id=path)


def load(path: str, unet, optimizer, annotators) -> None:
    """Restore what :func:`save` wrote (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_sd, optim_sd = _state(unet, optimizer)
    ema_sd = ema_state(annotators)
    state = {"model": model_sd, "optim": optim_sd, "ema": ema_sd}
    dcp.load(state, checkpoint_id=path)
    # the EMA DTensors share their storage with the shadows (as_dtensor): DCP has loaded them in place
    set_state_dict(unet, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # frozen weights are not saved;
    # every trained one is: dcp.load above fails on a key missing from the checkpoint


def tensor_bytes(tensors) -> int:
    """Bytes of this rank's storage of ``tensors`` (a DTensor counts its local shard only)."""
    return sum(local(t).numel() * t.element_size() for t in tensors if t is not None)


def rank_memory(unet, reference, optimizer, annotators) -> dict:
    """This rank's bytes of parameters (trained, frozen), AdamW's moments and the EMA annotators (their
    copies and the swap backup), counted from the tensors.  Gradients are not there to count (freed after
    every step); they take what the trained parameters take."""
    params = list(unet.parameters()) + (list(reference.parameters()) if reference is not None else [])
    raw = getattr(optimizer, "optimizer", optimizer)
    moments = [v for s in raw.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    ema = [s for e in annotators.emas for s in e.shadow_params] + list(getattr(annotators, "_backup", [])) \
        if annotators is not None else []
    return {"trained_param_bytes": tensor_bytes([p for p in params if p.requires_grad]),
            "frozen_param_bytes": tensor_bytes([p for p in params if not p.requires_grad]),
            "optimizer_state_bytes": tensor_bytes(moments), "ema_bytes": tensor_bytes(ema)}


def all_ranks(obj, world: int) -> list:
    """``[obj of rank r for r in range(world)]`` on every rank (collective when ``world > 1``)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Optional[object]] = [None] * world
    dist.all_gather_object(out, obj)
    return out
