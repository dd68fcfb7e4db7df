"""Tables from result rows: the short summary the CLI and the GPU check print, and the
results page ``docs/benchmarks.md``.

Only rows decide what is shown: every number comes from a CSV row and is printed next
to its machine; a cell without a row says "not yet measured".  Ratios are only formed
between rows of the same run (same ``run_id``), never across runs or machines.
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Iterable, Optional

from . import results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "benchmarks.md")
NYM = "not yet measured"
LOSS_PROVIDERS = ("eager", "compiled", "triton", "cuda", "cpu")
MODES = ("forward", "backward", "full")
SHAPE_ORDER = ("tiny", "small", "sd15", "sdxl", "large")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _f(row: dict, key: str) -> Optional[float]:
    v = row.get(key, "")
    if v in ("", None):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _case_key(r: dict):
    shape = r.get("shape", "")
    return (SHAPE_ORDER.index(shape) if shape in SHAPE_ORDER else 99, shape, int(r.get("K") or 0),
            r.get("dtype", ""), MODES.index(r["mode"]) if r.get("mode") in MODES else 9)


def latest_runs(rows: list[dict]) -> list[list[dict]]:
    """The rows of the latest run of each (machine, bench, suite, threads), oldest first."""
    by_run: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_run[r.get("run_id", "")].append(r)
    best: dict[tuple, tuple[str, str]] = {}
    for rid, rs in by_run.items():
        r0 = rs[0]
        key = (r0.get("device", ""), r0.get("bench", ""), r0.get("suite", ""), r0.get("threads", ""))
        if key not in best or r0.get("date", "") > best[key][0]:
            best[key] = (r0.get("date", ""), rid)
    return [by_run[rid] for _, rid in sorted(best.values())]


def all_runs(rows: list[dict]) -> list[list[dict]]:
    by_run: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_run[r.get("run_id", "")].append(r)
    return sorted(by_run.values(), key=lambda rs: rs[0].get("date", ""))


def machine(r: dict) -> str:
    """One line naming the machine and software of a row."""
    parts = [r.get("device", "?")]
    if r.get("device_type") == "cuda":
        parts.append(f"driver {r.get('driver') or '?'}, CUDA {r.get('cuda') or '?'}")
    else:
        parts.append(f"{r.get('threads', '?')} torch thread(s)")
    parts.append(f"torch {r.get('torch', '?')}, triton {r.get('triton') or '-'}, Python {r.get('python', '?')}")
    return "; ".join(parts)


def _skips(rs: list[dict]) -> dict[str, str]:
    out = {}
    for r in rs:
        if r.get("status") in ("skipped", "error") and r.get("provider") not in out:
            out[r["provider"]] = f"{r['status']}: {r.get('reason', '')}"
    return out


# --------------------------------------------------------------------------------------
# short summary (CLI, GPU check)
# --------------------------------------------------------------------------------------
def _loss_summary(rs: list[dict]) -> str:
    provs = [p for p in LOSS_PROVIDERS if any(r.get("provider") == p and r.get("status") == "ok" for r in rs)]
    cases: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rs:
        if r.get("status") == "ok":
            cases[_case_key(r)][r["provider"]] = r
    head = f"{'shape':6s} {'K':>2s} {'dtype':5s} {'mode':8s} " + " ".join(f"{p:>10s}" for p in provs)
    head += "   best/eager  best %floor"
    lines = [head, "-" * len(head)]
    for key in sorted(cases):
        by = cases[key]
        r0 = next(iter(by.values()))
        cells = " ".join(f"{_ms(_f(by[p], 'median_ms')) if p in by else '-':>10s}" for p in provs)
        best_p = min(by, key=lambda p: _f(by[p], "median_ms") or 1e30)
        eager = _f(by["eager"], "median_ms") if "eager" in by else None
        ratio = eager / _f(by[best_p], "median_ms") if eager else None
        pct = _f(by[best_p], "pct_floor")
        lines.append(f"{r0['shape']:6s} {str(r0['K']):>2s} {r0['dtype']:5s} {r0['mode']:8s} {cells}   "
                     f"{_x(ratio):>10s}  {best_p:>8s} {'-' if pct is None else f'{pct:.0f}%':>4s}")
    for p, why in _skips(rs).items():
        lines.append(f"{p}: {why}")
    return "\n".join(lines)


def _num(v) -> str:
    """A value as the summary prints it: floats to 4 significant digits."""
    try:
        return f"{float(v):.4g}" if isinstance(v, float) or "." in str(v) else str(v)
    except ValueError:
        return str(v)


def _generic_summary(rs: list[dict]) -> str:
    keys = ("pairs_per_s", "step_ms", "mfu", "peak_mem_gb", "median_ms", "total_gib", "peak_rss_mb",
            "bytes_per_pair", "loader_pairs_per_s", "step_pairs_per_s")
    lines = []
    for r in rs:
        who = r.get("provider") or r.get("variant") or r.get("name", "?")
        vals = ", ".join(f"{k}={_num(r[k])}" for k in keys if r.get(k) not in (None, ""))
        lines.append(f"{who:24s} {r.get('status', ''):8s} {vals or r.get('reason', '')}")
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    """A short fixed-width table of one run's rows (median ms per provider)."""
    if not rows:
        return "(no rows)"
    out = []
    for rs in all_runs(rows):
        r0 = rs[0]
        out.append(f"== {r0.get('bench', '?')} / {r0.get('suite', '')}: {machine(r0)}; git {r0.get('git_sha')} "
                   f"{r0.get('date')} (median ms)")
        out.append(_loss_summary(rs) if r0.get("bench") == "loss" else _generic_summary(rs))
    return "\n".join(out)


