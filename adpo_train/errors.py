"""User errors and exit codes of ``adpo-train``.

A :class:`UserError` is a mistake in the command line or the inputs (a missing file, a
folder the trainer must not overwrite, a dataset with no usable pair).  The command line
prints it as one or two lines and exits with :attr:`UserError.exit_code`; ``--debug`` or
``ADPO_TRAIN_DEBUG=1`` shows the traceback instead.  Anything else is a bug and keeps its
traceback.

Exit codes: 0 done; 1 an unexpected error (a traceback); 2 a user error (as argparse);
3 the run ended before ``--max_train_steps`` (its outputs are written); 128 + signal
number for SIGINT (130) and SIGTERM (143), after the checkpoint at the step boundary.
"""
from __future__ import annotations

import os

EXIT_USER = 2
EXIT_CUT_SHORT = 3
DEBUG_ENV = "ADPO_TRAIN_DEBUG"


class UserError(ValueError):
    """A mistake the user can fix: printed without a traceback, exit code 2."""

    exit_code = EXIT_USER


class MissingInput(UserError, FileNotFoundError):
    """A file or folder named on the command line does not exist or is not what is expected."""


class RunCutShort(UserError):
    """The run stopped before ``--max_train_steps`` (too few usable batches); outputs are written."""

    exit_code = EXIT_CUT_SHORT


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written at the step boundary (``path``, may be None)."""

    def __init__(self, signum: int, step: int, checkpoint, resume_hint: str):
        import signal

        name = signal.Signals(signum).name
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (no step finished)"
        super().__init__(f"{name} at step {step}: wrote {where}. {resume_hint}")
        self.signum, self.exit_code, self.checkpoint = signum, 128 + signum, checkpoint


def debug_enabled(argv) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
