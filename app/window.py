"""The main window: menus and toolbar, the job editor on the left, the dataset and the run on the right.

It owns the trainer process (app/trainer_process.py) and a run-folder follower (app/run_folder.py) and
wires their signals to the widgets' slots. Questions to the user go through `ask`, so tests can answer.
"""

from __future__ import annotations

import json
from pathlib import Path

from PySide6.QtCore import QByteArray, QProcess, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import QAction, QDesktopServices, QIcon, QKeySequence
from PySide6.QtWidgets import QComboBox, QFileDialog, QInputDialog, QLabel, QMainWindow, QMessageBox, QSplitter, \
    QStyle, QTabWidget, QToolBar

from trainer.data.files import scan_dataset
from trainer.events import COMMAND_DIR, read_events
from trainer.imports.command import import_files
from trainer.job import (DEMO_METHODS, PRESETS_DIR, Job, JobError, from_sparse, list_presets, load_job, run_leftovers,
                         save_job, to_sparse)

from . import live_run
from .autosave import Autosave
from .child import trainer_child
from .dataset_view import DatasetView
from .devices import DevicesDialog, save_launch, saved_launch
from .essentials import EssentialsPage
from .estimate_panel import EstimatePanel
from .job_form import JobForm
from .queue_panel import QueuePanel
from .remote_panel import RemotePanel
from .run_folder import RunFolder
from .run_panel import RunPanel
from .settings import APPLICATION, RESOURCES, REPO_ROOT, autosave_path, data_dir, settings, user_presets_dir
from .trainer_process import TrainerProcess
from .try_panel import TryPanel

_ICONS = QStyle.StandardPixmap
STATE_TEXT = {"idle": "Idle", "starting": "Starting the trainer…", "running": "Training",
              "stopping": "Stopping (saving a checkpoint)…"}


