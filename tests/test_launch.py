"""launch.py: argument parsing, the child command lines per mode, the install stamp, and the no-display hint.

No real pip runs here: ensure_setup gets a fake runner. Nothing touches the repository's own .venv.
"""

import io
import json
import re
import sys
from pathlib import Path

import pytest

import launch

REPO = Path(launch.__file__).resolve().parent
PY = "/venv/bin/python"


# ---- the command line -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, mode", [
    ([], "window"),
    (["--headless", "job.json"], "headless"),
    (["--demo", "d"], "demo"),
    (["--setup"], "setup"),
    (["--test"], "test"),
    (["--update-lock"], "update-lock"),
])
def test_modes(argv, mode):
    assert launch.parse_args(argv).mode == mode


@pytest.mark.parametrize("argv", [
    ["--bogus"],
    ["--headless"],  # no job
    ["--steps", "3"],  # --steps without --demo
    ["--setup", "--steps", "3"],
    ["--demo", "d", "--steps", "0"],
    ["--demo", "d", "--setup"],  # two modes
    ["stray"],
])
def test_bad_arguments_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        launch.parse_args(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_headless_passes_trainer_arguments_through_verbatim(tmp_path):
    args = launch.parse_args(["--headless", "jobs/a.json", "--resume", "--set", "schedule.max_steps=5",
                              "--set", "optimizer.name=adamw8bit"])
    assert launch.child_commands(args, PY, REPO, tmp_path) == [
        ([PY, "-m", "trainer", "run", "jobs/a.json", "--resume", "--set", "schedule.max_steps=5",
          "--set", "optimizer.name=adamw8bit"], tmp_path)]


def test_window_runs_the_app_package(tmp_path):
    assert launch.child_commands(launch.parse_args([]), PY, REPO, tmp_path) == [([PY, "-m", "app"], tmp_path)]


def test_demo_builds_then_trains_in_an_absolute_folder(tmp_path):
    args = launch.parse_args(["--demo", "sub/demo", "--steps", "6"])
    folder = tmp_path / "sub" / "demo"
    assert launch.child_commands(args, PY, REPO, tmp_path) == [
        ([PY, "-m", "trainer", "demo", str(folder), "--steps", "6"], tmp_path),
        ([PY, "-m", "trainer", "run", str(folder / "job.json")], tmp_path)]


def test_demo_without_steps_leaves_the_trainer_default(tmp_path):
    (build, _), _ = launch.child_commands(launch.parse_args(["--demo", str(tmp_path)]), PY, REPO, tmp_path)
    assert build == [PY, "-m", "trainer", "demo", str(tmp_path)]


def test_test_mode_runs_pytest_in_the_repo_with_its_arguments(tmp_path):
    args = launch.parse_args(["--test", "-k", "launch", "-x"])
    assert launch.child_commands(args, PY, REPO, tmp_path) == [([*launch.pytest_command(PY), "-k", "launch", "-x"],
                                                                 REPO)]


def test_the_suite_runs_on_two_workers_grouped_by_module(monkeypatch):
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 16)
    assert launch.pytest_command(PY) == [PY, "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile"]
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 1)  # one core: no workers to start
    assert launch.pytest_command(PY) == [PY, "-m", "pytest", "-q"]


def test_setup_mode_runs_nothing_after_installing(tmp_path):
    assert launch.child_commands(launch.parse_args(["--setup"]), PY, REPO, tmp_path) == []


# ---- the window needs a display ---------------------------------------------------------------------------------

@pytest.mark.parametrize("platform, env, blocked", [
    ("linux", {}, True),
    ("linux", {"DISPLAY": ":0"}, False),
    ("linux", {"WAYLAND_DISPLAY": "wayland-0"}, False),
    ("linux", {"QT_QPA_PLATFORM": "offscreen"}, False),
    ("linux", {"DISPLAY": ""}, True),
    ("darwin", {}, False),
    ("win32", {}, False),
])
def test_no_display_hint(platform, env, blocked):
    hint = launch.no_display_hint(platform, env)
    assert (hint is not None) == blocked
    if blocked:
        assert "--headless" in hint and "--demo" in hint and "\n" not in hint


