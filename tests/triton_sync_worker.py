"""One rank of tests/test_triton.py::test_sync_stats_two_processes, launched by bench.launch.torchrun
(each rank's log kept, its first error quoted): ``python -m tests.triton_sync_worker OUT_DIR``."""
import os
import sys

import torch
import torch.distributed as dist

import adpo_kernels as ak
from tests.test_triton import FIELDS, SYNC_B, SYNC_CFG, _rank_rows
from tests.utils import make_inputs


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")  # torchrun's environment: rank, world size, the agent's store
    rank = dist.get_rank()
    try:
        model, ref, target, annots = make_inputs(SYNC_B, (40,), torch.float32, K=2, seed=21)
        local = [_rank_rows(t.detach(), rank) for t in (model, ref, target)]
        m = local[0].requires_grad_(True)
        out = ak.adaptive_dpo_loss(m, local[1], local[2], [_rank_rows(a, rank) for a in annots], SYNC_CFG,
                                   backend="triton")
        out.loss.backward()
        torch.save({f: getattr(out, f) for f in FIELDS} | {"grad": m.grad}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
