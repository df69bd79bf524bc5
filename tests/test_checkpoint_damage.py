"""Checkpoints verify themselves: a truncated or altered file is found before loading, `--resume` falls back to the
newest intact checkpoint, `check --resume` says which it would use, and rotation never trades good ones for
damaged ones."""

import json

import torch

from trainer.run import checkpoint
from trainer.run.checkpoint_files import STATE_FILE, damage, newest_good
from trainer.cli import main
from trainer.events import read_events


def _save(root, steps, keep_last=3):
    param = torch.nn.Parameter(torch.arange(3.0))
    opt = torch.optim.AdamW([param], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    param.grad = torch.ones(3)
    opt.step()
    for step in steps:
        checkpoint.save(root, step, {"p": param}, opt.state_dict(), sched, {"epoch": 0}, keep_last=keep_last)


def _truncate(path, size=1000):
    data = path.read_bytes()
    path.write_bytes(data[:min(size, len(data) // 2)])


def test_each_checkpoint_records_its_files_and_finds_damage(tmp_path):
    _save(tmp_path, [1])
    folder = tmp_path / "step-1"
    files = json.loads((folder / STATE_FILE).read_text())["files"]
    assert set(files) == {"weights.safetensors", "optimizer.safetensors"}
    assert files["weights.safetensors"]["size"] == (folder / "weights.safetensors").stat().st_size
    assert damage(folder) is None
    data = bytearray((folder / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed: only the hash sees it
    (folder / "weights.safetensors").write_bytes(bytes(data))
    assert damage(folder, deep=False) is None
    assert damage(folder) == "weights.safetensors differs from what was written (SHA-256 mismatch)"
    (folder / "optimizer.safetensors").unlink()
    assert damage(folder) == "optimizer.safetensors is missing"
    (folder / STATE_FILE).write_text('{"files": ')  # cut short
    assert damage(folder).startswith("state.json is unreadable")


def test_rotation_keeps_the_good_checkpoints_behind_a_damaged_one(tmp_path):
    _save(tmp_path, [1, 2], keep_last=2)
    _truncate(tmp_path / "step-2" / "weights.safetensors")
    _save(tmp_path, [3], keep_last=2)
    # Counting step-2 would have deleted step-1, leaving one intact checkpoint instead of keep_last.
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["step-1", "step-2", "step-3"]
    _save(tmp_path, [4], keep_last=2)
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["step-3", "step-4"]  # two good newer ones exist


def test_resume_falls_back_from_a_truncated_checkpoint(demo_job, capsys):
    fast = ["--set", "validation.prompts=[]", "--set", "output.checkpoint_every=2"]
    assert main(["run", str(demo_job), *fast, "--set", "schedule.max_steps=4"]) == 0
    ckpts = demo_job.parent / "run" / "checkpoints"
    _truncate(ckpts / "step-4" / "weights.safetensors")  # a copy from a rented GPU cut short
    capsys.readouterr()

    assert main(["check", str(demo_job), "--resume", *fast]) == 0
    out = capsys.readouterr().out
    assert "resume: checkpoint " + str(ckpts / "step-4") + " is damaged: weights.safetensors is 1,000 bytes" in out
    assert f"resume: from {ckpts / 'step-2'} (step 2;" in out

    assert main(["run", str(demo_job), "--resume", *fast, "--set", "schedule.max_steps=6"]) == 0
    events, _ = read_events(demo_job.parent / "run" / "events.jsonl")
    first_end = min(i for i, e in enumerate(events) if e["type"] == "run_finished")
    resumed = events[first_end + 1:]
    assert [e["start_step"] for e in resumed if e["type"] == "run_started"] == [2]
    messages = [e["message"] for e in resumed if e["type"] == "log"]
    assert any("step-4 is damaged: weights.safetensors is 1,000 bytes" in m and m.endswith("older one")
               for m in messages)
    assert [e["step"] for e in resumed if e["type"] == "step"] == [3, 4, 5, 6]
    assert resumed[-1]["status"] == "completed"
    found, passed = newest_good(ckpts)
    assert found == ckpts / "step-6" and passed == []  # step-4 was written again, whole


def test_export_refuses_a_damaged_checkpoint_and_passes_over_one_in_a_run(tmp_path, capsys):
    import pytest

    from trainer.export.command import resolve_source
    from trainer.job import JobError, defaults

    run = tmp_path / "run"
    _save(run / "checkpoints", [1, 2])
    (run / "job.json").write_text(json.dumps(defaults()))
    _truncate(run / "checkpoints" / "step-2" / "optimizer.safetensors")
    with pytest.raises(JobError, match=r"step-2: a damaged checkpoint \(optimizer.safetensors is "):
        resolve_source(run / "checkpoints" / "step-2")
    assert resolve_source(run).checkpoint == run / "checkpoints" / "step-1"
    assert "step-2 is damaged: optimizer.safetensors" in capsys.readouterr().err
