"""The architecture: app/ is the window, importing Qt and the trainer's torch-free contracts only (the job schema,
the event stream, the family table, the block notation, the headless queue's rules, the dataset scanner, so the
dataset view lists what training will read by the trainer's own rules, and the config importer); trainer/ never
imports Qt."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS = {"trainer.job", "trainer.events", "trainer.blocks", "trainer.families.table", "trainer.data.files",
             "trainer.data.masks",  # which mask belongs to which image: the dataset view's overlay
             "trainer.job_queue",  # the Queue tab checks and names exits by the headless queue's rules
             "trainer.gpus",  # the Memory tab's table of common GPUs
             "trainer.run.checkpoint_files",  # which checkpoints are complete: the Try tab lists them
             # File > Import... maps other trainers' configs by the same tables as `trainer import` (json, tomllib)
             "trainer.imports.command", "trainer.imports.report", "trainer.imports.kohya", "trainer.imports.sd_scripts",
             "trainer.imports.onetrainer", "trainer.imports.simpletuner", "trainer.imports.ai_toolkit"}
APP_MAY_IMPORT = CONTRACTS | {"trainer", "trainer.families", "trainer.data", "trainer.imports", "trainer.run"}  # empty packages


def test_app_never_imports_torch():
    code = ("import sys, app.main, app.window\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'accelerate', 'peft') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "trainer = sorted(m for m in sys.modules if m.startswith('trainer.'))\n"
            f"assert set(trainer) <= {APP_MAY_IMPORT!r}, trainer\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={"QT_QPA_PLATFORM": "offscreen", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr


def test_app_sources_import_only_the_contracts():
    """Static, so an import inside a function (run only on some click) counts too."""
    found = {(path.name, name) for path in (ROOT / "app").glob("*.py") for name in _imports(path)
             if name.split(".")[0] == "trainer"}
    assert found and {n for _, n in found} <= CONTRACTS, sorted(f for f in found if f[1] not in CONTRACTS)


def test_trainer_never_imports_qt():
    qt = {f"{path.name}: {name}" for path in (ROOT / "trainer").rglob("*.py") for name in _imports(path)
          if name.split(".")[0] in ("PySide6", "PyQt5", "PyQt6", "pyqtgraph", "shiboken6")}
    assert not qt


def test_app_sources_name_no_training_modules():
    for path in (ROOT / "app").glob("*.py"):
        text = path.read_text()
        for banned in ("import torch", "from torch", "import diffusers", "from diffusers", "processEvents"):
            assert banned not in text, f"{path.name} contains {banned!r}"


def test_qt_binding_keeps_none_alive():
    """PySide6 6.12.0 on Python 3.11 returns None from void methods without a reference: the window aborts
    with `none_dealloc` after a few minutes of live plotting. Pin PySide6-Essentials<6.12 there."""
    code = ("import sys\n"
            "from PySide6.QtWidgets import QApplication, QLabel\n"
            "app = QApplication([])\n"
            "label = QLabel()\n"
            "before = sys.getrefcount(None)\n"
            "for _ in range(1000):\n"
            "    label.setVisible(False)\n"
            "print(sys.getrefcount(None) - before, flush=True)\n"
            "import os; os._exit(0)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={"QT_QPA_PLATFORM": "offscreen", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    from app.main import qt_binding_problem
    assert int(result.stdout.strip()) > -500, qt_binding_problem() or "the Qt binding leaks references to None"


def _imports(path: Path) -> list[str]:
    """Every module a source file imports, wherever in the file (absolute names only; the window's are)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names