def summary(results_dir: Optional[str] = None, latest_only: bool = True) -> str:
    out = []
    for bench in _benches(results_dir):
        rows = results.read_rows(bench, results_dir)
        runs = latest_runs(rows) if latest_only else all_runs(rows)
        out += [summary_table(rs) for rs in runs]
    return "\n\n".join(out) or "(no result rows)"


def _benches(results_dir: Optional[str]) -> list[str]:
    d = results_dir or results.RESULTS_DIR
    if not os.path.isdir(d):
        return []
    return sorted(f[:-4] for f in os.listdir(d) if f.endswith(".csv"))


# --------------------------------------------------------------------------------------
# the results page
# --------------------------------------------------------------------------------------
def _md_table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _run_heading(rs: list[dict]) -> str:
    r0 = rs[0]
    note = f" Note: {r0['note']}." if r0.get("note") else ""
    load = f", 1-min load average {r0['loadavg']} at start" if r0.get("loadavg") else ""
    return (f"**{machine(r0)}**. Suite `{r0.get('suite')}`, run `{r0.get('run_id')}`, "
            f"{r0.get('date')}, git `{r0.get('git_sha')}` ({r0.get('git_state') or '?'}){load}; copy bandwidth "
            f"measured in the run: {float(r0.get('copy_gbps') or 0):.1f} GB/s.{note}")


def _loss_run_table(rs: list[dict]) -> str:
    ok = [r for r in rs if r.get("status") == "ok"]
    by_case: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in ok:
        by_case[_case_key(r)][r["provider"]] = r
    gpu = rs[0].get("device_type") == "cuda"
    header = ["shape", "K", "dtype", "mode", "provider", "median ms (p10-p90)", "min ms", "vs eager", "vs compiled",
              "GB/s", "% of floor", "peak extra MB (% of one input)"] + (["launches", "kernel ms"] if gpu else []) + [
              "allocated MB", "first call ms"]
    body = []
    for key in sorted(by_case):
        by = by_case[key]
        eager = _f(by["eager"], "median_ms") if "eager" in by else None
        comp = _f(by["compiled"], "median_ms") if "compiled" in by else None
        for p in LOSS_PROVIDERS:
            if p not in by:
                continue
            r = by[p]
            med = _f(r, "median_ms")
            pk, pkp = _f(r, "peak_extra_bytes"), _f(r, "peak_extra_pct_input")
            al = _f(r, "alloc_bytes")
            body.append([r["shape"], r["K"], r["dtype"], r["mode"], f"`{p}`",
                         f"{_ms(med)} ({_ms(_f(r, 'p10_ms'))}-{_ms(_f(r, 'p90_ms'))})", _ms(_f(r, "min_ms")),
                         _x(eager / med) if eager and med else "-",
                         _x(comp / med) if comp and med else "-",
                         f"{_f(r, 'gbps'):.1f}" if _f(r, "gbps") is not None else "-",
                         f"{_f(r, 'pct_floor'):.1f}%" if _f(r, "pct_floor") is not None else "-",
                         f"{pk / 1e6:.1f} ({pkp:.1f}%)" if pk is not None and pkp is not None else "-"]
                        + ([r.get("launches") or "-", _ms(_f(r, "kernel_ms"))] if gpu else [])
                        + [f"{al / 1e6:.1f}" if al is not None else "-", _ms(_f(r, "first_call_ms"))])
    text = _md_table(header, body) if body else "_No successful rows in this run._"
    sk = _skips(rs)
    if sk:
        text += "\n\nNot run in this run: " + "; ".join(f"`{p}` ({why})" for p, why in sk.items()) + "."
    return text


