"""The trainer's commands the window runs as child processes (caption, sample, estimate, devices, inspect-model,
demo, remote): the window never imports torch, so it asks `python -m trainer ...` and reads what it prints."""

from __future__ import annotations

from PySide6.QtCore import QObject, QProcess

from .settings import REPO_ROOT


def trainer_child(parent: QObject, *, stdout=None, stderr=None, finished=None, error=None,
                  merged: bool = False) -> QProcess:
    """A QProcess owned by `parent`, to be started with a trainer command: it runs from the repository root
    (where `-m trainer` is found) and its output, end and failure to start go to the slots given. `merged`: one
    channel for stdout and stderr (a log to show as it is)."""
    process = QProcess(parent)
    process.setWorkingDirectory(str(REPO_ROOT))
    if merged:
        process.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
    for signal, slot in ((process.readyReadStandardOutput, stdout), (process.readyReadStandardError, stderr),
                         (process.finished, finished), (process.errorOccurred, error)):
        if slot is not None:
            signal.connect(slot)
    return process


def failure(code: int, status: QProcess.ExitStatus, stderr: bytes, what: str) -> str | None:
    """None when the command ended well; else why not, in one line: the last line it wrote to stderr (the
    trainer's one-line error), or its exit code."""
    if status == QProcess.ExitStatus.NormalExit and code == 0:
        return None
    lines = [line for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1] if lines else f"the {what} command stopped (exit code {code})"