def test_window_without_display_exits_2_before_any_setup(monkeypatch, capsys):
    monkeypatch.setattr(launch.sys, "platform", "linux")
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(launch, "ensure_setup", lambda *a, **k: pytest.fail("setup ran"))
    monkeypatch.setattr(launch, "reexec_in_venv", lambda *a, **k: pytest.fail("re-exec ran"))
    assert launch.main([]) == 2
    assert "--headless" in capsys.readouterr().err


# ---- the install stamp ------------------------------------------------------------------------------------------

def test_setup_key_follows_each_input():
    base = launch.setup_key(b"[project]\n", "torch==2.13.0", "")
    assert base == launch.setup_key(b"[project]\n", "torch==2.13.0", "")
    assert base != launch.setup_key(b"[project]\nx=1\n", "torch==2.13.0", "")
    assert base != launch.setup_key(b"[project]\n", "torch==2.14.1", "")
    assert base != launch.setup_key(b"[project]\n", "torch==2.13.0", "https://download.pytorch.org/whl/cu128")


@pytest.mark.parametrize("stamp, wanted, expected", [
    (None, set(), []),
    (None, {"test"}, ["test"]),
    ({"key": "k", "extras": []}, set(), None),
    ({"key": "k", "extras": ["test"]}, set(), None),  # installed with more than asked for: fine
    ({"key": "k", "extras": []}, {"test"}, ["test"]),
    ({"key": "old", "extras": ["test"]}, set(), ["test"]),  # reinstall keeps the test tools
    ({"extras": []}, set(), []),
])
def test_extras_to_install(stamp, wanted, expected):
    assert launch.extras_to_install(stamp, "k", wanted) == expected


class FakePip:
    """Stands in for run_logged: records the commands and fails where told to."""

    def __init__(self, fail_at=None):
        self.commands, self.fail_at = [], fail_at

    def __call__(self, cmd, log):
        self.commands.append(cmd)
        log.write(b"pip says something\n")
        return 1 if len(self.commands) == self.fail_at else 0


LOCK_TEXT = ("accelerate==1.16.0 \\\n    --hash=sha256:aa\n"
             "numpy==2.4.6 ; python_full_version < '3.12' \\\n    --hash=sha256:bb\n"
             "numpy==2.5.5 ; python_full_version >= '3.12' \\\n    --hash=sha256:cc\n"
             "peft==0.21.2 \\\n    --hash=sha256:dd\n"
             "transformers==5.23.0 \\\n    --hash=sha256:ee\n    # via\n    #   diffusers\n")
MATCHING = {"accelerate": "1.16.0", "numpy": "2.4.6", "peft": "0.21.2", "transformers": "5.23.0", "pip": "25.0"}


@pytest.fixture
def tree(tmp_path):
    repo, venv = tmp_path / "repo", tmp_path / "repo" / ".venv"
    venv.mkdir(parents=True)
    (repo / "pyproject.toml").write_text('[project]\nname = "sdtrainer"\ndependencies = ["peft>=0.13"]\n')
    (repo / launch.LOCK).write_text(LOCK_TEXT)
    (repo / launch.TEST_LOCK).write_text(LOCK_TEXT + "pytest==9.2.0 \\\n    --hash=sha256:ff\n")
    return repo, venv


def setup(tree, pip, env=None, wanted=frozenset(), installed=None):
    repo, venv = tree
    return launch.ensure_setup(PY, venv, repo, set(wanted), env or {}, runner=pip,
                               installed=MATCHING if installed is None else installed)


