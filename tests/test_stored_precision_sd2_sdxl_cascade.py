"""The checkpoints users bring, SD2, SDXL and Stable Cascade: each stored in fp32, fp16 and bf16 as a folder, a
variant folder and (SD2, SDXL: the A1111 key layout) an original-layout single file, trains a LoRA that loads
(tests/stored_matrix.py; the matrix is split in two modules of about equal time, one for each of the suite's
workers)."""

import stored_matrix

test_stored_model_trains_a_lora_that_loads = stored_matrix.matrix_test(("sd2", "sdxl", "cascade"))
