"""Render docs/img/bench_*.png from bench/results/*.csv (``python -m bench plot``).

* ``bench_loss_time.png``: median time per case, one line per provider, a panel per mode
  and per (machine, suite) -- the latest run of each; bars span p10-p90.
* ``bench_loss_gbps.png``: roofline-style: achieved GB/s (bytes floor / median) against
  the bytes that must move, with the copy bandwidth measured in the same run as the roof.
* ``bench_train.png``: trainer pairs/s per variant, when train rows exist.

The CI smoke suite (``tiny``) is never plotted.
"""
from __future__ import annotations

import os
from typing import Optional

from . import report, results

OUTDIR = os.path.join(report.REPO, "docs", "img")
COLORS = {"eager": "tab:gray", "compiled": "tab:blue", "triton": "tab:orange", "cuda": "tab:green",
          "cpu": "tab:red"}
MARKERS = {"forward": "o", "backward": "s", "full": "^"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _runs(bench: str, results_dir: Optional[str]) -> list[list[dict]]:
    return [rs for rs in report.latest_runs(results.read_rows(bench, results_dir))
            if rs[0].get("suite") != "tiny"]


def _title(rs: list[dict]) -> str:
    r0 = rs[0]
    threads = "" if r0.get("device_type") == "cuda" else f" - {r0.get('threads')} torch thread(s)"
    return f"{r0.get('device')}{threads} - suite {r0.get('suite')} - {r0.get('date', '')[:10]}"


def _label(r: dict) -> str:
    return f"{r['shape']}\nK={r['K']} {r['dtype']}"


def plot_time(runs, path: str) -> Optional[str]:
    if not runs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(runs), len(report.MODES), figsize=(5 * len(report.MODES), 3.6 * len(runs)),
                             squeeze=False)
    for i, rs in enumerate(runs):
        ok = [r for r in rs if r.get("status") == "ok"]
        cases = sorted({report._case_key(r)[:4] for r in ok})
        labels = {c: None for c in cases}
        for r in ok:
            labels[report._case_key(r)[:4]] = _label(r)
        for j, mode in enumerate(report.MODES):
            ax = axes[i][j]
            for p in report.LOSS_PROVIDERS:
                pts = [(cases.index(report._case_key(r)[:4]), report._f(r, "median_ms"), report._f(r, "p10_ms"),
                        report._f(r, "p90_ms")) for r in ok if r["provider"] == p and r["mode"] == mode]
                if not pts:
                    continue
                pts.sort()
                xs, ys = [q[0] for q in pts], [q[1] for q in pts]
                err = [[y - q[2] for y, q in zip(ys, pts)], [q[3] - y for y, q in zip(ys, pts)]]
                ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=2, label=p, color=COLORS.get(p))
            ax.set_yscale("log")
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels([labels[c] for c in cases], fontsize=7)
            ax.set_title(f"{mode}", fontsize=9)
            ax.set_ylabel("median ms (log)")
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.legend(fontsize=7)
        axes[i][1].annotate(_title(rs), xy=(0.5, 1.12), xycoords="axes fraction", ha="center", fontsize=9)
    return _save(plt, fig, path)


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _panels(runs, width: float, height: float):
    """``(plt, fig, [(axes, rows of one run)])``: one panel per run, side by side."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(width * len(runs), height), squeeze=False)
    return plt, fig, list(zip(axes[0], runs))


def plot_gbps(runs, path: str) -> Optional[str]:
    if not runs:
        return None
    plt, fig, panels = _panels(runs, 6.5, 4.4)
    for ax, rs in panels:
        ok = [r for r in rs if r.get("status") == "ok" and report._f(r, "gbps")]
        for p in report.LOSS_PROVIDERS:
            for mode in report.MODES:
                pts = [(report._f(r, "bytes_floor") / 1e6, report._f(r, "gbps")) for r in ok
                       if r["provider"] == p and r["mode"] == mode]
                if pts:
                    ax.scatter([q[0] for q in pts], [q[1] for q in pts], color=COLORS.get(p), marker=MARKERS[mode],
                               s=22, label=f"{p} {mode}", alpha=0.85)
        roof = report._f(rs[0], "copy_gbps")
        if roof:
            ax.axhline(roof, color="k", ls="--", lw=1)
            ax.annotate(f"copy bandwidth measured in the run: {roof:.0f} GB/s", xy=(0.02, roof), fontsize=7,
                        xycoords=("axes fraction", "data"), va="bottom")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bytes that must move per call (MB, log)")
        ax.set_ylabel("achieved GB/s = bytes floor / median (log)")
        ax.set_title(_title(rs), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    return _save(plt, fig, path)


def plot_train(runs, path: str) -> Optional[str]:
    runs = [[r for r in rs if r.get("status", "ok") == "ok" and report._f(r, "pairs_per_s")] for rs in runs]
    runs = [rs for rs in runs if rs]
    if not runs:
        return None
    plt, fig, panels = _panels(runs, 6, 3.8)
    for ax, rs in panels:
        names = [r.get("provider") or r.get("variant") or "?" for r in rs]
        ax.bar(range(len(rs)), [report._f(r, "pairs_per_s") for r in rs], color="tab:blue")
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels(names, fontsize=7, rotation=20)
        ax.set_ylabel("pairs/s")
        ax.set_title(_title(rs), fontsize=9)
    return _save(plt, fig, path)


def render_all(outdir: Optional[str] = None, results_dir: Optional[str] = None) -> list[str]:
    outdir = outdir or OUTDIR
    os.makedirs(outdir, exist_ok=True)
    loss = _runs("loss", results_dir)
    done = [plot_time(loss, os.path.join(outdir, "bench_loss_time.png")),
            plot_gbps(loss, os.path.join(outdir, "bench_loss_gbps.png")),
            plot_train(_runs("train", results_dir), os.path.join(outdir, "bench_train.png"))]
    return [p for p in done if p]