def test_first_setup_installs_torch_then_exactly_the_lock_then_the_project_and_checks(tree):
    repo, venv = tree
    pip = FakePip()
    assert setup(tree, pip) == 0
    assert pip.commands == [
        [PY, "-m", "pip", "install", "--disable-pip-version-check", launch.DEFAULT_TORCH],
        [PY, "-m", "pip", "install", "--disable-pip-version-check", "--require-hashes", "--no-deps",
         "-r", str(repo / launch.LOCK)],
        [PY, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps", "-e", str(repo)],
        [PY, "-m", "pip", "check", "--disable-pip-version-check"]]
    stamp = json.loads((venv / launch.STAMP_NAME).read_text())
    assert stamp["torch"] == launch.DEFAULT_TORCH and stamp["extras"] == []
    assert b"pip says something" in (venv / launch.LOG_NAME).read_bytes()


def test_second_setup_with_the_same_inputs_runs_no_pip(tree):
    setup(tree, FakePip())
    again = FakePip()
    assert setup(tree, again) == 0
    assert again.commands == []


@pytest.mark.parametrize("changed", ["pyproject.toml", launch.LOCK, launch.TEST_LOCK])
def test_a_changed_pyproject_or_lock_installs_again(tree, changed):
    repo, _ = tree
    setup(tree, FakePip())
    (repo / changed).write_text((repo / changed).read_text() + "\n# changed\n")
    again = FakePip()
    assert setup(tree, again) == 0
    assert len(again.commands) == 4
    assert setup(tree, FakePip(fail_at=1)) == 0  # and then it is stamped again


def test_an_environment_that_drifted_from_the_lock_is_named_and_installed_again(tree, capsys):
    setup(tree, FakePip())
    pip = FakePip()
    assert setup(tree, pip, installed={**MATCHING, "transformers": "5.25.0"}) == 0
    out = capsys.readouterr().out
    assert "transformers 5.25.0 is installed; the lock has 5.23.0" in out
    assert "transformers 5.25.0 with peft 0.21.2" in out and "text-encoder LoRAs" in out  # the known-bad pair
    assert pip.commands[1][-2:] == ["-r", str(tree[0] / launch.LOCK)]
    # a package the lock does not know (pip, the user's own) and one it leaves out on this platform are no drift
    quiet = FakePip()
    assert setup(tree, quiet, installed={"accelerate": "1.16.0", "pip": "99"}) == 0 and quiet.commands == []


def test_torch_choice_from_the_environment(tree):
    setup(tree, FakePip())
    pip = FakePip()
    env = {"SDTRAINER_TORCH": "torch==2.14.1", "SDTRAINER_TORCH_INDEX": "https://download.pytorch.org/whl/cu128"}
    assert setup(tree, pip, env) == 0
    torch_step, *others = pip.commands
    assert torch_step[-3:] == ["torch==2.14.1", "--index-url", "https://download.pytorch.org/whl/cu128"]
    assert not any("--index-url" in step for step in others)  # the index is for the PyTorch step only


def test_test_mode_installs_the_test_lock_once(tree):
    repo, _ = tree
    setup(tree, FakePip())
    pip = FakePip()
    assert setup(tree, pip, wanted={"test"}) == 0
    assert pip.commands[1][-2:] == ["-r", str(repo / launch.TEST_LOCK)]
    again = FakePip()
    assert setup(tree, again) == 0 and setup(tree, again, wanted={"test"}) == 0
    assert again.commands == []


@pytest.mark.parametrize("fail_at, step", [(1, "PyTorch"), (2, launch.LOCK), (3, "Installing sdtrainer"),
                                           (4, "pip check")])
def test_failed_pip_names_the_step_and_log_writes_no_stamp_and_retries(tree, capsys, fail_at, step):
    _, venv = tree
    assert setup(tree, FakePip(fail_at=fail_at)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert step in err and str(venv / launch.LOG_NAME) in err
    assert not (venv / launch.STAMP_NAME).exists()
    retry = FakePip()
    assert setup(tree, retry) == 0
    assert len(retry.commands) == 4


def test_a_failed_update_removes_the_old_stamp(tree):
    repo, venv = tree
    setup(tree, FakePip())
    (repo / "pyproject.toml").write_text('[project]\nname = "sdtrainer"\nversion = "2"\n')
    assert setup(tree, FakePip(fail_at=2)) == 1
    assert not (venv / launch.STAMP_NAME).exists()


def test_a_missing_lock_is_one_line(tree, capsys):
    repo, _ = tree
    (repo / launch.LOCK).unlink()
    assert setup(tree, FakePip()) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and launch.LOCK in err


# ---- the lock and the known-bad releases ------------------------------------------------------------------------

def test_parse_lock_keeps_each_python_range_version():
    assert launch.parse_lock(LOCK_TEXT) == {"accelerate": {"1.16.0"}, "numpy": {"2.4.6", "2.5.5"},
                                            "peft": {"0.21.2"}, "transformers": {"5.23.0"}}


@pytest.mark.parametrize("version, op, bound, expected", [
    ("5.24.0", ">=", "5.24", True), ("5.23.9", ">=", "5.24", False), ("5.25.0rc1", ">=", "5.24", True),
    ("0.21.2", "<", "0.22", True), ("0.22", "<", "0.22", False), ("3.11.7", "<", "3.12", True),
])
def test_version_matches(version, op, bound, expected):
    assert launch.version_matches(version, op, bound) is expected


def test_known_bad_pairs_are_found_only_together():
    assert launch.known_bad_found({"transformers": "5.24.0", "peft": "0.22.0"}) == []
    assert launch.known_bad_found({"transformers": "5.23.0", "peft": "0.21.2"}) == []
    (line, name), = launch.known_bad_found({"transformers": "5.24.0", "peft": "0.21.2", "python": "3.11.7"})
    assert name == "transformers" and "peft 0.21.2" in line and "\n" not in line


def test_pyproject_keeps_every_known_bad_release_out():
    tomllib = pytest.importorskip("tomllib")
    requirements = pytest.importorskip("packaging.requirements")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [requirements.Requirement(d) for d in project["dependencies"]]
    for rule in launch.KNOWN_BAD:
        name, op, bound = rule["package"]
        assert op == ">="  # the first bad release is `bound`: pyproject must not allow it where the pair can meet
        other, other_op, other_bound = rule["with"]
        env = {"python_version": "3.11", "python_full_version": "3.11.0"} if other == "python" else {}
        chosen = [r for r in reqs if launch.normalize(r.name) == name and (r.marker is None or r.marker.evaluate(env))]
        assert chosen, name
        assert not any(r.specifier.contains(bound) or r.specifier.contains(bound + ".0") for r in chosen), rule


def test_committed_locks_pin_everything_with_hashes_and_agree():
    runtime = (REPO / launch.LOCK).read_text()
    test = (REPO / launch.TEST_LOCK).read_text()
    pins, test_pins = launch.parse_lock(runtime), launch.parse_lock(test)
    assert {"diffusers", "transformers", "peft", "accelerate", "pydantic"} <= pins.keys()
    assert {"pytest", "pytest-qt"} <= test_pins.keys() and "pytest" not in pins
    assert all(test_pins[name] == versions for name, versions in pins.items())  # the suite tests what users get
    assert not any(name == "torch" or name.startswith(("nvidia-", "triton")) for name in test_pins)
    for text in (runtime, test):
        blocks = [b for b in text.split("\n") if re.match(r"^[a-z0-9]", b)]
        assert blocks and all(b.endswith("\\") for b in blocks)  # each pin continues with its hashes
        assert "--hash=sha256:" in text and "/work/" not in text and "/home/" not in text
    assert not launch.known_bad_found({n: max(v, key=launch._release) for n, v in pins.items()})


def test_an_environment_matching_the_lock_has_no_problems():
    assert launch.environment_problems(LOCK_TEXT, MATCHING) == []
    assert launch.environment_problems(LOCK_TEXT, {**MATCHING, "numpy": "2.5.5"}) == []  # the 3.12 row


RESOLVED = """accelerate==1.16.0
    # via sdtrainer (pyproject.toml)
networkx==3.6.1
    # via
    #   scikit-image
    #   torch
nvidia-cublas==13.1.1.3 ; sys_platform == 'linux'
    # via
    #   nvidia-cudnn-cu13
    #   torch
nvidia-cudnn-cu13==9.20.0.48 ; sys_platform == 'linux'
    # via torch
sympy==1.14.0
    # via torch
mpmath==1.3.0
    # via sympy
"""


def test_torch_only_follows_the_via_notes():
    assert launch.torch_only(RESOLVED) == {"nvidia-cublas", "nvidia-cudnn-cu13", "sympy", "mpmath"}


def test_held_back_names_the_known_break():
    lines = launch.held_back({"transformers": {"5.23.0"}, "peft": {"0.21.2"}, "numpy": {"2.4.6"}},
                             {"transformers": {"5.25.0"}, "peft": {"0.21.2"}, "numpy": {"2.4.6"}})
    assert len(lines) == 1
    assert lines[0].startswith("transformers 5.25.0 is out; the lock keeps 5.23.0.") and "peft 0.21.2" in lines[0]


def test_uncapped_requirements_drop_upper_bounds_only(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\ndependencies = ["transformers>=4.45,<5.24", "x[y]>=1,!=1.5", '
        '"PySide6-Essentials>=6.6,<6.12; python_version < \'3.12\'"]\n'
        '[project.optional-dependencies]\ntest = ["pytest"]\n')
    assert launch.uncapped_requirements(tmp_path / "pyproject.toml") == [
        "transformers>=4.45", "x[y]>=1", "PySide6-Essentials>=6.6; python_version < '3.12'", "pytest"]


def test_failed_tests_from_junit(tmp_path):
    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_b" name="test_err"><error message="y"/></testcase></testsuite></testsuites>')
    assert launch.failed_tests(tmp_path / "j.xml") == ["tests.test_a::test_bad", "tests.test_b::test_err"]


class FakeUpdate:
    """Stands in for pip and uv in update_lock: `uv pip compile ... -o FILE` writes FILE from `outputs`."""

    def __init__(self, repo, outputs):
        self.repo, self.outputs, self.commands = repo, outputs, []

    def __call__(self, cmd, log):
        self.commands.append(cmd)
        if "compile" in cmd:
            out = cmd[cmd.index("-o") + 1]
            (self.repo / out).write_text(self.outputs[Path(out).name])
        return 0


@pytest.mark.parametrize("suite_rc", [0, 1])
def test_update_lock_rewrites_the_lock_only_when_the_suite_passes(tree, monkeypatch, capsys, suite_rc):
    repo, _ = tree
    newer = LOCK_TEXT.replace("accelerate==1.16.0", "accelerate==1.17.0")
    fake = FakeUpdate(repo, {"resolved.txt": RESOLVED, launch.TEST_LOCK: newer, launch.LOCK: newer,
                             "uncapped.txt": newer.replace("transformers==5.23.0", "transformers==5.25.0")})
    monkeypatch.setattr(launch.subprocess, "call", lambda cmd: (repo / launch.UPDATE_VENV).mkdir() or 0)

    def pytest_run(cmd, cwd, env=None):
        junit = Path(next(a for a in cmd if a.startswith("--junitxml=")).split("=", 1)[1])
        junit.write_text('<testsuite><testcase classname="tests.test_x" name="test_lora">'
                         '<failure message="m"/></testcase></testsuite>' if suite_rc else "<testsuite/>")
        return suite_rc

    monkeypatch.setattr(launch, "call", pytest_run)
    assert launch.update_lock(repo, {}, runner=fake) == suite_rc
    out = capsys.readouterr().out
    assert "Held back: transformers 5.25.0 is out; the lock keeps 5.23.0." in out and "peft 0.21.2" in out
    assert "accelerate: 1.16.0 -> 1.17.0" in out
    no_emit = next(c for c in fake.commands if c[-1].endswith(launch.TEST_LOCK) and "--generate-hashes" in c)
    assert {"torch", "sympy", "nvidia-cublas"} <= {no_emit[i + 1] for i, a in enumerate(no_emit)
                                                   if a == "--no-emit-package"}
    assert (repo / launch.LOCK).read_text() == (newer if suite_rc == 0 else LOCK_TEXT)
    if suite_rc:
        assert "tests.test_x::test_lora" in out and "Red" in out


def test_run_logged_streams_and_logs(capfd):
    log = io.BytesIO()
    rc = launch.run_logged([sys.executable, "-c", "print('Collecting torch'); import sys; sys.exit(3)"], log)
    assert rc == 3
    assert "    Collecting torch" in capfd.readouterr().out
    assert b"Collecting torch" in log.getvalue() and log.getvalue().startswith(b"$ ")


# ---- after setup ------------------------------------------------------------------------------------------------

def write_demo(folder: Path, outputs: dict):
    run = folder / "run"
    run.mkdir(parents=True)
    (folder / "job.json").write_text(json.dumps({"model": {"path": str(folder / "model")},
                                                  "output": {"output_dir": str(run)}}))
    events = [{"type": "run_started"}, {"type": "run_finished", "status": "completed", "outputs": outputs}]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"type": "trunc')


def test_demo_mode_prints_the_lora_and_a_loading_line_that_is_python(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "it's a demo"  # a quote in the path must not break the printed command
    lora = folder / "run" / "final" / "pytorch_lora_weights.safetensors"
    write_demo(folder, {"diffusers": str(lora), "kohya": str(folder / "run" / "final" / "demo_lora.safetensors")})
    calls = []
    monkeypatch.setattr(launch, "call", lambda cmd, cwd, env=None: calls.append(cmd) or 0)
    assert launch.run_mode(launch.parse_args(["--demo", str(folder)]), PY, REPO, tmp_path) == 0
    assert [c[3] for c in calls] == ["demo", "run"]
    out = capsys.readouterr().out
    assert str(lora) in out and "demo_lora.safetensors" in out
    line = next(x for x in out.splitlines() if " -c " in x)
    code = line.split(' -c "', 1)[1].rstrip('"')
    compile(code, "<demo one-liner>", "exec")
    assert f"load_lora_weights({str(lora.parent)!r}, weight_name='pytorch_lora_weights.safetensors')" in code
    assert repr(str(folder / "model")) in code


def test_demo_mode_fails_when_the_run_reports_no_lora(tmp_path, monkeypatch, capsys):
    write_demo(tmp_path / "d", {})
    monkeypatch.setattr(launch, "call", lambda cmd, cwd, env=None: 0)
    assert launch.run_mode(launch.parse_args(["--demo", str(tmp_path / "d")]), PY, REPO, tmp_path) == 1
    assert "no LoRA" in capsys.readouterr().err


def test_demo_stops_when_building_fails(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(launch, "call", lambda cmd, cwd, env=None: calls.append(cmd) or 2)
    assert launch.run_mode(launch.parse_args(["--demo", str(tmp_path)]), PY, REPO, tmp_path) == 2
    assert len(calls) == 1


@pytest.mark.parametrize("rc", [0, 1, 5])
def test_test_mode_passes_pytest_exit_code_through(tmp_path, monkeypatch, capsys, rc):
    monkeypatch.setattr(launch, "call", lambda cmd, cwd, env=None: rc)
    assert launch.run_mode(launch.parse_args(["--test"]), PY, REPO, tmp_path) == rc
    assert ("no tests" in capsys.readouterr().err) == (rc == 5)


# ---- the files that go with launch.py ---------------------------------------------------------------------------

def test_pyproject_lists_every_package_and_accepts_the_default_torch():
    tomllib = pytest.importorskip("tomllib")
    requirements = pytest.importorskip("packaging.requirements")
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    on_disk = {str(p.parent.relative_to(REPO)).replace("/", ".")
               for top in ("trainer", "app") for p in (REPO / top).rglob("__init__.py")}
    assert set(data["tool"]["setuptools"]["packages"]) == on_disk
    deps = {requirements.Requirement(d).name.lower(): requirements.Requirement(d)
            for d in data["project"]["dependencies"]}
    default = requirements.Requirement(launch.DEFAULT_TORCH)
    pinned = next(iter(default.specifier)).version
    assert deps["torch"].specifier.contains(pinned)  # else step 2 would replace the torch that step 1 installed
    assert "torchvision" not in deps  # no CPU wheel of it here: see shared STACK-NOTES
    assert {"pytest", "pytest-qt"} <= set(data["project"]["optional-dependencies"]["test"])


def test_ci_runs_the_readme_test_command():
    script = (REPO / ".ci" / "run").read_text().splitlines()
    assert "set -euo pipefail" in script
    assert script[-1] == "python3 launch.py --test"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_call_passes_the_exit_code_and_forwards_sigterm_to_the_child():
    assert launch.call([sys.executable, "-c", "raise SystemExit(7)"], None) == 7
    # The child asks for this process to be terminated; the launcher's handler must end the child instead.
    child = "import os, signal, time; os.kill(os.getppid(), signal.SIGTERM); time.sleep(30)"
    assert launch.call([sys.executable, "-c", child], None) == 128 + 15
