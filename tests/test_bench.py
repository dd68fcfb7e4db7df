"""The benchmark harness runs and writes well-formed rows (CPU, tiny shapes; no timing asserted)."""
import csv
import math
import os
import subprocess
import sys

import pytest
import torch

import adpo_kernels as ak
from bench import __main__ as cli
from bench import loss as L
from bench import plot, report, results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One run of the tiny suite with every provider, written to a temporary results folder."""
    d = tmp_path_factory.mktemp("results")
    rows = cli.run_benchmark("loss", cli.build_parser().parse_args(
        ["loss", "--suite", "tiny", "--device", "cpu", "--results-dir", str(d), "--note", "ci smoke"]),
        log=lambda *a: None)
    return d, rows


FP32_EPS = torch.finfo(torch.float32).eps


def _bytes_that_must_move(case, mode):
    """From the tensors the benchmark feeds: the forward reads every input once (model, ref, K
    annotators, the shared target); the backward reads model and target and writes the gradient."""
    mp, rp, t, an = L.make_inputs(case, torch.device("cpu"), 0)
    fwd = sum(x.numel() * x.element_size() for x in (mp, rp, t, *an))
    bwd = 2 * mp.numel() * mp.element_size() + t.numel() * t.element_size()
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def _cpu_capable():
    return ["eager", "compiled"] + (["cpu"] if not ak.available_backends()["cpu"] else [])


def test_rows_well_formed(smoke):
    d, returned = smoke
    with open(os.path.join(d, "loss.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(returned) == len(L.SUITES["tiny"]["cases"]) * len(L.PROVIDERS) * len(L.MODES)
    assert len({r["run_id"] for r in rows}) == 1
    for r in rows:
        for col in ("run_id", "date", "device", "device_type", "torch", "python", "threads", "git_sha"):
            assert r[col], f"empty {col} in {r}"
        assert r["note"] == "ci smoke"
        assert r["status"] in ("ok", "skipped", "error")
    eager = {(r["dtype"], r["K"], r["shape"]): r for r in rows if r["provider"] == "eager" and r["mode"] == "full"}
    for prov in _cpu_capable():
        for case in L.SUITES["tiny"]["cases"]:
            for mode in L.MODES:
                match = [r for r in rows if r["provider"] == prov and r["mode"] == mode and r["dtype"] == case.dtype
                         and int(r["K"]) == case.K and r["shape"] == case.shape]
                assert len(match) == 1, (prov, case, mode)
                r = match[0]
                assert r["status"] == "ok", f"{prov} {case} {mode}: {r['reason']}"
                med, p10, p90, mn = (float(r[k]) for k in ("median_ms", "p10_ms", "p90_ms", "min_ms"))
                assert 0 < mn <= p10 <= med <= p90 <= float(r["max_ms"])
                assert int(r["reps"]) >= 3 and float(r["first_call_ms"]) > 0
                floor = _bytes_that_must_move(case, mode)
                assert int(r["bytes_floor"]) == floor, (case, mode)
                # units: GB/s of the floor at the median time; percent of the measured copy bandwidth
                assert math.isclose(float(r["gbps"]) * med * 1e6, floor, rel_tol=1e-3), r
                assert math.isclose(float(r["pct_floor"]), 100 * float(r["gbps"]) / float(r["copy_gbps"]), rel_tol=1e-3)
                assert int(r["rot_sets"]) >= 1 and int(r["alloc_bytes"]) >= 0
                assert float(r["peak_extra_bytes"]) >= 0
                # the timed provider computes the right thing: its (norm-wise) errors against the float64
                # reference are at most twice eager torch's in the same dtype, plus a few fp32 ulps
                e = eager[(r["dtype"], r["K"], r["shape"])]
                for col in ("loss_rel_err", "grad_rel_err"):
                    assert float(r[col]) <= 2 * float(e[col]) + 16 * FP32_EPS, (col, r)
    for key, e in eager.items():  # torch's own gradient: rounded to the dtype, computed in fp32
        assert float(e["grad_rel_err"]) <= torch.finfo(L.DTYPES[key[0]]).eps + 16 * FP32_EPS, e
    for r in rows:
        if r["provider"] not in _cpu_capable():
            assert r["status"] == "skipped" and r["reason"], r  # triton/cuda on CPU: said, not faked


def test_report_and_plots(smoke, tmp_path):
    d, _ = smoke
    text = report.page(str(d))
    assert "not yet measured" in text  # no GPU rows
    assert "Intel" in text or "cores" in text  # the machine is named
    assert "`eager`" in text
    # plots skip the CI suite: relabel the rows as a real suite to render them
    rows = results.read_rows("loss", str(d))
    for r in rows:
        r["suite"] = "cpu"
    results.append_rows("loss", rows, {}, results_dir=str(tmp_path))
    paths = plot.render_all(str(tmp_path / "img"), str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["bench_loss_gbps.png", "bench_loss_time.png"]
    assert all(os.path.getsize(p) > 1000 for p in paths)
    assert "eager" in report.summary(str(tmp_path))


def test_append_grows_schema(tmp_path):
    env = {"run_id": "r1", "device": "dev"}
    results.append_rows("x", [{"a": 1}], env, ["a"], str(tmp_path))
    results.append_rows("x", [{"a": 2, "b": 3.5}], {**env, "run_id": "r2"}, ["a"], str(tmp_path))
    rows = results.read_rows("x", str(tmp_path))
    assert [(r["run_id"], r["a"], r["b"]) for r in rows] == [("r1", "1", ""), ("r2", "2", "3.5")]
    path, n = results.import_rows(os.path.join(tmp_path, "x.csv"), str(tmp_path / "other"))
    assert n == 2 and results.import_rows(os.path.join(tmp_path, "x.csv"), str(tmp_path / "other"))[1] == 0


def test_default_results_dir_is_under_the_current_directory(tmp_path, monkeypatch):
    """Without --results-dir rows go to ./bench/results of the caller, never into the package's folder
    (an installed bench would otherwise write into site-packages)."""
    monkeypatch.chdir(tmp_path)
    path = results.append_rows("x", [{"a": 1}], {"run_id": "r1"}, ["a"])
    assert os.path.realpath(path) == os.path.realpath(tmp_path / "bench" / "results" / "x.csv")
    assert results.read_rows("x")[0]["a"] == "1"
    package = os.path.dirname(os.path.abspath(results.__file__))
    assert not os.path.exists(os.path.join(package, "results", "x.csv"))


def test_train_command_is_registered():
    """`python -m bench train` resolves to bench/train.py (its runs are tested in test_bench_train.py)."""
    assert "train" in cli.BENCHMARKS
    mod = cli._load("train")
    assert mod is not None and callable(mod.run) and callable(mod.add_arguments) and mod.COLUMNS


def test_gpu_check_rehearsal(tmp_path):
    """bench/gpu_check.sh's plumbing (steps, budget, CSV, summary) without a GPU."""
    env = {**os.environ, "ADPO_CHECK_DRYRUN": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    p = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_check.sh")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert {"gpu_check.log", "loss.csv", "summary.txt"} <= set(os.listdir(tmp_path))
    assert len(os.listdir(tmp_path)) <= 8  # the device tool returns at most 8 files
    lines = p.stdout.strip().splitlines()
    assert any(line.startswith("== loss / tiny") for line in lines)
    # the real run's layout: step table, then the tests that did not pass, then the verdict last
    steps = [line.split()[0] for line in lines[lines.index(next(ln for ln in lines if ln.startswith("step "))) + 1:]]
    assert steps[:8] == ["diffusers", "build-cpu", "build-cuda", "kernel-tests", "tests", "loss", "train", "backend"]
    assert lines[-2:] == ["== tests that did not pass: 0", "== gpu_check: PASSED"]
    rows = results.read_rows("loss", str(tmp_path))
    assert {r["provider"] for r in rows if r["status"] == "ok"} == {"eager"}
