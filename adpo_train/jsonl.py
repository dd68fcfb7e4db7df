"""``metrics.jsonl`` and ``pairs.jsonl``: appends that are whole lines, and a reload that survives a
torn one.

:func:`append` writes complete lines with one ``write`` on an ``O_APPEND`` descriptor: a line lands
whole or, when the disk fills or the process dies inside the call, as a torn tail.  :func:`trim`
(on resume) keeps the records up to the resumed step, drops a torn or unparseable line with a note,
and replaces the file atomically.
"""
from __future__ import annotations

import errno
import json
import os

from .errors import UserError

_write = os.write  # (a test makes it fail with ENOSPC)


def append(path: str, records) -> None:
    """Append ``records`` (dicts) to ``path``, one JSON object a line, in one ``O_APPEND`` write."""
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    if not data:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:  # a regular file takes it in one go; the loop only covers a short write
            view = view[_write(fd, view):]
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise UserError(f"--output_dir: the disk is full (ENOSPC) while appending to {path}; free space and "
                            f"resume with --resume_from_checkpoint latest (a torn last line is dropped then)") from None
        raise
    finally:
        os.close(fd)


def read(path: str) -> tuple[list[dict], int]:
    """The records of ``path`` and how many lines were dropped (torn or not JSON)."""
    rows, bad = [], 0
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("torn")
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
            except ValueError:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
                bad += 1
                continue
            rows.append(rec)
    return rows, bad


def trim(path: str, last_step: int, log=print) -> None:
    """Keep the records of steps ``<= last_step`` (a resume), dropping torn lines with a note."""
    if not os.path.isfile(path):
        return
    rows, bad = read(path)
    if bad:
        log(f"note: dropped {bad} torn or unreadable line(s) of {path} (a write cut short by a crash or a full disk)")
    keep = [r for r in rows if isinstance(r.get("step"), int) and r["step"] <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
