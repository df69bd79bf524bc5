"""Every family: its module satisfies the contract, and the torch-free table says what the module and a real
(tiny) model of the family do."""

import json
from typing import get_args

import pytest
import torch

from trainer.demo import BUILDERS, MID_WIDTHS
from trainer.families.contract import FamilyModule
from trainer.families.detect import detect_family, family_module
from trainer.families.table import FAMILIES
from trainer.real_size import MODELS as REAL_SIZE
from trainer.job import JobError, ModelSpec



@pytest.mark.parametrize("name", FAMILIES)
def test_module_satisfies_the_contract_and_agrees_with_the_table(name):
    module, row = family_module(name), FAMILIES[name]
    missing = [m for m in dir(FamilyModule) if not m.startswith("_") and not hasattr(module, m)]
    assert isinstance(module, FamilyModule), missing
    assert module.DENOISER == row.denoiser and module.IMAGE_ENCODER == row.image_encoder
    pair = {"blocks.0.to_q.lora_A.weight": torch.ones(2, 4), "blocks.0.to_q.lora_B.weight": torch.ones(4, 2)}
    if row.kohya:
        assert len(module.kohya_state_dict({row.denoiser: pair}, 1.0)) >= 2
    else:
        with pytest.raises(JobError):
            module.kohya_state_dict({row.denoiser: pair}, 1.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    return {name: BUILDERS[name](root / name) for name in FAMILIES}


@pytest.mark.parametrize("name", FAMILIES)
def test_a_model_of_the_family_has_what_the_table_says(models, name):
    row, path = FAMILIES[name], models[name]
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == row.pipeline_class
    assert detect_family(ModelSpec(path=str(path))) == name
    for folder in (row.denoiser, row.image_encoder, *row.text_encoders, *row.text_cache_folders, *row.t5_folders):
        assert (path / folder).is_dir(), folder
    parts = family_module(name).load(ModelSpec(path=str(path)))
    assert list(family_module(name).text_encoders(parts)) == list(row.text_encoders)
    top = {child for child, _ in parts.denoiser.named_children()}
    assert set(row.block_roots) <= top, top
    assert set(row.swap_blocks) <= top, top  # block swap streams these


def test_every_list_of_families_is_the_table():
    assert list(BUILDERS) == list(MID_WIDTHS) == list(REAL_SIZE) == list(FAMILIES)
    assert get_args(ModelSpec.model_fields["family"].annotation) == ("auto", *FAMILIES)
