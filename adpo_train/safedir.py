"""Folders the package writes, and never deletes unless it made them.

A folder the package creates (a latent cache, a toy model) carries a marker file.  It is
built under ``<final>.tmp`` and renamed into place when complete; an existing folder is
replaced only if it is empty or carries the marker, and a stale ``.tmp`` folder is removed
only if it carries the marker too.  Anything else is refused with a :class:`UserError`
naming the flag, so pointing ``--latent_cache`` at a dataset folder loses nothing.
"""
from __future__ import annotations

import json
import os
import shutil

from .errors import UserError

MARKER = ".adpo-train-owned"


def owned(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def check_replaceable(path: str, flag: str) -> None:
    """Raise unless ``path`` is absent, an empty folder, or a folder this package wrote."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        raise UserError(f"{flag}: {path!r} exists and is not a folder; choose another path")
    if os.listdir(path) and not owned(path):
        raise UserError(f"{flag}: {path!r} is not empty and was not written by adpo-train; refusing to replace "
                        f"it (choose a new folder or empty this one)")


def begin(final: str, flag: str, kind: str, keep: bool = False) -> str:
    """Check ``final`` and its stale temp folder, create ``<final>.tmp`` with the marker, return it.

    ``keep``: a stale ``.tmp`` this package wrote is kept as it is (a build that continues it); without
    it, removed.  The caller holds the folder's lock (:mod:`adpo_train.locks`), so the ``.tmp`` is never
    another live process's."""
    check_replaceable(final, flag)
    tmp = final.rstrip("/") + ".tmp"
    check_replaceable(tmp, flag + " (temporary folder)")
    if keep and owned(tmp):
        return tmp
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, MARKER), "w") as f:
        f.write(f"{kind} written by adpo-train; the package may replace this folder\n")
    return tmp


def commit(tmp: str, final: str) -> str:
    """Move the complete ``tmp`` into place; a previous ``final`` (checked by :func:`begin`) is removed
    only after the new folder is in place."""
    final = final.rstrip("/")
    old = None
    if os.path.lexists(final):
        old = final + ".old"
        if os.path.lexists(old) and owned(old):
            shutil.rmtree(old)
        os.replace(final, old) if not os.path.lexists(old) else shutil.rmtree(final)
    os.replace(tmp, final)
    if old and os.path.isdir(old):
        shutil.rmtree(old, ignore_errors=True)
    return final


def fsync_dir(path: str) -> None:
    """fsync a folder (a rename in it is durable after); a filesystem that refuses it is left alone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str, obj, end: str = "", **dump_kw) -> None:
    """Write ``obj`` as JSON to ``path`` atomically: a complete file under its name, or the old one."""
    part = path + ".partial"  # (a build's leftovers of that name are swept, cache.py)
    with open(part, "w") as f:
        json.dump(obj, f, **dump_kw)
        f.write(end)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)
