"""bench/gpu_check.sh names every test that did not pass, from a real pytest log, also when pytest
was stopped in the middle of a test (its `timeout -s INT`) or killed before its summary."""
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_check.sh")
HAS_TIMEOUT = importlib.util.find_spec("pytest_timeout") is not None

FAKE = textwrap.dedent("""
    import os, time
    import pytest

    @pytest.fixture
    def broken():
        raise RuntimeError("fixture broke")

    def test_pass():
        pass

    def test_fail():
        assert 1 == 2

    def test_error(broken):
        pass

    @pytest.mark.skip(reason="not here")
    def test_skip():
        pass

    @pytest.mark.parametrize("n", [1, 2])
    def test_param(n):
        assert n == 1
    {slow}
    def test_hang():
        open(os.environ["HANG_FLAG"], "w").close()
        time.sleep(300)

    def test_after():
        pass
""")
SLOW = """
    @pytest.mark.timeout(1)
    def test_slow():
        time.sleep(30)
"""


def _failing(*logs):
    p = subprocess.run(["bash", SCRIPT, "--failing-tests", *map(str, logs)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


@pytest.fixture(scope="module")
def interrupted_log(tmp_path_factory):
    """A pytest -v -rA log of a fake suite interrupted (SIGINT) inside test_hang, as gpu_check.sh writes it."""
    d = tmp_path_factory.mktemp("fake")
    (d / "tests").mkdir()
    (d / "tests" / "test_fake.py").write_text(FAKE.replace("{slow}", textwrap.dedent(SLOW) if HAS_TIMEOUT else ""))
    flag = d / "hang_started"
    log = d / "tests.log"
    with open(log, "w") as f:
        f.write("== kernel-tests: python -m pytest -v -rA tests/test_fake.py\n")
        f.flush()
        # as gpu_check.sh runs pytest, with SIGINT ignored on entry as in a shell's background job
        proc = subprocess.Popen(["bash", SCRIPT, "--pytest", "-v", "-rA", "-p", "no:cacheprovider",
                                 "tests/test_fake.py"], cwd=d, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "HANG_FLAG": str(flag), "PYTHON": sys.executable},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        deadline = time.monotonic() + 240
        while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert flag.exists(), log.read_text()[-3000:]
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("pytest ignored SIGINT: " + log.read_text()[-2000:])
        f.write("== tests: python -m pytest -v -rA tests\n")
    return log


def test_names_failed_erroring_and_interrupted_tests(interrupted_log):
    text = interrupted_log.read_text()
    assert "KeyboardInterrupt" in text and "short test summary info" in text, text[-3000:]
    lines = _failing(interrupted_log)
    ids = [ln.split()[1] for ln in lines]
    expected = ["tests/test_fake.py::test_fail", "tests/test_fake.py::test_error", "tests/test_fake.py::test_param[2]"]
    if HAS_TIMEOUT:
        expected.append("tests/test_fake.py::test_slow")
    expected.append("tests/test_fake.py::test_hang")
    assert sorted(ids) == sorted(expected), lines
    by_id = dict(zip(ids, lines))
    assert by_id["tests/test_fake.py::test_fail"].startswith("FAILED ") and "assert 1 == 2" in by_id[
        "tests/test_fake.py::test_fail"]
    assert by_id["tests/test_fake.py::test_error"].startswith("ERROR ") and "fixture broke" in by_id[
        "tests/test_fake.py::test_error"]
    assert by_id["tests/test_fake.py::test_hang"].startswith("INTERRUPTED ")
    if HAS_TIMEOUT:
        assert by_id["tests/test_fake.py::test_slow"].startswith("TIMEOUT ")


def test_names_them_without_the_summary(interrupted_log, tmp_path):
    """pytest killed (SIGKILL) before its summary: the -v lines alone still name every test."""
    text = interrupted_log.read_text()
    cut = tmp_path / "killed.log"
    cut.write_text(text[:text.index("!!!")])
    lines = _failing(cut)
    assert {ln.split()[1] for ln in lines} == {ln.split()[1] for ln in _failing(interrupted_log)}, lines
    assert [ln for ln in lines if "test_hang" in ln][0].startswith("INTERRUPTED ")


def test_a_passing_log_names_nothing(tmp_path):
    log = tmp_path / "ok.log"
    log.write_text("== kernel-tests: pytest\n"
                   "tests/test_a.py::test_x[bf16] PASSED                                     [ 50%]\n"
                   "tests/test_a.py::test_y SKIPPED (no GPU)                                 [100%]\n"
                   "== tests: pytest\n"
                   "[gw0] [ 50%] PASSED tests/test_b.py::test_z\n"
                   "[gw1] [100%] FAILED tests/test_b.py::test_w\n")
    assert _failing(log) == ["FAILED tests/test_b.py::test_w"]


def test_loss_benchmark_writes_every_row_when_terminated(tmp_path):
    """The GPU check stops the loss benchmark with SIGTERM: the case in flight and the ones after it are
    written as skipped rows (so the CSV is complete), and the process exits promptly with status 0."""
    from bench import results

    # a long warm-up makes sure the signal lands inside the first case
    cmd = [sys.executable, "-m", "bench", "loss", "--device", "cpu", "--shapes", "sd15", "--annotators", "2,0",
           "--dtypes", "fp32", "--providers", "eager", "--modes", "full", "--warmup-ms", "600000", "--no-profile",
           "--no-check", "--results-dir", str(tmp_path), "--note", "sigterm"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("sd15 "):
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    log = "".join(out) + rest
    assert proc.returncode == 0, log[-3000:]
    rows = results.read_rows("loss", str(tmp_path))
    assert sorted(r["K"] for r in rows) == ["0", "2"], log[-3000:]
    assert {r["status"] for r in rows} == {"skipped"}
    assert all("SIGTERM" in r["reason"] for r in rows)
