"""`trainer check` and the bad inputs `run` refuses: exit 2 and one line naming the field or file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.cli import main
from trainer.job import load_job, save_job

ROOT = Path(__file__).resolve().parent.parent


def _edit(job_path: Path, **changes) -> Path:
    job = load_job(job_path)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        setattr(getattr(job, section), key, value)
    save_job(job, job_path)
    return job_path


def test_check_prints_the_plan(demo_job, capsys):
    assert main(["check", str(demo_job)]) == 0
    out = capsys.readouterr().out
    assert "images: 12 (11 with captions, 1 missing" in out
    assert "total steps: 8" in out
    assert "steps per epoch: 6" in out  # 12 images / batch 2
    assert str(demo_job.parent / "run") in out


def test_check_counts_kohya_repeat_folders(demo_job, capsys):
    sub = demo_job.parent / "dataset" / "3_extra"
    sub.mkdir()
    src = sorted((demo_job.parent / "dataset").glob("*.png"))[0]
    (sub / "a.png").write_bytes(src.read_bytes())
    assert main(["check", str(demo_job)]) == 0
    out = capsys.readouterr().out
    assert "1 images x 3 repeats" in out
    assert "samples per epoch (with repeats): 15" in out


def _exit2(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_missing_model_path(demo_job, capsys):
    _edit(demo_job, model__path=str(demo_job.parent / "nope"))
    assert "model.path" in _exit2(capsys, "check", str(demo_job))


def test_folder_with_no_images(demo_job, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    job = load_job(demo_job)
    job.dataset.folders[0].path = str(empty)
    save_job(job, demo_job)
    assert "dataset.folders: no images" in _exit2(capsys, "check", str(demo_job))


def test_wrong_type_and_unknown_key(demo_job, capsys):
    data = json.loads(demo_job.read_text())
    data["schedule"]["batch_size"] = "2"
    demo_job.write_text(json.dumps(data))
    assert "schedule.batch_size" in _exit2(capsys, "check", str(demo_job))
    data["schedule"]["batch_size"] = 2
    data["optimizer"]["lr"] = 1
    demo_job.write_text(json.dumps(data))
    assert "optimizer.lr: unknown key" in _exit2(capsys, "run", str(demo_job))


def test_output_dir_inside_dataset(demo_job, capsys):
    _edit(demo_job, output__output_dir=str(demo_job.parent / "dataset" / "run"))
    assert "output.output_dir" in _exit2(capsys, "run", str(demo_job))
    assert not (demo_job.parent / "dataset" / "run").exists()


def test_existing_run_needs_resume(demo_job, capsys):
    run = demo_job.parent / "run"
    run.mkdir()
    (run / "events.jsonl").write_text("keep me\n")
    err = _exit2(capsys, "run", str(demo_job))
    assert "--resume" in err and "output.output_dir" in err
    assert (run / "events.jsonl").read_text() == "keep me\n"  # nothing already written is touched


def test_missing_job_file(capsys, tmp_path):
    assert "file not found" in _exit2(capsys, "check", str(tmp_path / "job.json"))


def test_check_needs_no_torch(demo_job):
    """Without its memory-estimate line (which traces a step with torch), check imports no torch."""
    code = ("import sys; from trainer.cli import main; rc = main(['check', sys.argv[1], '--no-estimate']); "
            "assert 'torch' not in sys.modules, 'check imported torch'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(demo_job)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("argv", [["run"], ["frobnicate", "x"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2


def test_bad_block_name(demo_job, capsys):
    _edit(demo_job, layers__train_blocks=["down_blocks.9"])
    err = _exit2(capsys, "check", str(demo_job))
    assert "layers.train_blocks: 'down_blocks.9'" in err and "down_blocks.0" in err
