import atexit
import os
import shutil
import tempfile

# Qt tests run without a display, and never touch the user's settings or presets.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
_home = tempfile.mkdtemp(prefix="sdtrainer-test-home-")
atexit.register(shutil.rmtree, _home, True)  # its caches reach hundreds of MB over many suite runs
os.environ["XDG_CONFIG_HOME"] = os.path.join(_home, "config")
os.environ["XDG_DATA_HOME"] = os.path.join(_home, "data")
os.environ["XDG_CACHE_HOME"] = os.path.join(_home, "cache")  # the trainer's latent and text caches
# Under pytest-xdist each worker already keeps a core busy: torch in the worker and in every trainer it starts
# computes on one thread, so that two workers' runs do not each try to use both cores (measured: a demo run took
# 112 s beside the other worker with torch's two threads, 25 s alone).
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_threads] = "1"

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# The suite gates a merge, so its fuzz tests draw the same examples on every machine: a red CI is a real change,
# never a new draw. HYPOTHESIS_PROFILE=explore draws fresh examples on each run, to hunt for new bugs.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

FAKE_TRAINER = str(Path(__file__).resolve().parent / "fake_trainer.py")


@pytest.fixture
def app_window(qtbot):
    """The real main window running tests/fake_trainer.py; its questions are answered from `answers`
    (first button when empty) and recorded in `questions`; error dialogs and reports go to `messages`."""
    from app.window import MainWindow

    window = MainWindow(trainer_command=[sys.executable, FAKE_TRAINER], restore=False)
    window.questions, window.answers, window.messages = [], [], []

    def ask(title, text, buttons):
        window.questions.append((title, text))
        return window.answers.pop(0) if window.answers else buttons[0]

    window.ask = ask
    window.show_message = lambda title, text: window.messages.append(f"{title}: {text}")
    window.show_report = lambda title, text, details: window.messages.append(f"{title}: {text}\n{details}")
    qtbot.addWidget(window)
    yield window
    if window.runner.state != "idle":
        window.runner.kill()
        qtbot.waitUntil(lambda: window.runner.state == "idle", timeout=30_000)


@pytest.fixture(scope="session")
def demo_template(tmp_path_factory):
    """A demo folder (tiny random SD1.5 model, 12 images, job.json) built once; copy it, don't train in it."""
    from trainer.demo import build_demo

    root = tmp_path_factory.mktemp("demo-template") / "demo"
    build_demo(root, steps=8)
    return root


def _copy_demo(demo_template, root):
    import shutil

    from trainer.job import load_job, save_job

    shutil.copytree(demo_template, root)
    job = load_job(root / "job.json")
    job.model.path = str(root / "model")
    job.dataset.folders[0].path = str(root / "dataset")
    job.output.output_dir = str(root / "run")
    save_job(job, root / "job.json")
    return root / "job.json"


@pytest.fixture
def demo_job(demo_template, tmp_path):
    """A fresh copy of the demo whose job points at this test's own folder."""
    return _copy_demo(demo_template, tmp_path / "demo")


@pytest.fixture(scope="session")
def demo_run(demo_template, tmp_path_factory):
    """A finished demo LoRA run of two steps with checkpoints step-1 and step-2 (no validation images); read it,
    don't write in it."""
    from trainer.cli import main

    job = _copy_demo(demo_template, tmp_path_factory.mktemp("demo-run") / "demo")
    assert main(["run", str(job), "--set", "schedule.max_steps=2", "--set", "output.checkpoint_every=1",
                 "--set", "validation.prompts=[]", "--set", "validation.at_start=false"]) == 0
    return job.parent / "run"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA; on a machine without it they are skipped, saying why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (this machine has none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For a module of runs on small models: torch's threads spend more time meeting than computing on them, and far
    more when another process shares the cores (measured: 8 s a run with two threads beside a busy neighbour, 2 s
    with one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def any_precision():
    """For a test that trains in-process under another mixed_precision than the rest: accelerate keeps the first
    run's precision for the whole process, so it is forgotten before the test and again after it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def stored_model(tmp_path_factory):
    """`stored_model(family, dtype, form)`: the family's mid-size model (real text widths, tiny depth) stored as
    `dtype` ("fp32", "fp16", "bf16", "fp8") in `form` ("folder", "variant": fp16 files named `*.fp16.safetensors`,
    "single": one original-layout file). Each is built on first use and kept for the session; returns
    (model.path, model.config or "", model.variant or "")."""
    import stored_models
    from trainer.demo import build_mid_size

    root = tmp_path_factory.mktemp("stored-models")
    made: dict = {}

    def get(family: str, dtype: str, form: str) -> tuple[str, str, str]:
        key = (family, dtype, form)
        if key not in made:
            base = root / family / "fp32-folder"
            if not base.exists():
                build_mid_size(family, base)
            if form == "folder":
                path = base if dtype == "fp32" else stored_models.in_dtype(base, root / family / f"{dtype}-folder",
                                                                             dtype)
                made[key] = (str(path), "", "")
            elif form == "variant":
                folder = Path(get(family, dtype, "folder")[0])
                made[key] = (str(stored_models.as_variant(folder, root / family / f"{dtype}-variant", dtype)),
                             "", dtype)
            elif dtype == "fp32":
                made[key] = (str(stored_models.single_file(base, root / family / "fp32.safetensors")), str(base), "")
            else:  # the fp32 file recast: the pipeline is loaded and converted once a family, not once a dtype
                fp32 = Path(get(family, "fp32", "single")[0])
                made[key] = (str(stored_models.recast(fp32, root / family / f"{dtype}.safetensors",
                                                      stored_models.DTYPES[dtype])), str(base), "")
        return made[key]

    return get


@pytest.fixture(scope="module")
def matrix_dataset(tmp_path_factory):
    """The stored-model matrix's dataset: one demo image (tests/stored_matrix.py)."""
    from trainer.demo import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("matrix-data") / "dataset", count=1)


@pytest.fixture(scope="module")
def matrix_pipelines():
    """The stored-model matrix's fp32 pipeline of each family (Stable Cascade: its prior), loaded once a module:
    each exported LoRA goes on and off."""
    return {}