def _ratio_cells(rs: list[dict], num: str, den: str, mode: str = "full") -> dict[tuple, float]:
    """``median(num) / median(den)`` per case (den faster -> ratio > 1), same run only."""
    by: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rs:
        if r.get("status") == "ok" and r.get("mode") == mode:
            by[(r["shape"], r["K"], r["dtype"])][r["provider"]] = _f(r, "median_ms")
    return {k: v[num] / v[den] for k, v in by.items() if v.get(num) and v.get(den)}


def _cpu_goal_section(loss_runs: list[list[dict]]) -> str:
    runs = [rs for rs in loss_runs if rs[0].get("device_type") == "cpu" and rs[0].get("suite") == "cpu-sdxl"]
    lines = ["### CPU goal: the `cpu` kernel's fwd+bwd at `sdxl` (fp32 and bf16) at least as fast as "
             "`compiled` and at least 5x faster than `eager`, ratios from one run", ""]
    if not runs:
        return "\n".join(lines + [f"_{NYM}_ (no `cpu-sdxl` run in bench/results/loss.csv)."])
    lines += ["Verdicts compare medians of full fwd+bwd within one run. On a shared, loaded 2-core machine a "
              "verdict can change from run to run (the load average is given per run and per row); with 2 "
              "torch threads, OpenMP barriers stall whenever the other core is taken, so the 1-thread run "
              "is the steadier comparison. `git_state` dirty means the shared working tree had uncommitted "
              "changes (other engineers') when the run started; the backends measured are those built there "
              "at that time.", ""]
    for rs in runs:
        lines.append(_run_heading(rs))
        lines.append("")
        vs_eager = _ratio_cells(rs, "eager", "cpu")
        vs_comp = _ratio_cells(rs, "compiled", "cpu")
        comp_eager = _ratio_cells(rs, "eager", "compiled")
        body = []
        for K in sorted({r["K"] for r in rs}):
            for dt in ("fp32", "bf16"):
                k = ("sdxl", K, dt)
                e, c = vs_eager.get(k), vs_comp.get(k)
                body.append([dt, K,
                             _x(e) + (" (goal met)" if e and e >= 5 else " (goal missed)" if e else "") if e else NYM,
                             _x(c) + (" (goal met)" if c and c >= 1 else " (goal missed)" if c else "") if c else NYM,
                             _x(comp_eager.get(k)) if comp_eager.get(k) else NYM])
        lines.append(_md_table(["dtype", "K", "eager / cpu (goal >= 5x)", "compiled / cpu (goal >= 1x)",
                                "eager / compiled"], body))
        sk = _skips(rs)
        if "cpu" in sk:
            lines += ["", f"The `cpu` provider did not run: {sk['cpu']}."]
        lines.append("")
    return "\n".join(lines)


def _gpu_goal_section(loss_runs: list[list[dict]]) -> str:
    runs = [rs for rs in loss_runs if rs[0].get("device_type") == "cuda"]
    goals = [
        ("full fwd+bwd at `large` within 1.4x of the bytes floor (triton, cuda)", "floor"),
        (">= 5x faster than eager at every shape (full)", "eager"),
        (">= 1.2x faster than torch.compile at every shape (full)", "compiled"),
        ("at `sd15`, fwd+bwd in at most 4 kernel launches", "launches"),
        ("peak memory beyond inputs and gradient under 1% of one input", "peak"),
        ("CUDA kernels beat the Triton kernels", "cuda_vs_triton"),
    ]
    head = ["### GPU goals (H100)", ""]
    if not runs:
        body = [[g, NYM, NYM] for g, _ in goals]
        return "\n".join(head + [_md_table(["goal", "triton", "cuda"], body),
                                 "", "No GPU rows exist yet: run `bench/gpu_check.sh` on a GPU machine "
                                     "(see \"GPU check\" below) and import its CSV rows."])
    out = list(head)
    for rs in runs:
        out += [_run_heading(rs), ""]
        full = [r for r in rs if r.get("status") == "ok" and r.get("mode") == "full"]
        body = []
        for g, kind in goals:
            cells = []
            for p in ("triton", "cuda"):
                mine = [r for r in full if r["provider"] == p]
                if not mine:
                    cells.append(NYM)
                    continue
                if kind == "floor":
                    vals = [100.0 / _f(r, "pct_floor") for r in mine if r["shape"] == "large" and _f(r, "pct_floor")]
                    cells.append(", ".join(f"{v:.2f}x" for v in vals) or NYM)
                elif kind in ("eager", "compiled"):
                    rat = _ratio_cells(rs, kind, p)
                    cells.append(f"min {min(rat.values()):.2f}x over {len(rat)} cases" if rat else NYM)
                elif kind == "launches":
                    vals = [r.get("launches") for r in mine if r["shape"] == "sd15" and r.get("launches")]
                    cells.append(", ".join(vals) or NYM)
                elif kind == "peak":
                    vals = [_f(r, "peak_extra_pct_input") for r in mine if _f(r, "peak_extra_pct_input") is not None]
                    cells.append(f"max {max(vals):.2f}%" if vals else NYM)
                else:
                    rat = _ratio_cells(rs, "triton", "cuda")
                    cells.append((f"triton / cuda: min {min(rat.values()):.2f}x" if rat else NYM) if p == "cuda"
                                 else "-")
            body.append([g] + cells)
        out += [_md_table(["goal", "triton", "cuda"], body), ""]
    return "\n".join(out)


