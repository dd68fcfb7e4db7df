"""Issue 6: two processes (accelerate DDP over gloo, torchrun) with B pairs each give the same
loss, instance weights and LoRA gradients as one process with 2B pairs (sync_stats on)."""
import os
import subprocess
import sys

import torch

from tests.test_train_fixtures import root  # noqa: F401  (skips without diffusers/peft/accelerate)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = 3


def test_two_process_ddp_matches_one_process_with_twice_the_pairs(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.train_scale_dist_worker", str(tmp_path), str(B)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from tests.train_scale_dist_worker import run

    single = run(str(tmp_path), 2 * B)
    ranks = [torch.load(tmp_path / f"rank{r}-of-2.pt", weights_only=False) for r in range(2)]
    one = torch.load(tmp_path / "rank0-of-1.pt", weights_only=False)
    # the two ranks' shares make up exactly the single process's batch, in order
    assert torch.equal(torch.cat([r["index"] for r in ranks]), one["index"])
    for variant, want in single.items():
        got = [r["results"][variant] for r in ranks]
        loss = (got[0]["loss"] + got[1]["loss"]) / 2  # DDP averages gradients over equal shares
        torch.testing.assert_close(loss, want["loss"], rtol=1e-5, atol=1e-6, msg=f"{variant}: loss")
        for f in ("weights", "metric"):
            both = torch.cat([g[f] for g in got])
            torch.testing.assert_close(both, want[f], rtol=1e-4, atol=1e-6, msg=f"{variant}: {f}")
        assert not torch.allclose(want["weights"], torch.ones_like(want["weights"])), "annotators had no effect"
        for name, g1 in want["grads"].items():
            assert float(g1.abs().max()) > 0, name
            for r, g in enumerate(got):
                torch.testing.assert_close(g["grads"][name], g1, rtol=1e-4, atol=1e-7,
                                           msg=f"{variant}: rank {r} gradient of {name}")
    # the mixed-batch annotators give what the swapped-weight annotators give
    torch.testing.assert_close(single["mixed"]["loss"], single["swap"]["loss"], rtol=1e-5, atol=1e-6)


def test_trainer_runs_under_torchrun_with_two_processes_and_resumes(tmp_path):
    """The whole trainer under torchrun: 2 processes (Accelerator(cpu=True) -> DDP over gloo), sync_batch_stats,
    a checkpoint with both ranks' RNG files, then a resume."""
    import json

    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "adpo_train",
            "--unet_config", "tiny", "--synthetic_pairs", "16", "--train_batch_size", "2", "--logging_steps", "2",
            "--checkpointing_steps", "2", "--sync_batch_stats", "--ema_warmup_steps", "1", "--output_dir",
            str(tmp_path), "--quiet", "--no_plot", "--report_to", "jsonl"]
    for steps, extra in (("4", ["--stop_after_steps", "2"]), ("4", ["--resume_from_checkpoint", "latest"])):
        proc = subprocess.run(base + ["--max_train_steps", steps] + extra, cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4 batches/epoch of 2 pairs" in proc.stdout  # 16 pairs / (2 pairs x 2 processes)
    assert "resumed from" in proc.stdout and "x 2 processes" in proc.stdout
    ck = tmp_path / "checkpoint-2"
    assert (ck / "trainer_rng_0.safetensors").is_file() and (ck / "trainer_rng_1.safetensors").is_file()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4] and rows[-1]["annotators_ready"]
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
