"""The trainer benchmark (bench/train.py) runs on the CPU: every variant, a few steps, rows complete."""
import math

from tests.test_train_fixtures import require_trainer_packages


def test_train_benchmark_cpu_smoke(tmp_path):
    require_trainer_packages("diffusers", "peft")
    from bench import __main__ as cli

    rows = cli.run_benchmark("train", cli.build_parser().parse_args(
        ["train", "--device", "cpu", "--quick", "--steps", "1", "--warmup", "1", "--results-dir", str(tmp_path)]),
        log=lambda *a: None)
    assert [r["variant"] for r in rows] == ["baseline", "dpo", "adaptive", "adaptive-batched",
                                                  "adaptive-k0", "adaptive-noskip"]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["pairs_per_s"] > 0 and r["step_ms"] > 0 and r["peak_mem_gb"] > 0
        assert r["flops_per_step"] > 0 and r["mfu"] is None  # no peak FLOP/s defined for a CPU
    by = {r["variant"]: r for r in rows}
    # the annotators add forwards; the baseline also runs the VAE and the text encoder
    assert by["adaptive"]["flops_per_step"] > by["dpo"]["flops_per_step"]
    assert math.isclose(by["adaptive"]["flops_per_step"], by["adaptive-batched"]["flops_per_step"], rel_tol=0.02)
    assert by["baseline"]["flops_per_step"] > by["adaptive"]["flops_per_step"]
    # the annotators add two forwards to DPO's policy forward + backward and reference forward
    assert 1 < by["adaptive"]["flops_vs_dpo"] < 2
    # each ratio compares the right rows, in the right direction, in the measured columns
    for r in rows:
        assert r["pairs"] == 8 and math.isclose(r["pairs_per_s"], 8 / (r["step_ms"] / 1e3), rel_tol=1e-6), r
    # without the skip machinery the step computes the same (the skip adds no matmul or conv)
    assert by["adaptive-noskip"]["flops_per_step"] == by["adaptive"]["flops_per_step"]
    for v in ("dpo", "adaptive", "adaptive-batched", "adaptive-k0", "adaptive-noskip"):
        r, base, dpo = by[v], by["baseline"], by["dpo"]
        assert math.isclose(r["speedup_vs_baseline"], base["step_ms"] / r["step_ms"], rel_tol=1e-6), r
        assert math.isclose(r["mem_vs_baseline"] * base["peak_mem_gb"], r["peak_mem_gb"], rel_tol=1e-6), r
        if v != "dpo":
            assert math.isclose(r["time_vs_dpo"] * dpo["step_ms"], r["step_ms"], rel_tol=1e-6), r
            assert math.isclose(r["flops_vs_dpo"] * dpo["flops_per_step"], r["flops_per_step"], rel_tol=1e-6), r
    assert by["baseline"].get("speedup_vs_baseline") is None and by["dpo"].get("time_vs_dpo") is None
    # without annotators the metric costs no UNet forward: the matmul/conv FLOPs are DPO's
    assert by["adaptive-k0"]["flops_vs_dpo"] == 1 and by["adaptive-k0"]["annotators"] == 0
    assert (tmp_path / "train.csv").is_file()
