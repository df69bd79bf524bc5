"""`trainer bundle`: a job and its data moved to another folder train there with no --set, and a file that
arrived damaged or not at all is named before anything trains."""

import json
import shutil
import tarfile

from trainer.bundle import MANIFEST
from trainer.cli import main
from trainer.events import read_events
from trainer.job import load_job, save_job


def _short(job_path):
    job = load_job(job_path)
    job.schedule.max_steps = 2
    job.validation.prompts = []
    save_job(job, job_path)
    return job_path


def test_a_bundle_moved_elsewhere_trains_there(demo_job, tmp_path, capsys):
    assert main(["bundle", str(_short(demo_job)), str(tmp_path / "b"), "--with-data", "--with-model"]) == 0
    assert "data included" in capsys.readouterr().out
    shutil.move(tmp_path / "b", tmp_path / "far" / "away")
    shutil.rmtree(demo_job.parent)  # nothing of the original may be needed
    moved = tmp_path / "far" / "away"
    manifest = json.loads((moved / MANIFEST).read_text())
    assert {e["path"] for e in manifest["files"]} >= {"data/0/dataset/00_orange_circle.png", "model/model_index.json"}
    assert main(["run", str(moved / "job.json")]) == 0
    steps = [e["step"] for e in read_events(moved / "output" / "events.jsonl")[0] if e["type"] == "step"]
    assert steps == [1, 2]
    assert (moved / "output" / "final").is_dir()


def test_a_missing_or_changed_file_is_named_and_nothing_trains(demo_job, tmp_path, capsys):
    bundle = tmp_path / "b"
    assert main(["bundle", str(demo_job), str(bundle), "--with-data", "--with-model"]) == 0
    image = bundle / "data/0/dataset/00_orange_circle.png"
    raw = bytearray(image.read_bytes())
    raw[-20] ^= 0xFF  # same size, other content
    image.write_bytes(bytes(raw))
    (bundle / "data/0/dataset/00_orange_circle.txt").unlink()
    (bundle / "model/unet/config.json").write_text("{}")
    capsys.readouterr()
    assert main(["run", str(bundle / "job.json")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "bundle: data/0/dataset/00_orange_circle.png: differs (same size, other content)" in err
    assert "bundle: data/0/dataset/00_orange_circle.txt: missing" in err
    assert any(line.startswith("bundle: model/unet/config.json: differs (size") for line in err)
    assert err[-1].startswith("error: ") and "3 file(s) missing or different" in err[-1]
    assert not (bundle / "output").exists()


def test_without_data_the_manifest_says_where_the_data_goes(demo_job, tmp_path, capsys):
    bundle = tmp_path / "b"
    assert main(["bundle", str(demo_job), str(bundle)]) == 0
    assert not (bundle / "data").exists()
    job = json.loads((bundle / "job.json").read_text())
    assert job["dataset"]["folders"][0]["path"] == "data/0/dataset"
    assert job["model"]["path"] == str(demo_job.parent / "model")  # local, not bundled: named with its hash
    capsys.readouterr()
    assert main(["check", "--no-estimate", str(bundle / "job.json")]) == 2
    assert "bundle: data/0/dataset/00_orange_circle.png: missing" in capsys.readouterr().err
    shutil.copytree(demo_job.parent / "dataset", bundle / "data/0/dataset")  # the user copies it there
    assert main(["check", "--no-estimate", str(bundle / "job.json")]) == 0


def test_tar_round_trip(demo_job, tmp_path, capsys):
    assert main(["bundle", str(demo_job), str(tmp_path / "job-bundle"), "--tar", "--with-data"]) == 0
    archive = tmp_path / "job-bundle.tar"
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "there", filter="data")
    job = tmp_path / "there" / "job-bundle" / "job.json"
    capsys.readouterr()
    assert main(["check", "--no-estimate", str(job)]) == 0
    assert load_job(job).dataset.folders[0].path == str(job.parent / "data/0/dataset")
    assert load_job(job).output.output_dir == str(job.parent / "output")
    assert main(["bundle", str(demo_job), str(archive), "--tar"]) == 2  # never written over
