"""bench.launch.torchrun: every rank's output in its own log, each rank's first error in the failure."""
import pytest

from bench.launch import RanksFailed, first_error, torchrun

# Rank 1 fails at once; rank 0 would run long and is killed by torchrun (its log has no error).
WORKER = """
import os, sys, time
rank = int(os.environ["RANK"])
print(f"hello from rank {rank}", flush=True)
if rank == 1:
    print("some noise on stderr", file=sys.stderr, flush=True)
    if sys.argv[1] == "raise":
        raise ValueError("boom on rank 1")
    os.abort()  # what a C++ std::terminate does
time.sleep(60)
"""


@pytest.mark.parametrize("how, want", [("raise", "ValueError: boom on rank 1"),
                                       ("abort", "Fatal Python error: Aborted")])
def test_a_failing_rank_is_quoted_with_its_first_error(tmp_path, how, want):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with pytest.raises(RanksFailed) as e:
        torchrun([str(script), how], tmp_path / "logs", timeout=120)
    msg = str(e.value)
    one = msg[msg.index("--- rank 1"):msg.index("--- launcher")]
    assert "first error:" in one and want in one and "some noise" not in one, msg
    assert "--- rank 0" in msg and "no error in its log" in msg.split("--- rank 1")[0], msg


def test_success_returns_every_rank_s_output(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text("import os; print('hello from rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'])\n")
    res = torchrun([str(script)], tmp_path / "logs", timeout=120)
    assert res.returncode == 0
    assert "hello from rank 0 of 2" in res.stdout and "hello from rank 1 of 2" in res.stdout
    assert len(res.logs) == 2 and res.logs[0] != res.logs[1]


def test_first_error_finds_the_start_of_each_kind():
    assert first_error("ok\nstill ok\n") == ""
    assert first_error("x\nterminate called without an active exception\nmore").startswith("terminate called")
    assert first_error("a\nTraceback (most recent call last):\n  f\nE: b").startswith("Traceback")
    assert first_error("adpo-train: error: --rank must be > 0\n").startswith("adpo-train: error: --rank")
    # torchrun's "[rank0]:" line prefix (an uncaught exception in a rank under --redirects)
    assert first_error("[rank0]: x\n[rank0]: Traceback (most recent call last):\n[rank0]:   f\n").startswith(
        "[rank0]: Traceback")


@pytest.mark.parametrize("env, teardown", [({"WORLD_SIZE": "2"}, False), ({"WORLD_SIZE": "1"}, True),
                                           ({"WORLD_SIZE": "2", "ADPO_TRAIN_FULL_EXIT": "1"}, True)])
def test_a_rank_ends_without_interpreter_teardown(env, teardown):
    """adpo_train.cli.main as a program in one of several ranks ends with os._exit after flushing (the
    gloo abort in teardown, see its docstring): the exit code and the output survive, atexit does not run."""
    import os
    import subprocess
    import sys

    code = ("import atexit, sys; atexit.register(lambda: print('TEARDOWN', flush=True)); "
            "from adpo_train.cli import main; sys.exit(main())")
    proc = subprocess.run([sys.executable, "-c", code, "--train_batch_size", "0"], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 2 and "adpo-train: error:" in proc.stderr and "--train_batch_size" in proc.stderr, proc
    assert ("TEARDOWN" in proc.stdout) == teardown, proc
