"""Every multi-process run of the tests and benchmarks: ``torchrun`` with each rank's output in its
own log, and a failure message that quotes each rank's first error.

``torchrun(argv, log_dir)`` runs ``python -m torch.distributed.run --standalone --nproc_per_node N
--log-dir <log_dir> --redirects 3 <argv>``:

* ``--standalone`` rendezvouses on ``localhost:0``: the agent binds a port the kernel picks, free at
  that moment, and the ranks connect to the agent's own store there (torch's "agent store"), so runs
  that start side by side never share a port and no port is chosen, released and bound again;
* ``--redirects 3``: rank r's stdout and stderr go to ``<log_dir>/<run id>/attempt_0/<r>/{stdout,stderr}.log``
  and nothing of theirs is lost when the launcher keeps only a tail or kills a rank;
* ``PYTHONFAULTHANDLER=1``: a rank killed by a fatal signal (SIGABRT from a C++ ``std::terminate``,
  SIGSEGV) writes every thread's Python stack to its own stderr log before it dies.

On a non-zero exit :class:`RanksFailed` names each rank's first error (the first traceback, C++
``terminate called`` / ``what():`` line, or fatal-signal report in its log, with what follows it), then
the launcher's own summary.  Only a failed rendezvous (the store's port taken between the bind and
the listen, recognised in the launcher's log, before any rank ran) is retried, once.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The start of an error in a rank's log: a Python traceback, a C++ exception escaping to std::terminate
# (gloo's "terminate called without an active exception"), a fatal-signal report of faulthandler or
# the C runtime, or a one-line error a CLI prints instead of a traceback; torchrun may prefix a rank's
# lines with "[rank0]:".
FIRST_ERROR = re.compile(r"^(?:\[(?:rank|default)\d+\]: ?)?"
                         r"(Traceback \(most recent call last\)|terminate called|\s*what\(\):|Fatal Python error"
                         r"|Aborted|Segmentation fault|\*\*\* |[\w.-]*: error: )", re.M)
# A rendezvous that never formed: the only failure that is retried (nothing of the run has started).
RENDEZVOUS_FAILED = re.compile(r"EADDRINUSE|[Aa]ddress already in use|RendezvousConnectionError|"
                               r"RendezvousTimeoutError|The server socket has failed to listen")
ERROR_LINES, ERROR_CHARS = 40, 4000


@dataclasses.dataclass
class Ranks:
    """A finished launch: ``stdout``/``stderr`` are the ranks' logs in rank order (the launcher's
    stderr first in ``stderr``); ``logs[r]`` is rank r's log folder."""
    returncode: int
    stdout: str
    stderr: str
    logs: list
    cmd: list


class RanksFailed(AssertionError):
    """A launch that exited non-zero; the message holds each rank's first error."""


def first_error(text: str) -> str:
    """The first error in one rank's log and what follows it (at most ``ERROR_LINES`` lines), or ``''``."""
    m = FIRST_ERROR.search(text)
    if m is None:
        return ""
    return "\n".join(text[m.start():].splitlines()[:ERROR_LINES])[:ERROR_CHARS]


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def failure_message(res: Ranks, launcher_err: str) -> str:
    parts = [f"{len(res.logs)}-process run failed (exit {res.returncode}): {' '.join(res.cmd)}"]
    for r, d in enumerate(res.logs):
        err = _read(os.path.join(d, "stderr.log"))
        found = first_error(err) or first_error(_read(os.path.join(d, "stdout.log")))
        tail = "\n".join(err.splitlines()[-8:])
        parts.append(f"--- rank {r} ({d}): " + (f"first error:\n{found}" if found else
                                                 f"no error in its log; its stderr ends:\n{tail or '(empty)'}"))
    parts.append("--- launcher:\n" + "\n".join(launcher_err.splitlines()[-15:]))
    return "\n".join(parts)


def torchrun(argv, log_dir, nproc: int = 2, env: dict | None = None, cwd: str = REPO, timeout: float = 600,
             check: bool = True) -> Ranks:
    """Run ``argv`` (``["-m", "module", ...]`` or ``["script.py", ...]``) in ``nproc`` ranks under torchrun.

    ``env`` is added to this process's environment (with ``PYTHONPATH`` = the repository, one OpenMP
    thread per rank, faulthandler on).  ``check``: raise :class:`RanksFailed` on a non-zero exit.
    """
    full_env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", **(env or {}))
    for attempt in range(2):
        logs_at = os.path.join(str(log_dir), f"try{attempt}")
        os.makedirs(logs_at, exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "--log-dir", logs_at, "--redirects", "3", *map(str, argv)]
        proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
        logs = [sorted(glob.glob(os.path.join(logs_at, "*", "attempt_*", str(r))))[-1:] for r in range(nproc)]
        logs = [d[0] if d else os.path.join(logs_at, "(none)", str(r)) for r, d in enumerate(logs)]
        outs = [_read(os.path.join(d, "stdout.log")) for d in logs]
        errs = [_read(os.path.join(d, "stderr.log")) for d in logs]
        res = Ranks(proc.returncode, proc.stdout + "".join(outs), proc.stderr + "".join(errs), logs, cmd)
        ran = any(outs) or any(errs)
        if proc.returncode != 0 and attempt == 0 and not ran and RENDEZVOUS_FAILED.search(proc.stderr):
            continue
        break
    if check and res.returncode != 0:
        raise RanksFailed(failure_message(res, proc.stderr))
    return res
