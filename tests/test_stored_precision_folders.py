"""The checkpoints users bring, SD3, Flux and Stable Cascade: each stored in fp32, fp16 and bf16 as a folder and a
variant folder, trains a LoRA that loads (tests/stored_matrix.py)."""

import stored_matrix

test_stored_model_trains_a_lora_that_loads = stored_matrix.matrix_test(("sd3", "flux", "cascade"))
