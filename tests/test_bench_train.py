"""The trainer benchmark (bench/train.py) runs on the CPU: every variant, a few steps, rows complete."""
import math

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")


def test_train_benchmark_cpu_smoke(tmp_path):
    from bench import __main__ as cli

    rows = cli.run_benchmark("train", cli.build_parser().parse_args(
        ["train", "--device", "cpu", "--quick", "--steps", "1", "--warmup", "1", "--results-dir", str(tmp_path)]),
        log=lambda *a: None)
    assert [r["variant"] for r in rows] == ["baseline", "dpo", "adaptive", "adaptive-batched",
                                                  "adaptive-k0"]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["pairs_per_s"] > 0 and r["step_ms"] > 0 and r["peak_mem_gb"] > 0
        assert r["flops_per_step"] > 0 and r["mfu"] is None  # no peak FLOP/s defined for a CPU
    by = {r["variant"]: r for r in rows}
    # the annotators add forwards; the baseline also runs the VAE and the text encoder
    assert by["adaptive"]["flops_per_step"] > by["dpo"]["flops_per_step"]
    assert math.isclose(by["adaptive"]["flops_per_step"], by["adaptive-batched"]["flops_per_step"], rel_tol=0.02)
    assert by["baseline"]["flops_per_step"] > by["adaptive"]["flops_per_step"]
    assert by["adaptive"]["time_vs_dpo"] > 0 and by["adaptive"]["flops_vs_dpo"] > 1
    # without annotators the metric costs no UNet forward: the matmul/conv FLOPs are DPO's
    assert by["adaptive-k0"]["flops_vs_dpo"] == 1 and by["adaptive-k0"]["annotators"] == 0
    assert by["dpo"]["speedup_vs_baseline"] > 0 and by["dpo"]["mem_vs_baseline"] > 0
    assert (tmp_path / "train.csv").is_file()
