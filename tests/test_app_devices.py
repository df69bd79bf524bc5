"""Run → Devices…: the GPUs come from the trainer (here a stand-in answer), the choice is a window setting that
changes how the trainer is started, and the job file is not touched."""

import json
import sys

from app.devices import DevicesDialog, Launch, saved_launch

GPUS = {"gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.1},
                 {"index": 1, "name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.1},
                 {"index": 2, "name": "NVIDIA RTX 4090", "memory_gib": 23.6}]}
ANSWER = [sys.executable, "-c", f"print({json.dumps(json.dumps(GPUS))})"]


def test_the_launch_builds_the_trainer_command():
    prefix = [sys.executable, "-m", "trainer"]
    assert Launch().command(prefix) == (prefix, {})
    assert Launch("one", (2,)).command(prefix) == (prefix, {"CUDA_VISIBLE_DEVICES": "2"})
    args, env = Launch("data_parallel", (0, 2)).command(prefix)
    assert args == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                    "trainer"]
    assert env == {"CUDA_VISIBLE_DEVICES": "0,2"}
    assert Launch("data_parallel", (1,)).command(prefix) == (prefix, {"CUDA_VISIBLE_DEVICES": "1"})
    from app.settings import REPO_ROOT

    for mode, config in (("fsdp", "fsdp.yaml"), ("deepspeed", "deepspeed_zero2.yaml")):
        args, env = Launch(mode, (1, 3)).command(prefix)
        assert args == [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                        str(REPO_ROOT / "presets" / "accelerate" / config), "--num_processes", "2",
                        "--main_process_port", "0", "-m", "trainer"]
        assert env == {"CUDA_VISIBLE_DEVICES": "1,3"}
        assert (REPO_ROOT / "presets" / "accelerate" / config).is_file()
    assert Launch("fsdp", (0, 1)).describe() == "FSDP on GPUs 0, 1"


def test_the_trainer_says_which_gpus_it_sees_and_whether_deepspeed_is_installed(capsys):
    import importlib.util

    from trainer.cli import main

    assert main(["devices", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer == {"gpus": answer["gpus"], "deepspeed": importlib.util.find_spec("deepspeed") is not None}


def test_the_dialog_lists_the_trainers_gpus_and_returns_the_choice(qtbot):
    dialog = DevicesDialog(Launch("one", (1,)), devices_command=ANSWER)
    qtbot.addWidget(dialog)
    qtbot.waitUntil(lambda: dialog.gpu_list.count() == 3, timeout=20000)
    assert "3 GPU(s)" in dialog.status.text()
    assert dialog.gpu_list.item(2).text() == "2: NVIDIA RTX 4090 (23.6 GiB)"
    assert dialog.chosen() == Launch("one", (1,))  # the saved choice is ticked again
    from PySide6.QtCore import Qt

    dialog.gpu_list.item(0).setCheckState(Qt.CheckState.Checked)
    assert dialog.chosen() == Launch("one", (0,)), "one GPU: the first ticked"
    dialog.findChild(type(dialog.modes.buttons()[0]), "data_parallel").setChecked(True)
    assert dialog.chosen() == Launch("data_parallel", (0, 1))
    dialog.findChild(type(dialog.modes.buttons()[0]), "fsdp").setChecked(True)
    assert dialog.chosen() == Launch("fsdp", (0, 1))
    deepspeed = dialog.findChild(type(dialog.modes.buttons()[0]), "deepspeed")
    assert not deepspeed.isEnabled() and "not installed" in deepspeed.text(), "this answer does not report it"

    installed = DevicesDialog(Launch("deepspeed", (0, 1)), devices_command=[
        sys.executable, "-c", f"print({json.dumps(json.dumps({**GPUS, 'deepspeed': True}))})"])
    qtbot.addWidget(installed)
    qtbot.waitUntil(lambda: installed.gpu_list.count() == 3, timeout=20000)
    assert installed.findChild(type(dialog.modes.buttons()[0]), "deepspeed").isEnabled()
    assert installed.chosen() == Launch("deepspeed", (0, 1))


def test_no_gpus_and_a_failing_trainer_are_said(qtbot):
    dialog = DevicesDialog(Launch(), devices_command=[sys.executable, "-c", "print('{\"gpus\": []}')"])
    qtbot.addWidget(dialog)
    qtbot.waitUntil(lambda: "CPU" in dialog.status.text(), timeout=20000)
    broken = DevicesDialog(Launch(), devices_command=[sys.executable, "-c", "import sys; sys.exit('no torch')"])
    qtbot.addWidget(broken)
    qtbot.waitUntil(lambda: "could not list" in broken.status.text(), timeout=20000)
    assert "no torch" in broken.status.text()


def test_the_window_starts_the_trainer_under_the_chosen_devices(app_window, tmp_path, monkeypatch, qtbot):
    from PySide6.QtCore import Qt

    import app.window
    from app.devices import save_launch

    class Choose(DevicesDialog):
        def exec(self):
            qtbot.waitUntil(lambda: self.gpu_list.count() == 3, timeout=20000)
            for i in (0, 1):
                self.gpu_list.item(i).setCheckState(Qt.CheckState.Checked)
            self.findChild(type(self.modes.buttons()[0]), "data_parallel").setChecked(True)
            return DevicesDialog.DialogCode.Accepted

    monkeypatch.setattr(app.window, "DevicesDialog", Choose)
    app_window.devices_command = ANSWER
    job = tmp_path / "job.json"
    job.write_text('{"version": 1}')
    app_window.act_devices.trigger()
    try:
        assert app_window.runner.launch == Launch("data_parallel", (0, 1))
        assert saved_launch() == Launch("data_parallel", (0, 1)), "remembered for the next window"
    finally:
        save_launch(Launch())  # the other window tests in this process start their fake trainer plainly
    args, env = app_window.runner.command(job, resume=True)
    assert args[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert args[-5:] == ["run", str(job), "--events", app_window.runner.address, "--resume"]
    assert env == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert job.read_text() == '{"version": 1}', "the choice is the window's, not the job's"


def test_a_stop_under_torchrun_is_a_stop(app_window, qtbot, tmp_path, monkeypatch):
    """torchrun exits 1 when its workers exit 3 (stopped on request): the run_finished event decides."""
    from test_app_run import setup_job

    monkeypatch.setenv("FAKE_MODE", "forever")
    monkeypatch.setenv("FAKE_DELAY", "0.02")
    monkeypatch.setenv("FAKE_STOP_EXIT", "1")
    setup_job(app_window, tmp_path)
    with qtbot.waitSignal(app_window.runner.stepReceived, timeout=15000):
        assert app_window.start()
    with qtbot.waitSignal(app_window.runner.finished, timeout=15000) as finished:
        app_window.act_stop.trigger()
    assert finished.args[0] == 3
    assert "stopped" in app_window.run_panel.banner.text()


def test_debug_lines_stay_out_of_the_window_log(qtbot):
    """Each rank's per-epoch sample list is a debug line: for files and tests, not for the reader."""
    from app.run_panel import RunPanel
    from trainer.events import make_event

    panel = RunPanel()
    qtbot.addWidget(panel)
    panel.add_events([make_event("log", level="debug", message="epoch 0 from batch 0: rank 0 trains samples 1 2"),
                      make_event("log", level="info", message="caching latents: 12 to do")])
    text = panel.log.toPlainText()
    assert "caching latents" in text and "trains samples" not in text
