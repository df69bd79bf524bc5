"""The job schema: strict, versioned, sparse presets, dotted overrides."""

import json

import pytest

from trainer import job as jobmod
from trainer.job import CURRENT_VERSION, Job, JobError, from_sparse, load_job, load_preset, save_job


def test_round_trip_through_a_file(tmp_path):
    job = load_preset("sd15_lora_6gb")
    job.optimizer.betas = [0.8, 0.95]
    save_job(job, tmp_path / "job.json")
    again = load_job(tmp_path / "job.json")
    assert again == job
    assert json.loads((tmp_path / "job.json").read_text())["version"] == CURRENT_VERSION


def test_sparse_preset_round_trip(tmp_path):
    job = from_sparse({"network": {"rank": 32}, "schedule": {"seed": 7}})
    sparse = jobmod.to_sparse(job)
    assert sparse == {"version": CURRENT_VERSION, "network": {"rank": 32}, "schedule": {"seed": 7}}
    assert from_sparse(sparse) == job


@pytest.mark.parametrize("name", jobmod.list_presets())
def test_shipped_presets_are_valid_and_sparse(name):
    job = load_preset(name)
    data = json.loads((jobmod.PRESETS_DIR / f"{name}.json").read_text())
    assert jobmod.to_sparse(job) == data, "a preset should hold only what differs from the defaults"


def test_preset_merges_over_defaults():
    job = load_preset("demo")
    assert job.dataset.resolution == 64
    assert job.optimizer.name == Job().optimizer.name  # not in the preset: the default


def test_unknown_key_names_the_field():
    with pytest.raises(JobError, match=r"optimizer\.learnig_rate: unknown key"):
        from_sparse({"optimizer": {"learnig_rate": 1e-4}})


def test_wrong_type_names_the_field_and_value():
    with pytest.raises(JobError, match=r"network\.rank: .*integer.*'16'"):
        from_sparse({"network": {"rank": "16"}})


def test_out_of_range_names_the_field():
    with pytest.raises(JobError, match=r"dataset\.folders\.0\.repeats"):
        from_sparse({"dataset": {"folders": [{"path": "/x", "repeats": -1}]}})


def test_error_is_one_line(tmp_path):
    (tmp_path / "j.json").write_text('{"schedule": {"batch_size": 0}}')
    with pytest.raises(JobError) as err:
        load_job(tmp_path / "j.json")
    assert "\n" not in str(err.value) and "schedule.batch_size" in str(err.value)


def test_invalid_json_names_the_file_and_line(tmp_path):
    (tmp_path / "j.json").write_text('{"schedule": {\n "seed": 1,,}}')
    with pytest.raises(JobError, match=r"j\.json: not valid JSON \(line 2"):
        load_job(tmp_path / "j.json")


def test_steps_or_epochs_required():
    with pytest.raises(JobError, match="max_steps or epochs"):
        from_sparse({"schedule": {"max_steps": 0, "epochs": 0}})


def test_newer_version_is_refused():
    with pytest.raises(JobError, match="version: job version 99 is newer"):
        from_sparse({"version": 99})


def test_migration_steps_run_in_order(monkeypatch):
    # A pretend version 2 that renamed network.dim to network.rank: version-1 files must still load.
    monkeypatch.setattr(jobmod, "CURRENT_VERSION", 2)
    monkeypatch.setattr(jobmod, "MIGRATIONS", {1: lambda d: {**d, "network": {"rank": d["network"].pop("dim")}}})
    migrated = jobmod.migrate({"version": 1, "network": {"dim": 8}})
    assert migrated == {"version": 2, "network": {"rank": 8}}


def test_set_overrides_by_dotted_path(tmp_path):
    save_job(load_preset("demo"), tmp_path / "job.json")
    job = load_job(tmp_path / "job.json", ["optimizer.learning_rate=3e-4", "output.output_dir=/data/run",
                                           "validation.prompts=[\"a\", \"b\"]", "dataset.random_flip=true"])
    assert job.optimizer.learning_rate == 3e-4
    assert job.output.output_dir == "/data/run"
    assert job.validation.prompts == ["a", "b"]
    assert job.dataset.random_flip is True


def test_set_is_validated_like_the_file(tmp_path):
    save_job(load_preset("demo"), tmp_path / "job.json")
    with pytest.raises(JobError, match=r"schedule\.batch_sise: unknown key"):
        load_job(tmp_path / "job.json", ["schedule.batch_sise=4"])
    with pytest.raises(JobError, match=r"network\.rank"):
        load_job(tmp_path / "job.json", ["network.rank=many"])


def test_run_provenance_is_ignored_on_input(tmp_path):
    save_job(load_preset("demo"), tmp_path / "job.json", extra={"provenance": {"packages": {"torch": "x"}}})
    assert load_job(tmp_path / "job.json") == load_preset("demo")


def test_relative_paths_are_read_from_the_job_files_folder(tmp_path, monkeypatch):
    folder = tmp_path / "bundle"
    (folder / "model").mkdir(parents=True)
    (folder / "job.json").write_text(json.dumps({
        "model": {"path": "model", "config": "org/not-here"},
        "dataset": {"folders": [{"path": "data/0/dogs"}], "cache_dir": "../cache"},
        "prior": {"class_dir": "./class"},
        "output": {"output_dir": "output"}}))
    monkeypatch.chdir(tmp_path)  # not the job's folder: a relative path must not depend on where one runs from
    job = load_job(folder / "job.json", ["output.output_dir=elsewhere"])
    assert job.model.path == str(folder / "model")
    assert job.model.config == "org/not-here"  # no such folder beside the job: a hub id, left alone
    assert job.dataset.folders[0].path == str(folder / "data" / "0" / "dogs")
    assert job.dataset.cache_dir == str(tmp_path / "cache")
    assert job.prior.class_dir == str(folder / "class")
    assert job.output.output_dir == "elsewhere"  # --set values are the user's own, read from the working folder
    assert load_job(folder / "job.json").output.output_dir == str(folder / "output")
