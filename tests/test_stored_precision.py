"""The checkpoints users bring, SD1, SD2 and SDXL: each stored in fp32, fp16 and bf16 as a folder, a variant folder
and an original-layout single file (SDXL's in the A1111 layout), trains a LoRA that loads (tests/stored_matrix.py)."""

import stored_matrix

test_stored_model_trains_a_lora_that_loads = stored_matrix.matrix_test(("sd1", "sd2", "sdxl"))
