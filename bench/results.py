"""Result rows: appended to ``<results dir>/<bench>.csv``, one file per benchmark.

The results folder is ``--results-dir``, by default ``bench/results`` under the current
directory (the repository's own folder when run from its root), never the installed
package's folder: an installed ``bench`` does not write into site-packages.

Every row carries the machine and versions (:func:`bench.harness.env_info`), so a file
can hold rows from many machines and runs; nothing is ever overwritten.  When a
benchmark gains a column, the file is rewritten once with the union of the columns
(old rows get empty cells), so writers never have to agree on a schema in advance.
"""
from __future__ import annotations

import csv
import os
from typing import Iterable, Optional

RESULTS_DIR = os.path.join("bench", "results")  # relative: resolved against the current directory when used

# The columns every row of every benchmark has, first in every file.
ENV_COLUMNS = ["run_id", "date", "device", "device_type", "device_mem", "driver", "torch", "triton", "cuda",
               "python", "threads", "cpu", "cpu_cores", "loadavg", "git_sha", "git_state", "note"]


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def path_for(bench: str, results_dir: Optional[str] = None) -> str:
    return os.path.join(results_dir or RESULTS_DIR, f"{bench}.csv")


def read_rows(bench: str, results_dir: Optional[str] = None) -> list[dict]:
    path = path_for(bench, results_dir) if not bench.endswith(".csv") else bench
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_rows(bench: str, rows: Iterable[dict], env: dict, columns: Iterable[str] = (),
                results_dir: Optional[str] = None) -> str:
    """Append ``rows`` (each completed with ``env``) to ``<results_dir>/<bench>.csv``.

    ``columns`` gives the preferred order of the benchmark's own columns; any other key a
    row has is appended after them.  Returns the path written.
    """
    rows = [{**{k: env.get(k, "") for k in ENV_COLUMNS}, **r} for r in rows]
    path = path_for(bench, results_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cols = list(ENV_COLUMNS)
    for k in list(columns) + [k for r in rows for k in r]:
        if k not in cols:
            cols.append(k)
    old_cols, old_rows = None, []
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old_cols = list(reader.fieldnames or [])
            if any(c not in old_cols for c in cols):
                old_rows = list(reader)
    if old_cols is not None and all(c in old_cols for c in cols):
        with open(path, "a", newline="") as f:  # the common case: same schema, plain append
            w = csv.DictWriter(f, fieldnames=old_cols)
            for r in rows:
                w.writerow({k: _fmt(r.get(k)) for k in old_cols})
        return path
    if old_cols:
        cols = old_cols + [c for c in cols if c not in old_cols]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in old_rows:
            w.writerow({k: r.get(k, "") for k in cols})
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in cols})
    os.replace(tmp, path)
    return path


def import_rows(src: str, results_dir: Optional[str] = None) -> tuple[str, int]:
    """Append the rows of ``src`` (a CSV another machine wrote, e.g. the GPU check's
    ``$OUT/loss.csv``) to the file of the same name here, skipping rows already present."""
    bench = os.path.splitext(os.path.basename(src))[0]
    new = read_rows(src)
    have = {tuple(sorted(r.items())) for r in read_rows(bench, results_dir)}
    fresh = [r for r in new if tuple(sorted(r.items())) not in have]
    if not fresh:
        return path_for(bench, results_dir), 0
    env = {}
    cols = [c for c in (new[0].keys() if new else []) if c not in ENV_COLUMNS]
    return append_rows(bench, fresh, env, cols, results_dir), len(fresh)
