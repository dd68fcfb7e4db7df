"""``python -m bench memory``: real parameter counts, the formula by hand, and the formula
against the bytes of the tensors the trainer builds for the tiny config (CPU, meta device)."""
import csv

import pytest
import torch

from adpo_train.models import LORA_TARGETS, build_unet
from bench import __main__ as cli
from bench import memory as M

# Published parameter counts of the UNets the built-in configs reproduce: diffusers'
# runwayml/stable-diffusion-v1-5 unet (859,520,964) and stabilityai/stable-diffusion-xl-base-1.0
# unet (2,567,463,684), i.e. the "860M" and "2.6B" of the SD and SDXL papers.
PUBLISHED = {"sd15": 859_520_964, "sdxl": 2_567_463_684}


def _lora_from_shapes(spec: str, rank: int) -> int:
    """LoRA parameters counted from the Linear layers the trainer targets: rank * (in + out) each."""
    with torch.device("meta"):
        unet = build_unet(spec)
    return sum(rank * (m.in_features + m.out_features) for name, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in LORA_TARGETS))


@pytest.mark.parametrize("spec", ["sd15", "sdxl"])
def test_counts_match_published_and_layer_shapes(spec):
    n, lora = M.count_params(spec, rank=4)
    assert n == PUBLISHED[spec]
    assert lora == _lora_from_shapes(spec, 4) > 0


def test_one_cell_by_hand():
    # SDXL full fine-tune, bf16 reference, 2 EMA annotators, N = T = 2,567,463,684:
    # DDP: 16N (fp32 weights 4 + grads 4 + AdamW 8) + 2N (bf16 reference) + 12N (2 EMA + backup, fp32) = 30N
    n = PUBLISHED["sdxl"]
    ddp = M.bytes_per_gpu(n, n, True, 1, 2, 2)
    assert ddp == {"trainable_bytes": 41_079_418_944, "frozen_bytes": 5_134_927_368,
                   "ema_bytes": 30_809_564_208, "total_bytes": 77_023_910_520}
    # FSDP over 8 GPUs: each group divided by 8, rounded up (2N/8 = 641,865,921; 12N/8 = 3,851,195,526)
    fsdp = M.bytes_per_gpu(n, n, True, 8, 2, 2)
    assert fsdp == {"trainable_bytes": 5_134_927_368, "frozen_bytes": 641_865_921,
                    "ema_bytes": 3_851_195_526, "total_bytes": 9_627_988_815}


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
@pytest.mark.parametrize("annotators", [1, 2])
def test_tiny_measured_equals_computed(full, annotators):
    n, lora = M.count_params("tiny", rank=4)
    measured = M.measure("tiny", full, 4, annotators)
    assert measured == M.bytes_per_gpu(n, n if full else lora, full, 1, 4, annotators)


def test_command_writes_rows(tmp_path):
    args = cli.build_parser().parse_args(["memory", "--device", "cpu", "--models", "tiny", "--rank", "4",
                                          "--processes", "1,2", "--mixed-precision", "no", "--results-dir", str(tmp_path)])
    cli.run_benchmark("memory", args, log=lambda *a: None)
    with open(tmp_path / "memory.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["mode"], r["strategy"], r["processes"], r["source"]) for r in rows}
    assert ("full", "fsdp", "2", "computed") in got and ("full", "ddp", "1", "measured") in got
    by = {(r["mode"], r["strategy"], r["source"]): int(r["total_bytes"]) for r in rows}
    assert by["full", "ddp", "measured"] == by["full", "ddp", "computed"]
    # the trainer under --distributed fsdp (2 processes): each rank's shards, counted, equal the formula
    for mode in ("lora", "full"):
        assert by[mode, "fsdp", "measured"] == by[mode, "fsdp", "computed"], mode
    half = by["full", "ddp", "computed"] / 2  # 2 shards: half of DDP, each of the 3 groups rounded up
    assert half <= by["full", "fsdp", "computed"] <= half + 3
