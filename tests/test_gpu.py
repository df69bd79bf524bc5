"""The CUDA paths: bf16 and fp16 autocast with 8-bit AdamW on the tiny demo (skipped without a GPU).

The same loop runs on the CPU in tests/test_train.py; these check what only a GPU exercises.
"""

import json

import pytest

from trainer.cli import main
from trainer.events import read_events


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_with_8bit_adam_trains_on_cuda(demo_job, precision):
    assert main(["run", str(demo_job), "--set", f"precision.mixed_precision={precision}",
                 "--set", "optimizer.name=adamw8bit", "--set", "precision.gradient_checkpointing=true"]) == 0
    run = demo_job.parent / "run"
    events, _ = read_events(run / "events.jsonl")
    losses = [e["loss"] for e in events if e["type"] == "step"]
    assert len(losses) == 8 and all(loss == loss for loss in losses)  # no NaN
    assert events[-1]["status"] == "completed"
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((run / "job.json").read_text())["precision"]["mixed_precision"] == precision
