"""speed.compile "regional": diffusers' compile_repeated_blocks on the denoiser after the LoRA is attached. On this
CPU with torch.compile's "aot_eager" backend (AOTAutograd's traced graphs, run without generated C++ code, which
would take minutes here): two steps give the uncompiled run's losses and LoRA weights. Inductor's kernels and the
speed are for bench/gpu_check.py on a GPU."""

import pytest
import torch
from safetensors.torch import load_file

from trainer.cli import main
from trainer.demo import BUILDERS
from trainer.events import read_events
from trainer.families.detect import family_module
from trainer.families.table import FAMILIES
from trainer.job import JobError, ModelSpec, load_job
from trainer.run import speed

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUICK = ["validation.prompts=[]", "schedule.max_steps=2", "schedule.batch_size=1", "output.checkpoint_every=0"]


def _run(job_path, out, *settings):
    args = ["run", str(job_path), "--set", f"output.output_dir={out}"]
    for item in (*QUICK, *settings):
        args += ["--set", item]
    assert main(args) == 0
    events = read_events(out / "events.jsonl")[0]
    return events, load_file(out / "final" / "pytorch_lora_weights.safetensors")


def test_regional_compile_trains_as_the_uncompiled_run(demo_job, tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    plain, plain_weights = _run(demo_job, tmp_path / "plain")
    compiled, compiled_weights = _run(demo_job, tmp_path / "compiled", "speed.compile=regional")
    torch._dynamo.reset()
    losses = {name: [e["loss"] for e in got if e["type"] == "step"] for name, got in
              (("plain", plain), ("compiled", compiled))}
    assert len(losses["plain"]) == 2
    # AOTAutograd's decompositions may order a sum differently: equal to float32 rounding, not bit for bit.
    assert losses["compiled"] == pytest.approx(losses["plain"], rel=1e-5)
    assert plain_weights.keys() == compiled_weights.keys()
    for key, value in plain_weights.items():
        torch.testing.assert_close(compiled_weights[key], value, rtol=1e-4, atol=1e-6)
    # The demo UNet's BasicTransformerBlocks (diffusers' own `_repeated_blocks`) were compiled.
    assert any("torch.compile (aot_eager) of 4 repeated blocks (BasicTransformerBlock)" in str(e.get("message"))
               for e in compiled)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_every_family_has_repeated_blocks_to_compile(family, tmp_path, monkeypatch):
    """diffusers names them for the UNets and Flux; the family table for SD3 and Stable Cascade. Compiling is
    lazy (at the first call), so this costs nothing."""
    BUILDERS[family](tmp_path / "model")
    denoiser = family_module(family).load(ModelSpec(path=str(tmp_path / "model"))).denoiser
    note = speed.compile_repeated_blocks(denoiser, FAMILIES[family].repeated_blocks)
    compiled = [m for m in denoiser.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled and f"of {len(compiled)} repeated blocks" in note


def test_check_says_compile_is_on(demo_job, capsys):
    assert main(["check", str(demo_job), "--no-estimate"]) == 0
    assert "speed: torch.compile" not in capsys.readouterr().out
    assert main(["check", str(demo_job), "--no-estimate", "--set", "speed.compile=regional"]) == 0
    assert "speed: torch.compile of the denoiser's repeated blocks (regional)" in capsys.readouterr().out


def test_compile_with_block_swap_is_refused_in_one_line(demo_job):
    with pytest.raises(JobError, match="speed.compile: regional compilation with memory.block_swap"):
        load_job(demo_job, ["speed.compile=regional", "memory.block_swap=2"])
