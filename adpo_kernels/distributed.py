"""Global batch statistics under data parallelism (``sync_stats=True``).

Every batch statistic of the loss (mean logit, batch L2 norms, mean stability, the sum
of ``weight_normalize``, the flip quantile) is a function of the per-pair quantities of
*all* pairs.  Rather than all-reducing five statistics (the flip quantile cannot be
all-reduced), each process all-gathers its small per-pair tensor (a few floats per
pair, never the predictions), computes the statistics over the whole batch and keeps
its own slice.  Gradients still flow only through the local pairs, so with
``loss = mean over local pairs`` and DDP's gradient averaging, P processes with B/P
pairs each reproduce one process with B pairs exactly.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def gather_pairs(x: torch.Tensor, enabled: bool) -> tuple[torch.Tensor, int]:
    """All-gather ``x`` of shape ``(..., B_local)`` along its last dimension.

    Returns the global tensor ``(..., B_global)`` (ranks in order) and the offset of this
    rank's pairs in it.  Identity when ``enabled`` is false or no process group exists.
    Processes may hold different numbers of pairs.  ``x`` must not require grad.
    """
    if not enabled or world_size() == 1:
        return x, 0
    rank, ws = dist.get_rank(), dist.get_world_size()
    n_local = x.shape[-1]
    sizes_t = torch.tensor([n_local], dtype=torch.int64, device=x.device)
    sizes = [torch.empty_like(sizes_t) for _ in range(ws)]
    dist.all_gather(sizes, sizes_t)
    sizes = [int(s.item()) for s in sizes]
    n_max = max(sizes)
    x = x.contiguous()
    if n_local < n_max:
        pad = x.new_zeros(*x.shape[:-1], n_max - n_local)
        x = torch.cat([x, pad], dim=-1)
    parts = [torch.empty_like(x) for _ in range(ws)]
    dist.all_gather(parts, x)
    full = torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)
    return full, sum(sizes[:rank])
