"""SIGINT (Ctrl-C) and SIGTERM (a cluster's pre-emption) stop the run at the next step boundary.

:class:`StopRequest` records the signal instead of raising in the middle of a step; the
trainer checks :attr:`StopRequest.signum` after each optimisation step, writes a checkpoint
and raises :class:`adpo_train.errors.Interrupted` (exit code 128 + signal).  A second
Ctrl-C while waiting interrupts at once.  Before :meth:`StopRequest.arm` (loading models,
building a cache: nothing to checkpoint yet) a signal stops at once, as by default.  Handlers are
only installed from the main thread (Python's rule) and are restored on exit.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional


class StopRequest:
    def __init__(self, log=print):
        self.signum: Optional[int] = None
        self.armed = False
        self._log, self._old = log, {}

    def arm(self) -> None:
        """From now on a signal waits for the step boundary."""
        self.armed = True

    def _handle(self, signum, frame):
        if not self.armed or (self.signum is not None and signum == signal.SIGINT):
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # before training, or a second Ctrl-C: stop now, no checkpoint
            raise SystemExit(128 + signum)
        self.signum = signum
        self._log(f"\n{signal.Signals(signum).name}: stopping after this step (checkpoint, then exit); "
                  f"press Ctrl-C again to stop at once")

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
