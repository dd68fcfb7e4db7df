"""One writer per folder: an exclusive ``fcntl.flock`` that the kernel releases when the process dies.

A training output folder and a latent cache are each written by one process (or one
multi-process run) at a time.  :func:`hold` takes an exclusive, non-blocking lock on a lock
file and writes the holder's pid into it; a second run gets a one-line :class:`UserError`
naming that pid.  The lock is released when the context exits or, after a crash or
``kill -9``, by the kernel, so a stale lock file never blocks a rerun.

Where the lock file lives: inside the folder for a folder that is never renamed (the training
output dir: ``<output_dir>/.adpo-train.lock``), beside it for one that is built under a temp
name and renamed into place (a latent cache: ``<cache>.lock``), see :func:`lock_path`.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os

from .errors import UserError

LOCK_NAME = ".adpo-train.lock"


def lock_path(folder: str, inside: bool) -> str:
    """The lock file of ``folder``: inside it, or beside it as ``<folder>.lock``."""
    folder = os.path.abspath(folder.rstrip("/"))
    return os.path.join(folder, LOCK_NAME) if inside else folder + ".lock"


def holder_pid(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip() or "unknown"
    except OSError:
        return "unknown"


def _refusal(path: str, what: str, flag: str) -> UserError:
    return UserError(f"{flag}: the {what} is in use by another adpo-train process (pid "
                     f"{holder_pid(path)}); wait for it to finish or choose another folder")


def _flock(fd: int, mode: int, path: str, what: str, flag: str) -> None:
    """``flock(fd, mode)`` without waiting; held by another process: the one-line refusal."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise _refusal(path, what, flag) from None


def probe(path: str, what: str, flag: str) -> None:
    """Raise :func:`hold`'s refusal if another process holds ``path`` now, without taking it: a shared
    lock, dropped at once, so that every rank of a multi-process run can check (and refuse alike)
    before the main process takes the exclusive one."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        _flock(fd, fcntl.LOCK_SH, path, what, flag)
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold(path: str, what: str, flag: str):
    """Hold an exclusive lock on the file ``path`` (created if missing) for the ``with`` block.

    ``what`` names the folder in the refusal (e.g. ``"output folder /runs/a"``), ``flag`` the
    command-line flag that chose it.  Raises :class:`UserError` when another process holds it.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _flock(fd, fcntl.LOCK_EX, path, what, flag)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        yield path
    finally:
        os.close(fd)   # closing the descriptor releases the flock