class MainWindow(QMainWindow):
    demoReady = Signal(str)  # the demo's job.json, loaded into the editor

    def __init__(self, trainer_command: list[str] | None = None, restore: bool = True):
        super().__init__()
        self.setWindowTitle(f"{APPLICATION}[*]")  # [*]: the unsaved-changes mark
        self.setWindowIcon(QIcon(str(RESOURCES / "icon.png")))
        self.setAcceptDrops(True)
        self.current_preset = ""
        self.job: Job | None = None  # the valid job in the form, or None
        self.start_reasons: list[str] = []
        self.live_run_dir: Path | None = None
        self.paused = False  # the trainer said `paused` and not yet `continued`
        self._demo: QProcess | None = None  # `trainer demo` building in the background

        self.runner = TrainerProcess(self, trainer_command)
        self.runner.launch = saved_launch()
        self.devices_command: list[str] | None = None  # tests answer in place of `trainer devices --json`
        self.follower = RunFolder(self)
        self.form = JobForm()
        self.autosave = Autosave(self.form, autosave_path(), self)
        self.essentials = EssentialsPage(self.form)
        self.editor_tabs = QTabWidget()  # the essentials first; the whole schema a tab away
        self.editor_tabs.addTab(self.essentials, "Essentials")
        self.editor_tabs.addTab(self.form, "All settings")
        self.dataset = DatasetView(trainer_command=self.runner.command_prefix)
        self.run_panel = RunPanel()
        self.remote = RemotePanel(self)
        self.remote.job_file = self._remote_job
        self.try_panel = TryPanel(trainer_command=self.runner.command_prefix)
        self.try_panel.current_job = self.form.job_or_none
        self.queue = QueuePanel(self, self.runner)
        self.estimate = EstimatePanel(self.form, self)  # estimates only while its tab is shown
        self.tabs = QTabWidget()  # in the order of the work: the data, will it fit, the run, more runs, the result
        for widget, title in ((self.dataset, "Dataset"), (self.estimate, "Memory"), (self.run_panel, "Run"),
                              (self.queue, "Queue"), (self.try_panel, "Try"), (self.remote, "Remote")):
            self.tabs.addTab(widget, title)
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.addWidget(self.editor_tabs)
        self.splitter.addWidget(self.tabs)
        self.splitter.setStretchFactor(0, 0)
        self.splitter.setStretchFactor(1, 1)
        self.splitter.setSizes([600, 900])
        self.setCentralWidget(self.splitter)

        self._make_actions()
        self._make_menus_and_toolbar()
        self.state_label = QLabel(STATE_TEXT["idle"])
        self.reason_label = QLabel()
        self.reason_label.setStyleSheet("color: #b00000;")
        self.statusBar().addWidget(self.reason_label, 1)
        self.statusBar().addPermanentWidget(self.state_label)

        # Rescanning on every keystroke in a path would be wasteful: wait until typing pauses.
        self._scan_timer = QTimer(self)
        self._scan_timer.setSingleShot(True)
        self._scan_timer.setInterval(300)
        self._scan_timer.timeout.connect(self._rescan)

        self.form.changed.connect(self._on_form_changed)
        self.form.changed.connect(self.autosave.edited)
        self.autosave.dirtyChanged.connect(self.setWindowModified)
        self.dataset.scanned.connect(self._on_scanned)
        self.runner.stateChanged.connect(self._on_state)
        self.runner.eventReceived.connect(self.run_panel.add_event)
        self.runner.stderrText.connect(self.run_panel.append_output)
        self.runner.notice.connect(self._notice)
        self.runner.failed.connect(self._on_failed)
        self.runner.finished.connect(self._on_finished)
        self.runner.stalled.connect(self._on_stalled)
        self.runner.runStarted.connect(lambda e: self._notice(f"Run started: {e.get('total_steps')} steps"))
        self.runner.checkpointReceived.connect(lambda e: self._notice(f"Checkpoint saved at step {e['step']}"))
        self.runner.pauseChanged.connect(self._on_pause_changed)
        self.follower.eventsRead.connect(self.run_panel.add_events)
        self.follower.eventsRead.connect(self._on_followed)
        self.follower.failed.connect(self._notice)
        self.follower.eventsRead.connect(self.queue.followed)
        self.remote.runFolderReady.connect(self.open_run_folder)  # a remote run's mirror feeds the same run view

        self.resize(1400, 900)
        self._fill_preset_combo()
        if restore:
            self._restore_settings()
            self.autosave.mark_saved(self.current_preset)
            # Autosave and the unsaved-changes question belong to the user's settings: a window without them
            # (tests, one-off) neither reads nor leaves an autosave.
            QTimer.singleShot(0, self.offer_autosave)
            QTimer.singleShot(0, self.offer_to_follow)  # once shown: a run left going by an earlier window
            QTimer.singleShot(0, self.queue.offer_resume)  # or a queued job it was running, cut short
            QTimer.singleShot(0, self.remote.follow_recorded)  # and one on another machine
        self._on_form_changed()
        self._on_state("idle")

    # ---- actions, menus ------------------------------------------------------------------------------

    def _action(self, text: str, slot, shortcut=None, tip: str = "", icon=None) -> QAction:
        action = QAction(text, self)
        if icon is not None:
            action.setIcon(self.style().standardIcon(icon))
        if shortcut:
            action.setShortcut(QKeySequence(shortcut))
            tip = f"{tip} ({QKeySequence(shortcut).toString(QKeySequence.SequenceFormat.NativeText)})"
        action.setToolTip(tip.strip())
        action.setStatusTip(tip.strip())
        action.triggered.connect(slot)
        return action

    def _make_actions(self) -> None:
        self.act_open_preset = self._action("&Load preset…", self.load_preset_dialog, QKeySequence.StandardKey.Open,
                                            "Load a preset or job file into the editor")
        self.act_import = self._action("&Import…", self.import_dialog, "Ctrl+I",
                                       "Import a kohya_ss, OneTrainer, SimpleTuner or ai-toolkit config (with "
                                       "its dataset file) into the editor, with a report of what mapped")
        self.act_save_preset = self._action("&Save preset…", self.save_preset_dialog, QKeySequence.StandardKey.Save,
                                            "Save the editor as a preset (only what differs from the defaults)")
        self.act_save_job = self._action("Save &job file…", self.save_job_dialog, "Ctrl+Shift+S",
                                         "Save the full job file, to run headless with `python -m trainer run`")
        self.act_open_run = self._action("&Open run folder…", self.open_run_folder_dialog, "Ctrl+Shift+O",
                                         "Show the plot, samples and log of a run folder (follows a live run)", _ICONS.SP_DirOpenIcon)
        self.act_demo = self._action("Create &demo job…", self.create_demo_dialog, None,
                                     "Build a tiny model and dataset (about 2 MB) and load a job that trains on them "
                                     "in a minute on a CPU")
        self.act_quit = self._action("&Quit", self.close, QKeySequence.StandardKey.Quit, "Quit")
        self.act_start = self._action("&Start", self.start, "F5", "Start training", _ICONS.SP_MediaPlay)
        self.act_stop = self._action("S&top", self.stop, "Shift+F5",
                                     "Stop: the trainer saves a resumable checkpoint and exits", _ICONS.SP_MediaStop)
        self.act_save_now = self._action("Save &checkpoint now", lambda: self._command("save"), "F6",
                                         "Ask the trainer to save a checkpoint at its next step", _ICONS.SP_DialogSaveButton)
        self.act_sample_now = self._action("Sa&mple now", lambda: self._command("sample"), "F7",
                                           "Ask the trainer to render validation images at its next step", _ICONS.SP_FileDialogContentsView)
        self.act_sample_prompts = self._action("Sample &prompts…", self.sample_prompts_dialog, "Ctrl+F7",
                                               "Render prompts you type now (one a line) instead of the validation "
                                               "prompts, at the next step or while paused")
        self.act_pause = self._action("&Pause", self._toggle_pause, "F8",
                                      "Pause: the trainer keeps the model loaded and steps nothing; Save and Sample "
                                      "still work. Press again to continue, exactly where it was",
                                      _ICONS.SP_MediaPause)
        self.act_devices = self._action("&Devices…", self.devices_dialog, None,
                                        "Which GPUs a run uses, and how (one, or data-parallel)")
        self.act_kill = self._action("&Kill trainer", self.runner.kill, None,
                                     "End the trainer at once, without a checkpoint")
        self.act_open_output = self._action("Show run folder in file manager", self._open_run_dir, None,
                                            "Open the run folder in the system's file manager")
        self.act_readme = self._action("&README", lambda: QDesktopServices.openUrl(
            QUrl.fromLocalFile(str(REPO_ROOT / "README.md"))), "F1", "Open the README")
        for action in (self.act_start, self.act_stop, self.act_pause, self.act_save_now, self.act_sample_now,
                       self.act_sample_prompts):
            action.setShortcutContext(Qt.ShortcutContext.ApplicationShortcut)

    def devices_dialog(self) -> None:
        """Run → Devices…: the choice applies to the next Start and is remembered; the job is not touched."""
        dialog = DevicesDialog(self.runner.launch, self, self.devices_command)
        if dialog.exec() == DevicesDialog.DialogCode.Accepted:
            self.runner.launch = dialog.chosen()
            save_launch(self.runner.launch)
            self.statusBar().showMessage(f"runs start on {self.runner.launch.describe()}", 5000)

    def _make_menus_and_toolbar(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        for action in (self.act_demo, None, self.act_open_preset, self.act_import, self.act_save_preset,
                       self.act_save_job, None, self.act_open_run, self.act_open_output, None, self.act_quit):
            file_menu.addSeparator() if action is None else file_menu.addAction(action)
        run_menu = self.menuBar().addMenu("&Run")
        for action in (self.act_start, self.act_stop, self.act_pause, None, self.act_save_now,
                       self.act_sample_now, self.act_sample_prompts, None, self.act_devices, None, self.act_kill):
            run_menu.addSeparator() if action is None else run_menu.addAction(action)
        help_menu = self.menuBar().addMenu("&Help")
        help_menu.addAction(self.act_readme)
        help_menu.addAction(self.act_demo)

        toolbar = QToolBar("Main")
        toolbar.setObjectName("main-toolbar")
        toolbar.setMovable(False)
        toolbar.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.addToolBar(toolbar)
        toolbar.addWidget(QLabel(" Preset: "))
        self.preset_combo = QComboBox()
        self.preset_combo.setMinimumWidth(180)
        self.preset_combo.setToolTip("Built-in presets (presets/) and your own (saved with Save preset)")
        self.preset_combo.activated.connect(self._on_preset_chosen)
        toolbar.addWidget(self.preset_combo)
        for action in (self.act_open_preset, self.act_save_preset, self.act_save_job, None, self.act_start,
                       self.act_stop, self.act_pause, self.act_save_now, self.act_sample_now, None,
                       self.act_open_run):
            toolbar.addSeparator() if action is None else toolbar.addAction(action)

    # ---- presets and job files -----------------------------------------------------------------------

    def _fill_preset_combo(self) -> None:
        self.preset_combo.clear()
        self.preset_combo.addItem("(choose a preset)", "")
        for name in list_presets():
            self.preset_combo.addItem(name, str(PRESETS_DIR / f"{name}.json"))
        for path in sorted(user_presets_dir().glob("*.json")):
            self.preset_combo.addItem(f"{path.stem} (mine)", str(path))
        self._select_preset_in_combo(self.current_preset)

    def _select_preset_in_combo(self, path: str) -> None:
        index = self.preset_combo.findData(path)
        if index < 0 and path:  # a file from elsewhere (a job file, say): list it so the user sees what is loaded
            self.preset_combo.addItem(Path(path).name, path)
            index = self.preset_combo.count() - 1
        self.preset_combo.setCurrentIndex(max(index, 0))

    def _on_preset_chosen(self, index: int) -> None:
        path = self.preset_combo.itemData(index)
        if path:
            self.load_preset(path)

    def load_preset(self, path: str | Path) -> bool:
        try:
            job = load_job(path)
        except JobError as exc:
            self._error("Cannot load preset", str(exc))
            return False
        self.form.set_job(job)
        self.autosave.mark_saved(str(path))
        self.current_preset = str(path)
        self._select_preset_in_combo(self.current_preset)
        self._notice(f"Loaded {path}")
        return True

    def load_preset_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load preset or job file", str(user_presets_dir()),
                                              "Job and preset files (*.json);;All files (*)")
        if path:
            self.load_preset(path)

    def import_configs(self, paths: list[str | Path]) -> bool:
        """Another trainer's config files into the editor, as `python -m trainer import` reads them (nothing is
        written: save the job from the editor); the report shows what mapped and what did not."""
        try:
            imported = import_files([Path(p) for p in paths])
        except JobError as exc:
            self._error("Cannot import", str(exc))
            return False
        self.form.set_job(imported.job)
        self.current_preset = ""
        report = imported.report()
        counts = ", ".join(line.removesuffix(":") for line in report if not line.startswith(("  ", "read ")))
        self._notice(f"Imported {', '.join(Path(p).name for p in paths)}: {counts}")
        self.show_report(f"Imported {len(paths)} file{'s' if len(paths) > 1 else ''}",
                         f"The job is in the editor ({counts}). Check the paths, then save it or start.",
                         "\n".join(report))
        return True

    def import_dialog(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(self, "Import another trainer's config (with its dataset TOML or "
                                                "concepts file)", str(Path.home()),
                                                "Trainer configs (*.json *.toml *.yaml *.yml);;All files (*)")
        if paths:
            self.import_configs(paths)

    def save_preset(self, path: str | Path) -> bool:
        job = self.form.job_or_none()
        if job is None:
            self._error("Cannot save preset", "Fix the fields marked in red first")
            return False
        save_job(job, path, sparse=True)
        self.autosave.mark_saved(str(path))
        self.current_preset = str(path)
        self._fill_preset_combo()
        self._notice(f"Saved preset {path}")
        return True

    def save_preset_dialog(self) -> None:
        start = self.current_preset if self.current_preset.startswith(str(user_presets_dir())) else \
            str(user_presets_dir() / "my-preset.json")
        path, _ = QFileDialog.getSaveFileName(self, "Save preset", start, "Preset files (*.json)")
        if path:
            self.save_preset(path if path.endswith(".json") else path + ".json")

    def save_job_file(self, path: str | Path) -> bool:
        job = self.form.job_or_none()
        if job is None:
            self._error("Cannot save job file", "Fix the fields marked in red first")
            return False
        save_job(job, path)
        self.autosave.mark_saved()
        self._notice(f"Saved job file {path}; run it anywhere with: python -m trainer run {path}")
        return True

    def save_job_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save job file", "job.json", "Job files (*.json)")
        if path:
            self.save_job_file(path)

    # ---- the demo ----------------------------------------------------------------------------------------

    def create_demo(self, folder: str | Path, method: str = "lora") -> None:
        """`python -m trainer demo FOLDER --method METHOD` in the background; its job is loaded when it is done."""
        folder = Path(folder)
        self._demo = trainer_child(self, finished=lambda code, status: self._on_demo_built(folder, code),
                                   merged=True)
        self.act_demo.setEnabled(False)
        self._notice(f"Building the demo in {folder} (a tiny model and dataset; a few seconds)…")
        self._demo.start(self.runner.command_prefix[0],
                         [*self.runner.command_prefix[1:], "demo", str(folder), "--method", method])

    def _on_demo_built(self, folder: Path, code: int) -> None:
        output = bytes(self._demo.readAll().data()).decode("utf-8", "replace").strip()
        self.act_demo.setEnabled(True)
        if code != 0 or not (folder / "job.json").is_file():
            last = output.splitlines()[-1] if output else f"exit code {code}"
            self._error("Cannot build the demo", last)
            return
        if self.load_preset(folder / "job.json"):
            self.tabs.setCurrentWidget(self.dataset)
            self._notice(f"Demo ready in {folder}: press Start (F5)")
            self.demoReady.emit(str(folder / "job.json"))

    def create_demo_dialog(self) -> None:
        parent = QFileDialog.getExistingDirectory(self, "Where to create the demo folder", str(Path.home()))
        if not parent:
            return
        by_label = {label: method for method, (label, _) in DEMO_METHODS.items()}
        choice = self.ask("Demo", "How should the demo train? (Each takes about a minute on a CPU.)\n\n"
                          + "\n".join(f"{label}: {what}" for label, what in DEMO_METHODS.values()),
                          [*by_label, "Cancel"])
        if choice in by_label:
            self.create_demo(_free_folder(Path(parent) / "sdtrainer-demo", first=True), by_label[choice])

    # ---- form → Start --------------------------------------------------------------------------------

    def _on_form_changed(self) -> None:
        self.job, self.start_reasons = self.form.check()
        self._add_dataset_reason()
        self._update_actions()
        self._scan_timer.start()

    def _on_scanned(self, scan) -> None:
        self.job, self.start_reasons = self.form.check()
        self._add_dataset_reason()
        self._update_actions()

    def _add_dataset_reason(self) -> None:
        # The last background scan of the dataset folders: a missing folder or one without images blocks Start.
        scan, why = self.dataset.scan, self.dataset.error
        if not why and scan is not None and self.job is not None:
            try:
                scan.require_images(self.job.dataset)
            except JobError as exc:
                why = str(exc)
        if why:
            self.job = None
            self.start_reasons.append(why)

    def _rescan(self) -> None:
        self.dataset.set_spec(self.form.section("dataset"))

    def _update_actions(self) -> None:
        idle = self.runner.state == "idle"
        running = self.runner.state == "running"
        can_start = idle and not self.start_reasons
        self.act_start.setEnabled(can_start)
        reason = "" if not idle or not self.start_reasons else self.start_reasons[0]
        self.act_start.setToolTip("Start training (F5)" if can_start else
                                  f"Cannot start: {reason}" if reason else "A run is in progress")
        self.reason_label.setText(f"Cannot start: {reason}" if reason else "")
        self.reason_label.setToolTip("\n".join(self.start_reasons))
        self.act_stop.setEnabled(not idle)
        self.act_pause.setEnabled(running)
        if idle:
            self._on_pause_changed(False, 0, quiet=True)
        self.act_save_now.setEnabled(running)
        self.act_sample_now.setEnabled(running)
        self.act_sample_prompts.setEnabled(running)
        self.act_kill.setEnabled(not idle)
        self.act_open_run.setEnabled(idle)
        self.preset_combo.setEnabled(idle)
        self.act_open_preset.setEnabled(idle)

    def start(self) -> bool:
        """Checks, then writes <output_dir>/job.json and runs the trainer on it. False if it did not start."""
        self._on_form_changed()
        if self.job is None or self.runner.state != "idle":
            return False
        job = self.job
        try:
            scan = scan_dataset(job.dataset)
            scan.require_images(job.dataset)
        except JobError as exc:
            self._error("Cannot start", str(exc))
            return False
        if scan.captions_missing:
            answer = self.ask("Missing captions",
                              f"{scan.captions_missing} of {scan.num_images} images have no caption file; they "
                              "will train with their folder's instance prompt "
                              f"({_prompts(job)}).\n\nStart anyway?", ["Start anyway", "Cancel"])
            if answer != "Start anyway":
                return False
        run_dir = Path(job.output.output_dir).expanduser().resolve()
        resume = False
        if run_leftovers(run_dir):
            answer = self.ask("Run folder in use",
                              f"{run_dir} already holds a run.\n\nResume it from its last checkpoint, or start "
                              "a new run in a new folder?", ["Resume", "New folder", "Cancel"])
            if answer == "Resume":
                resume = True
            elif answer == "New folder":
                run_dir = _free_folder(run_dir)
                self.form.editor("output.output_dir").set(str(run_dir))
                self._on_form_changed()
                if self.job is None:
                    return False
                job = self.job
            else:
                return False
        return self.run_job(job, run_dir, resume)

    def run_job(self, job: Job, run_dir: Path, resume: bool = False) -> bool:
        """The trainer on `job` in `run_dir`, shown in the Run tab: Start after its checks, and the queue."""
        job_path = run_dir / "job.json"
        save_job(job, job_path)
        self.follower.close()
        self.live_run_dir = run_dir
        self.run_panel.reset(f"Run: {run_dir}", run_dir)
        if resume and (run_dir / "events.jsonl").is_file():
            # The history first, so a resumed run's plot continues where it left off.
            history, _ = read_events(run_dir / "events.jsonl")
            self.run_panel.add_events(history)
        self.run_panel.log_events = False  # from here on the trainer's own output fills the log
        try:
            self.runner.start(job_path, resume=resume)
        except (OSError, RuntimeError) as exc:
            self._error("Cannot start the trainer", str(exc))
            return False
        live_run.record(run_dir, self.runner.pid)
        self.tabs.setCurrentWidget(self.run_panel)
        self.run_panel.tabs.setCurrentWidget(self.run_panel.plot)
        return True

    def _remote_job(self) -> tuple[Path, Path] | None:
        """For the Remote tab: the form's job as a file, and the local folder the remote run's files come to (the
        job's output_dir, or a free one beside it when that already holds a run)."""
        self._on_form_changed()
        if self.job is None:
            return None
        local = Path(self.job.output.output_dir).expanduser().resolve()
        if run_leftovers(local) or (local / "remote.json").exists():
            local = _free_folder(local)
        path = data_dir() / "remote-job.json"
        save_job(self.job, path)
        return path, local

    def offer_to_follow(self) -> None:
        """An earlier window (closed, or killed) left a run training: offer to show it as it goes."""
        found = live_run.still_running()
        if found is None or self.runner.state != "idle":
            return
        folder, pid = found
        answer = self.ask("A run is still training",
                          f"The trainer started from this window earlier (pid {pid}) is still training {folder}.\n\n"
                          "Follow it here (plot, samples, log)?", ["Follow it", "Not now"])
        if answer == "Follow it":
            self.open_run_folder(folder)

    def stop(self) -> None:
        self.runner.stop()

    def _command(self, name: str) -> None:
        if self.runner.send(name):
            self._notice({"save": "Asked the trainer to save a checkpoint at its next step",
                          "sample": "Asked the trainer to render validation images at its next step",
                          "pause": "Asked the trainer to pause after its current step",
                          "continue": "Asked the trainer to continue"}[name])

    def sample_prompts_dialog(self) -> None:
        """Run → Sample prompts…: the prompts typed, one a line (the validation prompts to start from)."""
        job = self.form.job_or_none()
        text = self.ask_text("Sample prompts", "Prompts to render with the weights as they are now, one a line:",
                             "\n".join(job.validation.prompts) if job else "")
        prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
        if prompts and self.runner.send("sample", prompts):
            self._notice(f"Asked the trainer to render {len(prompts)} prompt(s) at its next step")

    def _toggle_pause(self) -> None:
        self._command("continue" if self.paused else "pause")

    def _on_pause_changed(self, paused: bool, step: int, quiet: bool = False) -> None:
        self.paused = paused
        self.act_pause.setText("&Continue" if paused else "&Pause")
        self.act_pause.setIcon(self.style().standardIcon(_ICONS.SP_MediaPlay if paused else _ICONS.SP_MediaPause))
        if not quiet:
            self._notice(f"Paused at step {step}: the model stays loaded; Continue (F8) goes on" if paused
                         else f"Continued at step {step}")

    # ---- trainer signals -----------------------------------------------------------------------------

    def _on_state(self, state: str) -> None:
        self.state_label.setText(STATE_TEXT.get(state, state))
        self._update_actions()

    def _on_failed(self, text: str) -> None:
        head, _, tail = text.partition("\n")
        self.run_panel.show_banner(f"<b>{_html(head)}</b>" + (f"<pre>{_html(tail)}</pre>" if tail else ""), "error")
        self.tabs.setCurrentWidget(self.run_panel)

    def _on_stalled(self, seconds: float) -> None:
        text = (f"No event from the trainer for {seconds:.0f} s while its process (pid {self.runner.pid}) lives: "
                "it may be hung.")
        self.run_panel.show_banner(_html(text), "error")
        self.state_label.setText("Stalled")
        answer = self.ask("The trainer has stalled", text + " Stop it (its last checkpoint stays), or keep waiting?",
                          ["Keep waiting", "Stop it"])
        if answer == "Stop it":
            self.runner.kill()  # a hung trainer would never act on a stop request at its next step

    def _on_finished(self, code: int, summary: str) -> None:
        live_run.clear()
        if code in (0, 3):
            hint = "" if code == 0 else " Press Start and choose Resume to continue."
            self.run_panel.show_banner(_html(summary) + hint, "ok" if code == 0 else "info")
        self._notice(summary)
        self._on_form_changed()

    # ---- run folders ---------------------------------------------------------------------------------

    def open_run_folder(self, folder: str | Path) -> bool:
        try:
            self.follower.open(folder)
        except FileNotFoundError as exc:
            self._error("Cannot open run folder", str(exc))
            return False
        self.live_run_dir = Path(folder)
        self.run_panel.reset(f"Run folder: {folder} (read from events.jsonl; followed while it grows)", folder)
        self.tabs.setCurrentWidget(self.run_panel)
        return True

    def open_run_folder_dialog(self) -> None:
        start = str(self.live_run_dir or (Path(self.form.editor("output.output_dir").get() or ".").parent))
        folder = QFileDialog.getExistingDirectory(self, "Open run folder (a job's output_dir)", start)
        if folder:
            self.open_run_folder(folder)

    def _on_followed(self, events: list) -> None:
        if self.run_panel.last_status:
            self.run_panel.show_banner(f"This run finished: {self.run_panel.last_status}",
                                       "error" if self.run_panel.last_status == "failed" else "ok")

    def _open_run_dir(self) -> None:
        folder = self.live_run_dir or Path(self.form.editor("output.output_dir").get())
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder)))

    # ---- drag a folder onto the window ---------------------------------------------------------------

    def dragEnterEvent(self, event) -> None:
        if any(Path(url.toLocalFile()).is_dir() for url in event.mimeData().urls()):
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        folders = [url.toLocalFile() for url in event.mimeData().urls() if Path(url.toLocalFile()).is_dir()]
        if folders:
            self.form.set_dataset_folders(folders)
            self.tabs.setCurrentWidget(self.dataset)
            self._notice(f"Dataset set to {', '.join(folders)}")
            event.acceptProposedAction()

    # ---- closing, settings ---------------------------------------------------------------------------

    def offer_autosave(self) -> None:
        """A job autosaved by a window that crashed: restore it into the form, or discard it."""
        if self.autosave.stopped:  # closed before it was shown
            return
        pending = self.autosave.pending()
        if pending is not None:
            answer = self.ask("Restore unsaved job?",
                              f"The window closed without saving the job you were editing (autosaved "
                              f"{pending.get('saved_at', '')}). Restore it into the editor?", ["Restore", "Discard"])
            if answer == "Restore":
                self.current_preset = str(pending.get("file") or "")  # the file these edits are edits of
                self._select_preset_in_combo(self.current_preset)
                self.autosave.restore(pending["job"])
                self._notice("Restored the unsaved job; save it with File → Save job file")
            else:
                self.autosave.discard()
        self.autosave.active = True
        self.autosave.write_now()

    def choose_save_path(self) -> str:
        """Where to save the job before closing; empty if cancelled. Tests replace this."""
        start = self.current_preset or str(Path.home() / "job.json")
        path, _ = QFileDialog.getSaveFileName(self, "Save job file", start, "Job files (*.json)")
        return path

    def closeEvent(self, event) -> None:
        keep_form = True
        if self.autosave.active and self.autosave.dirty:
            answer = self.ask("Unsaved changes", "The job in the editor has changes that are in no file. Save "
                              "them as a job file before closing?", ["Save…", "Discard", "Cancel"])
            if answer == "Save…":
                path = self.choose_save_path()
                if not path or not self.save_job_file(path):
                    event.ignore()
                    return
            elif answer == "Discard":
                keep_form = False  # the next start shows the last file loaded, not these edits
            else:
                event.ignore()
                return
        if self.runner.state != "idle":
            answer = self.ask("A run is in progress",
                              "Stop the run (the trainer saves a resumable checkpoint and exits), or leave it "
                              "running on its own? You can follow it later with File → Open run folder.",
                              ["Stop the run", "Leave it running", "Cancel"])
            if answer == "Stop the run":
                self.runner.stop()
                # The socket closes with the window; if events the window has not read are pending, Linux resets
                # the connection and the trainer can lose the unread stop. The run folder's command file holds.
                self._command_file("stop")
                self.runner.detach()
            elif answer == "Leave it running":
                self.runner.detach()
            else:
                event.ignore()
                return
        self._save_settings(keep_form)
        self.autosave.stop()  # a normal close: an autosave found at the next start means a crash
        self.follower.close()
        self.dataset.close_captioner()
        self.remote.save()
        self.remote.stop_following()  # the remote run goes on; a later window follows it again
        self.try_panel.kill()
        if self._demo is not None:  # a demo still building: its end must not reach a closed window
            self._demo.finished.disconnect()
            self._demo.kill()
            self._demo.waitForFinished(2000)
        event.accept()

    def _command_file(self, name: str) -> None:
        if self.live_run_dir is not None:
            try:
                (self.live_run_dir / COMMAND_DIR).mkdir(exist_ok=True)
                (self.live_run_dir / COMMAND_DIR / name).touch()
            except OSError as exc:  # the socket's command is still on its way
                self._notice(f"cannot write {self.live_run_dir / COMMAND_DIR / name}: {exc.strerror or exc}")

    def _save_settings(self, keep_form: bool = True) -> None:
        s = settings()
        s.setValue("geometry", self.saveGeometry())
        s.setValue("splitter", self.splitter.saveState())
        s.setValue("preset", self.current_preset)
        job = self.form.job_or_none()
        if not keep_form:
            s.remove("job")
        elif job is not None:
            s.setValue("job", json.dumps(to_sparse(job)))

    def _restore_settings(self) -> None:
        s = settings()
        geometry = s.value("geometry")
        if isinstance(geometry, QByteArray):
            self.restoreGeometry(geometry)
        splitter = s.value("splitter")
        if isinstance(splitter, QByteArray):
            self.splitter.restoreState(splitter)
        self.current_preset = str(s.value("preset", "") or "")
        saved = s.value("job")
        if saved:
            try:
                self.form.set_job(from_sparse(json.loads(saved), "last session's job"))
            except (JobError, json.JSONDecodeError) as exc:
                self._notice(f"Could not restore the last session's job: {exc}")
        elif self.current_preset and Path(self.current_preset).is_file():
            self.load_preset(self.current_preset)
        self._select_preset_in_combo(self.current_preset)

    # ---- talking to the user -------------------------------------------------------------------------

    def ask(self, title: str, text: str, buttons: list[str]) -> str | None:
        """A question with named buttons; returns the label clicked (None if closed). Tests replace this."""
        box = QMessageBox(QMessageBox.Icon.Question, title, text, parent=self)
        made = [box.addButton(label, QMessageBox.ButtonRole.AcceptRole if i == 0 else
                              QMessageBox.ButtonRole.RejectRole if label == "Cancel" else
                              QMessageBox.ButtonRole.ActionRole) for i, label in enumerate(buttons)]
        box.setDefaultButton(made[0])
        box.exec()
        clicked = box.clickedButton()
        return buttons[made.index(clicked)] if clicked in made else None

    def ask_text(self, title: str, label: str, text: str) -> str | None:
        """Several lines typed by the user (None if cancelled). Tests replace this."""
        value, ok = QInputDialog.getMultiLineText(self, title, label, text)
        return value if ok else None

    def _error(self, title: str, text: str) -> None:
        self._notice(f"{title}: {text}")
        self.show_message(title, text)

    def show_message(self, title: str, text: str) -> None:
        """An error dialog; tests replace this."""
        QMessageBox.warning(self, title, text)

    def show_report(self, title: str, text: str, details: str) -> None:
        """A notice with a long report behind "Show Details…"; tests replace this."""
        box = QMessageBox(QMessageBox.Icon.Information, title, text, parent=self)
        box.setDetailedText(details)
        box.exec()

    def _notice(self, text: str) -> None:
        self.statusBar().showMessage(text, 10000)


def _free_folder(path: Path, first: bool = False) -> Path:
    """path-2, path-3, … (path itself too with first=True): the first that does not exist or is empty."""
    if first and (not path.exists() or (path.is_dir() and not any(path.iterdir()))):
        return path
    base = path.name
    stem, _, number = base.rpartition("-")
    if stem and number.isdigit():
        base = stem
    for i in range(2, 10000):
        candidate = path.with_name(f"{base}-{i}")
        if not candidate.exists() or (candidate.is_dir() and not any(candidate.iterdir())):
            return candidate
    raise RuntimeError(f"{path}: no free folder name")


def _prompts(job: Job) -> str:
    prompts = sorted({f.instance_prompt for f in job.dataset.folders})
    if prompts == [""]:
        return "which is empty: they train with no caption at all"
    return ", ".join(repr(p) if p else "empty" for p in prompts)


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