def _train_section(train_rows: list[dict]) -> str:
    lines = ["## Trainer throughput", ""]
    if not train_rows:
        return "\n".join(lines + [f"_{NYM}_: no rows in bench/results/train.csv (the `train` benchmark, "
                                  "`python -m bench train`)."])
    for rs in latest_runs(train_rows):
        lines += [_run_heading(rs).split(" copy bandwidth")[0], "", "```", _generic_summary(rs), "```", ""]
    return "\n".join(lines)


def _machines(rows: list[dict]) -> str:
    seen: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        seen[r.get("device", "?")].append(r)
    body = []
    for dev, rs in seen.items():
        r0 = rs[-1]
        runs = sorted({(r.get("date", ""), r.get("git_sha", "")) for r in rs})
        body.append([dev, r0.get("device_type", ""), r0.get("threads", ""), r0.get("driver") or "-",
                     r0.get("torch", ""), r0.get("triton") or "-", r0.get("cuda") or "-", r0.get("python", ""),
                     f"{len({r.get('run_id') for r in rs})} runs, {runs[0][0][:10]} .. {runs[-1][0][:10]}"])
    return _md_table(["device", "type", "threads", "driver", "torch", "triton", "CUDA", "Python", "rows from"], body)


def page(results_dir: Optional[str] = None) -> str:
    loss_rows = results.read_rows("loss", results_dir)
    train_rows = results.read_rows("train", results_dir)
    loss_runs = latest_runs(loss_rows)
    img = os.path.join(REPO, "docs", "img")
    parts = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python -m bench report` from bench/results/*.csv; edit bench/report.py, not this file. -->",
        "",
        "Every number on this page is a row of `bench/results/*.csv`, shown with the machine that measured it. "
        f"Anything nobody has measured says \"{NYM}\". Ratios are only taken between rows of the same run. "
        "The CPU rows come from a 2-core development machine that other engineers' builds and tests share "
        "while it runs: its numbers are noisy and slow in absolute terms; compare providers within a run only.",
        "",
        "## Reproduce",
        "",
        "```",
        "python -m bench loss                     # default suite for the device (gpu on CUDA, else cpu)",
        "python -m bench loss --suite cpu-sdxl    # the CPU comparison (a few minutes on 2 cores)",
        "python -m bench report && python -m bench plot   # this page and docs/img/bench_*.png",
        "bash bench/gpu_check.sh                  # the whole GPU check (build, tests, benchmarks), < 9 minutes",
        "pytest bench/test_loss_benchmark.py --benchmark-only   # pytest-benchmark entry points",
        "```",
        "",
        "## Machines",
        "",
        _machines(loss_rows + train_rows) if (loss_rows or train_rows) else f"_{NYM}_: no rows yet.",
        "",
        "## Goals",
        "",
        _cpu_goal_section(loss_runs),
        "",
        _gpu_goal_section(loss_runs),
        "",
        "## Loss benchmark: every provider, latest run per machine, suite and thread count",
        "",
        "Times are medians over rotating input sets (p10-p90 in brackets). `vs eager` / `vs compiled` are "
        "speedups over those providers in the same run (> 1 is faster). GB/s and `% of floor` count only the "
        "bytes that must move (forward: model, reference, annotators and the shared target read once; "
        "backward: model and target read, gradient written; full: both) against the device-copy bandwidth "
        "measured at the start of the same run (on a loaded CPU that copy can come out low, which puts some "
        "rows above 100%). Peak extra memory excludes the inputs and the returned gradient. "
        "Launches (GPU kernels, memsets, copies) and allocated bytes come from one call under the torch "
        "profiler. Config: `AdaptiveDPOConfig.paper()`, shared target, K annotators.",
        "",
    ]
    cpu_runs = [rs for rs in loss_runs if rs[0].get("device_type") != "cuda"]
    gpu_runs = [rs for rs in loss_runs if rs[0].get("device_type") == "cuda"]
    parts += ["### GPU", ""]
    if not gpu_runs:
        parts += [f"_{NYM}_ for every provider and shape (sd15, sdxl, large; K=0 and 2; bf16, fp32 at sdxl): "
                  "no GPU rows exist in bench/results/loss.csv yet.", ""]
    for rs in gpu_runs:
        parts += [_run_heading(rs), "", _loss_run_table(rs), ""]
    parts += ["### CPU", ""]
    if not cpu_runs:
        parts += [f"_{NYM}_.", ""]
    for rs in cpu_runs:
        parts += [_run_heading(rs), "", _loss_run_table(rs), ""]
    parts += [_train_section(train_rows), "", "## Charts", ""]
    charts = [("bench_loss_time.png", "time per shape and provider"),
              ("bench_loss_gbps.png", "achieved GB/s against the measured copy bandwidth"),
              ("bench_train.png", "trainer pairs/s")]
    have = [(f, t) for f, t in charts if os.path.exists(os.path.join(img, f))]
    parts += [f"![{t}](img/{f})" for f, t in have] or [f"_{NYM}_ (run `python -m bench plot`)."]
    parts += ["", "Charts show the same rows as the tables (`python -m bench plot`); each panel names its machine.",
              "", "## Method", "",
              "See bench/README.md. In short: warm-up before timing (the first fwd+bwd call, which includes "
              "compilation and autotuning, is reported separately); rotating input sets sized to at least twice "
              "the last-level cache; CUDA events around each call on GPU, `perf_counter_ns` on CPU; repetitions "
              "fill a time budget; each provider's loss and gradient are checked against the float64 reference "
              "on the same inputs (`loss_rel_err`, `grad_rel_err` columns).", ""]
    return "\n".join(parts)


def readme_block(results_dir: Optional[str] = None) -> str:
    """A short table for the README: full fwd+bwd median per provider, latest run per machine."""
    lines = []
    for rs in latest_runs(results.read_rows("loss", results_dir)):
        r0 = rs[0]
        if r0.get("suite") == "tiny":
            continue
        full = [r for r in rs if r.get("status") == "ok" and r.get("mode") == "full"]
        if not full:
            continue
        provs = [p for p in LOSS_PROVIDERS if any(r["provider"] == p for r in full)]
        by: dict[tuple, dict[str, dict]] = defaultdict(dict)
        for r in full:
            by[_case_key(r)][r["provider"]] = r
        threads = f", {r0['threads']} torch thread(s)" if r0.get("device_type") == "cpu" and r0.get("threads") else ""
        lines += [f"Full fwd+bwd, median ms, {r0['device']}{threads} ({r0['date'][:10]}, suite `{r0['suite']}`, "
                  f"git `{r0.get('git_sha', '?')[:12]}`, load average {r0.get('loadavg', '?')} at start):", ""]
        body = [[next(iter(v.values()))["shape"], next(iter(v.values()))["K"], next(iter(v.values()))["dtype"]]
                + [_ms(_f(v[p], "median_ms")) if p in v else "-" for p in provs] for _, v in sorted(by.items())]
        lines += [_md_table(["shape", "K", "dtype"] + provs, body), ""]
    lines.append("GPU: " + ("see docs/benchmarks.md" if any(r[0].get("device_type") == "cuda" for r in
                                                          latest_runs(results.read_rows("loss", results_dir)))
                            else NYM) + ". Details and machines: docs/benchmarks.md.")
    return "\n".join(lines)


def write_page(output: Optional[str] = None, results_dir: Optional[str] = None) -> str:
    path = output or DOC
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(page(results_dir))
    readme = os.path.join(REPO, "README.md")
    if output is None and os.path.exists(readme):
        text = open(readme).read()
        if BEGIN in text and END in text:  # the README owner places the markers; we fill them
            head, rest = text.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            with open(readme, "w") as f:
                f.write(head + BEGIN + "\n" + readme_block(results_dir) + "\n" + END + tail)
    return path
