"""The terminal of a headless run may go away (an SSH session that drops, a closed `tee` or `| head`): training goes on.

`attached(log)` puts streams in place of sys.stdout and sys.stderr that copy everything to the `--log` file (when
given) and stop writing to the terminal at its first failed write; SIGHUP detaches them the same way instead of
ending the process. events.jsonl is written by the reporter either way, so nothing is lost with the terminal.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path


class _Tee(io.TextIOBase):
    """A text stream to the terminal (while it lasts) and to the log file."""

    def __init__(self, terminal, log):
        self.terminal, self.log = terminal, log

    def write(self, text: str) -> int:
        if self.log is not None:
            self.log.write(text)
            self.log.flush()
        terminal = self.terminal  # SIGHUP may detach it between any two lines here
        if terminal is not None:
            try:
                terminal.write(text)
                terminal.flush()
            except (OSError, ValueError):  # EPIPE, EIO after a hang-up, or a stream already closed
                self.detach()
        return len(text)

    def flush(self) -> None:
        if self.log is not None:
            self.log.flush()

    def isatty(self) -> bool:
        # A progress bar redraws with carriage returns: only on a terminal, and never into the log file.
        return self.log is None and self.terminal is not None and self.terminal.isatty()

    def detach(self) -> None:
        """Stop writing to the terminal. Its descriptor is pointed at /dev/null: bytes still buffered there (flushed
        when the interpreter exits) and libraries that write to it directly then fail nowhere."""
        terminal, self.terminal = self.terminal, None
        if terminal is None:  # already detached (a failed write and SIGHUP both ask)
            return
        try:
            fd = terminal.fileno()
        except (AttributeError, OSError, ValueError):
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)


@contextmanager
def attached(log_path: str | None):
    """sys.stdout and sys.stderr survive their terminal inside this block; restored after it."""
    log = open(Path(log_path), "a", encoding="utf-8") if log_path else None
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
    streams = (sys.stdout, sys.stderr)

    def hang_up(signum, frame):
        for stream in streams:
            stream.detach()

    # Signal handlers belong to the main thread (and Windows has no SIGHUP).
    can_handle = hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGHUP, hang_up) if can_handle else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGHUP, previous)
        sys.stdout, sys.stderr = saved
        if log is not None:
            log.close()
