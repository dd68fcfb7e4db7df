"""``python -m bench <command>`` (also installed as ``adpo-bench``).

Benchmarks (each appends rows to ``<results dir>/<name>.csv``; ``--results-dir``, by default
``bench/results`` under the current directory, the repository's folder when run from its root):

    loss     the fused loss: eager / compiled / triton / cuda / cpu providers (bench/loss.py)
    train    trainer throughput: the trainer's own step vs the published loop (bench/train.py), when present
    memory   memory per GPU of parameters, gradients, AdamW, reference and EMA: DDP vs FSDP (bench/memory.py)
    data     Pick-a-Pic data path: cache build pairs/s by decode workers, RSS vs dataset size, bytes/pair,
             cached loader vs step rate (bench/data.py)
    experiment  DPO vs Adaptive-DPO on the toy at label-flip rates 0/0.2/0.4, scored by `adpo-train evaluate`

Tools:

    summary  a short table of the rows of one results folder (the latest run by default)
    report   regenerate docs/benchmarks.md from bench/results/*.csv
    plot     render docs/img/bench_*.png from bench/results/*.csv
    import   append rows from CSV files written elsewhere (the GPU check's $OUT) to bench/results/

A benchmark is a module ``bench/<name>.py`` listed in :data:`BENCHMARKS` that defines
``COLUMNS`` (its own columns, in order), ``add_arguments(parser)`` and
``run(args, env, log) -> list[dict]``; this file adds the common options, the machine
and version columns, and the writing (see bench/README.md).
"""
from __future__ import annotations

import argparse
import importlib
import sys

import torch

BENCHMARKS = {
    "loss": "fused loss forward/backward per provider",
    "train": "trainer throughput: baseline loop, DPO, Adaptive-DPO",
    "memory": "memory per GPU (params, grads, AdamW, reference, EMA): DDP vs FSDP, computed + tiny measured",
    "data": "data path: cache build pairs/s (0/1/2 decode workers), RSS at two sizes, bytes/pair, loader vs step",
    "experiment": "DPO vs Adaptive-DPO on the toy at flip rates 0/0.2/0.4, scored by adpo-train evaluate (CIs)",
}


def _load(name: str):
    try:
        return importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"bench.{name}":
            return None
        raise


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when visible)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="shorter measurements (the GPU check uses this)")
    p.add_argument("--results-dir",
                   help="where <bench>.csv is appended (default: bench/results under the current directory)")
    p.add_argument("--note", default="", help="free text stored in every row (e.g. machine load)")
    p.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adpo-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, doc in BENCHMARKS.items():
        mod = _load(name)
        p = sub.add_parser(name, help=doc if mod else doc + " [not written yet]")
        _common(p)
        if mod is not None:
            mod.add_arguments(p)
    p = sub.add_parser("summary", help="short table of a results folder")
    p.add_argument("--results-dir")
    p.add_argument("--all-runs", action="store_true", help="every run, not just the latest per machine")
    p = sub.add_parser("report", help="regenerate docs/benchmarks.md")
    p.add_argument("--output", help="default docs/benchmarks.md")
    p.add_argument("--results-dir")
    p = sub.add_parser("plot", help="render docs/img/bench_*.png")
    p.add_argument("--outdir", help="default docs/img")
    p.add_argument("--results-dir")
    p = sub.add_parser("import", help="append rows from CSVs written elsewhere")
    p.add_argument("files", nargs="+")
    p.add_argument("--results-dir")
    return parser


def run_benchmark(name: str, args: argparse.Namespace, log=print) -> list[dict]:
    """Run benchmark ``name`` and append its rows; returns the rows (with env columns)."""
    from . import harness, report, results

    mod = _load(name)
    if mod is None:
        raise SystemExit(f"`{name}` is not written yet: add bench/{name}.py with COLUMNS, add_arguments(parser) "
                         f"and run(args, env, log) (see bench/README.md)")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = harness.env_info(device, args.note)
    rows = mod.run(args, env, log)
    full = [{**env, **r} for r in rows]
    if not args.dry_run:
        path = results.append_rows(name, rows, env, mod.COLUMNS, args.results_dir)
        log(f"{len(rows)} rows appended to {path}")
    log(report.summary_table(full))
    return full


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in BENCHMARKS:
        rows = run_benchmark(args.command, args)
        # a benchmark may also be a check (bench/experiment.py --min-win-ci-lo): rows first, then the verdict
        failure = getattr(_load(args.command), "check", lambda a, r: None)(args, rows)
        if failure:
            print(f"adpo-bench {args.command}: {failure}", file=sys.stderr)
            return 1
        return 0
    from . import report, results

    if args.command == "summary":
        print(report.summary(args.results_dir, latest_only=not args.all_runs))
    elif args.command == "report":
        path = report.write_page(args.output, args.results_dir)
        print(f"wrote {path}")
    elif args.command == "plot":
        from . import plot

        for path in plot.render_all(args.outdir, args.results_dir):
            print(f"wrote {path}")
    elif args.command == "import":
        for f in args.files:
            path, n = results.import_rows(f, args.results_dir)
            print(f"{n} new rows from {f} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
