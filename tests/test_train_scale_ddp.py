"""Two processes (torchrun, gloo; DDP through accelerate, or FSDP2 with --distributed fsdp) with B
pairs each give the same loss, instance weights, metric and (gathered) gradients as one process with
2B pairs (sync_stats on); under FSDP also the same gathered parameters after an AdamW step, for LoRA
and for a full fine-tune.

The two sides compute in different orders (batches of 3 vs 6 rows: oneDNN picks kernels by
batch size and CPU), so float32 results differ by float32 rounding, whose size depends on
the machine.  Every quantity is therefore computed in float32 and in float64: the float64
twins must agree to float32's measured error of the same comparison scaled down to float64
(``err32 * eps64 / eps32``, with a margin), which any real discrepancy exceeds by orders of
magnitude; the float32 gradients of one side may be at most a few times further from their
float64 twins than the other side's (the same computation in the same dtype).
"""
import torch

from bench.launch import torchrun
from tests.test_train_fixtures import require_trainer_packages

B = 3
F32, F64 = torch.float32, torch.float64
EPS32, EPS64 = torch.finfo(F32).eps, torch.finfo(F64).eps


def _flat(res, what):
    """One float64 vector of a result's ``what`` (``grads``: every LoRA gradient, concatenated)."""
    if what in ("grads", "params"):
        return torch.cat([g.double().flatten() for _, g in sorted(res[what].items())])
    return res[what].double().flatten()


def assert_same_computation(a, b, what, msg):
    """``a``, ``b``: ``{dtype: result}`` of two computation orders of the same quantity."""
    a32, a64, b32, b64 = _flat(a[F32], what), _flat(a[F64], what), _flat(b[F32], what), _flat(b[F64], what)
    scale = float(b64.abs().max())
    assert scale > 0, f"{msg}: {what} is all zero"
    err_a, err_b = float((a32 - a64).abs().max()), float((b32 - b64).abs().max())
    tol64 = 64 * (EPS64 / EPS32) * max(err_a, err_b) + 64 * EPS64 * scale
    diff64 = float((a64 - b64).abs().max())
    assert diff64 <= tol64, (f"{msg}: {what} differs by {diff64:.3g} in float64 (allowed {tol64:.3g}; float32's "
                             f"errors {err_a:.3g}, {err_b:.3g} of scale {scale:.3g})")
    if what == "grads":  # many elements: the largest error is a stable measure of the rounding
        for x, y, name in ((err_a, err_b, "first"), (err_b, err_a, "second")):
            assert x <= 4 * y + 16 * EPS32 * scale, f"{msg}: float32 {what} of the {name} side {x:.3g} vs {y:.3g}"


def test_two_process_ddp_and_fsdp_match_one_process_with_twice_the_pairs(tmp_path):
    require_trainer_packages()
    torchrun(["-m", "tests.train_scale_dist_worker", str(tmp_path), str(B)], tmp_path / "logs")
    from tests.train_scale_dist_worker import DTYPES, SAME_AS, VARIANTS, run

    single = run(str(tmp_path), 2 * B)
    ranks = [torch.load(tmp_path / f"rank{r}-of-2.pt", weights_only=False) for r in range(2)]
    one = torch.load(tmp_path / "rank0-of-1.pt", weights_only=False)
    # the two ranks' shares make up exactly the single process's batch, in order
    assert torch.equal(torch.cat([r["index"] for r in ranks]), one["index"])
    # DDP (swapped and mixed-batch annotators) and FSDP (LoRA; full fine-tune with a sharded reference) against
    # one process with both shares: loss, metric, weights, the (all-reduced / gathered) gradients and the
    # parameters after one AdamW step
    for variant, same_as in [(v, v) for v in VARIANTS] + list(SAME_AS.items()):
        want = {d: single[same_as, d] for d in DTYPES}
        got = {d: [r["results"][variant, d] for r in ranks] for d in DTYPES}
        # gradients are averaged over equal shares: the global loss is the mean of the local ones
        both = {d: {"loss": (got[d][0]["loss"] + got[d][1]["loss"]) / 2,
                    **{f: torch.cat([g[f] for g in got[d]]) for f in ("weights", "metric")}} for d in DTYPES}
        for f in ("loss", "weights", "metric"):
            assert_same_computation(both, want, f, f"{variant}: 2 processes vs 1")
        assert not torch.allclose(want[F64]["weights"], torch.ones_like(want[F64]["weights"])), "annotators had no effect"
        for r in range(2):  # every rank holds the whole reduced gradient and updated parameters
            for f in ("grads", "params"):
                assert_same_computation({d: got[d][r] for d in DTYPES}, want, f, f"{variant}: rank {r} vs 1 process")
    # the mixed-batch annotators give what the swapped-weight annotators give
    for f in ("loss", "weights", "metric", "grads"):
        assert_same_computation({d: single["mixed", d] for d in DTYPES}, {d: single["swap", d] for d in DTYPES}, f,
                                "mixed-batch vs swapped-weight annotators")


def test_trainer_runs_under_torchrun_with_two_processes_and_resumes(tmp_path):
    """The whole trainer under torchrun: 2 processes (Accelerator(cpu=True) -> DDP over gloo), sync_batch_stats,
    a checkpoint with both ranks' RNG files, then a resume."""
    import json

    require_trainer_packages()
    base = ["-m", "adpo_train",
            "--unet_config", "tiny", "--synthetic_pairs", "16", "--train_batch_size", "2", "--logging_steps", "2",
            "--checkpointing_steps", "2", "--sync_batch_stats", "--ema_warmup_steps", "1", "--output_dir",
            str(tmp_path), "--quiet", "--no_plot", "--report_to", "jsonl"]
    for i, extra in enumerate((["--stop_after_steps", "2"], ["--resume_from_checkpoint", "latest"])):
        proc = torchrun(base + ["--max_train_steps", "4"] + extra, tmp_path.parent / f"{tmp_path.name}-logs{i}",
                        timeout=300)
    assert "4 batches/epoch of 2 pairs" in proc.stdout  # 16 pairs / (2 pairs x 2 processes)
    assert "resumed from" in proc.stdout and "x 2 processes" in proc.stdout
    ck = tmp_path / "checkpoint-2"
    assert (ck / "trainer_rng_0.safetensors").is_file() and (ck / "trainer_rng_1.safetensors").is_file()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4] and rows[-1]["annotators_ready"]
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
