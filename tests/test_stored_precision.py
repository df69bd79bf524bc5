"""The checkpoints users bring, SD1, SD2 and SDXL: each stored in fp32, fp16 and bf16 as a folder, a variant folder
and an original-layout single file (SDXL's in the A1111 layout), trains a LoRA that loads (tests/stored_matrix.py)."""

import pytest

import stored_matrix

pytestmark = pytest.mark.usefixtures("one_torch_thread", "any_precision")


@pytest.mark.parametrize("family,dtype,form,precision", stored_matrix.cells(("sd1", "sd2", "sdxl")))
def test_stored_model_trains_a_lora_that_loads(stored_model, matrix_dataset, matrix_pipelines, family, dtype, form,
                                                precision, tmp_path):
    stored_matrix.trains_a_lora_that_loads(stored_model, matrix_dataset, matrix_pipelines, family, dtype, form,
                                           precision, tmp_path)
