"""Run → Devices…: which GPUs a run started from the window uses, and how (one; data-parallel, FSDP or DeepSpeed
ZeRO-2 over several).

A window setting, not a job field: the job says what to train and stays the same on any hardware. The GPUs, and
whether DeepSpeed is installed, are asked of the trainer (`python -m trainer devices --json`), so the window never
imports torch.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QButtonGroup, QDialog, QDialogButtonBox, QLabel, QListWidget, QListWidgetItem,
                               QRadioButton, QVBoxLayout)

from .child import trainer_child
from .settings import REPO_ROOT, settings

MODES = {"one": "One GPU", "data_parallel": "Data-parallel: every chosen GPU trains its share of each batch",
         "fsdp": "FSDP: a full fine-tune split across the chosen GPUs (weights, gradients, optimizer state)",
         "deepspeed": "DeepSpeed ZeRO-2: optimizer state and gradients split across the chosen GPUs"}
# The shipped accelerate config each sharded mode launches with (presets/accelerate/, see the README).
CONFIGS = {"fsdp": "fsdp.yaml", "deepspeed": "deepspeed_zero2.yaml"}


@dataclass(frozen=True)
class Launch:
    mode: str = "one"
    gpus: tuple[int, ...] = ()  # empty: the trainer's default device (the first GPU, else the CPU)

    def command(self, prefix: list[str]) -> tuple[list[str], dict[str, str]]:
        """The trainer command `prefix` (interpreter first) under this launch, and the environment it adds.
        Data-parallel runs it under torchrun with one process per chosen GPU, on a free port; FSDP and DeepSpeed
        under `accelerate launch` with their shipped config."""
        env = {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in self.gpus)} if self.gpus else {}
        if self.mode == "one" or len(self.gpus) < 2:
            return list(prefix), env
        python, rest, count = prefix[0], prefix[1:], str(len(self.gpus))
        if self.mode in CONFIGS:
            config = REPO_ROOT / "presets" / "accelerate" / CONFIGS[self.mode]
            return [python, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
                    count, "--main_process_port", "0", *rest], env
        return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", count, *rest], env

    def describe(self) -> str:
        if not self.gpus:
            return "the default device"
        names = ", ".join(str(i) for i in self.gpus)
        how = {"data_parallel": "data-parallel", "fsdp": "FSDP", "deepspeed": "DeepSpeed ZeRO-2"}.get(self.mode)
        return f"GPU {names}" if how is None or len(self.gpus) == 1 else f"{how} on GPUs {names}"


def saved_launch() -> Launch:
    s = settings()
    mode = str(s.value("launch/mode", "one"))
    raw = str(s.value("launch/gpus", ""))
    gpus = tuple(int(p) for p in raw.split(",") if p.strip().isdigit())
    return Launch(mode if mode in MODES else "one", gpus)


def save_launch(launch: Launch) -> None:
    s = settings()
    s.setValue("launch/mode", launch.mode)
    s.setValue("launch/gpus", ",".join(str(i) for i in launch.gpus))


class DevicesDialog(QDialog):
    """The GPUs the trainer sees, as a checklist, and the mode; OK returns the chosen Launch."""

    def __init__(self, launch: Launch, parent=None, devices_command: list[str] | None = None):
        super().__init__(parent)
        self.setWindowTitle("Devices")
        self.launch = launch
        self.status = QLabel("asking the trainer which GPUs it sees…")
        self.status.setWordWrap(True)
        self.gpu_list = QListWidget()
        self.modes = QButtonGroup(self)
        layout = QVBoxLayout(self)
        layout.addWidget(self.status)
        layout.addWidget(self.gpu_list)
        for key, text in MODES.items():
            button = QRadioButton(text)
            button.setObjectName(key)
            button.setChecked(key == launch.mode)
            self.modes.addButton(button)
            layout.addWidget(button)
        self._deepspeed = self.findChild(QRadioButton, "deepspeed")
        self._deepspeed.setEnabled(False)  # until the trainer says DeepSpeed is installed
        layout.addWidget(QLabel("Several machines start from the command line: see the README's \"Several GPUs "
                                "and machines\"; File → Open run folder follows such a run."))
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)
        self._out = b""
        self.process = trainer_child(self, stdout=self._read, finished=self._listed)
        command = devices_command or [sys.executable, "-m", "trainer", "devices", "--json"]
        self.process.start(command[0], command[1:])

    def chosen(self) -> Launch:
        gpus = tuple(int(self.gpu_list.item(i).data(Qt.ItemDataRole.UserRole)) for i in range(self.gpu_list.count())
                     if self.gpu_list.item(i).checkState() == Qt.CheckState.Checked)
        checked = self.modes.checkedButton()
        mode = checked.objectName() if checked is not None else "one"
        if mode == "one":
            gpus = gpus[:1]
        return Launch(mode, gpus)

    def _read(self) -> None:
        self._out += bytes(self.process.readAllStandardOutput())

    def _listed(self, code: int, _status) -> None:
        self._read()
        try:
            answer = json.loads(self._out.decode("utf-8", "replace").strip().splitlines()[-1])
            gpus = answer["gpus"]
        except (ValueError, IndexError, KeyError, TypeError):
            err = bytes(self.process.readAllStandardError()).decode("utf-8", "replace").strip().splitlines()
            self.status.setText(f"the trainer could not list its GPUs (exit {code}): {err[-1] if err else 'no output'}")
            return
        self._deepspeed.setEnabled(bool(answer.get("deepspeed")))
        if not self._deepspeed.isEnabled():
            self._deepspeed.setText(MODES["deepspeed"] + " (DeepSpeed is not installed for the trainer)")
            if self._deepspeed.isChecked():
                self.findChild(QRadioButton, "one").setChecked(True)
        for gpu in gpus:
            item = QListWidgetItem(f"{gpu['index']}: {gpu['name']} ({gpu['memory_gib']:g} GiB)")
            item.setData(Qt.ItemDataRole.UserRole, int(gpu["index"]))
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if gpu["index"] in self.launch.gpus else Qt.CheckState.Unchecked)
            self.gpu_list.addItem(item)
        self.status.setText(f"{len(gpus)} GPU(s) seen by the trainer; tick the ones a run uses (none: the first)"
                            if gpus else "no CUDA GPU seen by the trainer: runs train on the CPU")
