"""A headless run survives its terminal: a closed stdout and stderr (`| head`, a dropped SSH session) and SIGHUP
never stop training; events.jsonl and the --log file keep everything."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from trainer.events import read_events

ROOT = Path(__file__).resolve().parent.parent


def test_closed_pipes_and_sighup_do_not_stop_the_run(demo_job, tmp_path):
    run, log = demo_job.parent / "run", tmp_path / "train.log"
    cmd = [sys.executable, "-m", "trainer", "run", str(demo_job), "--log", str(log), "--set", "validation.prompts=[]",
           "--set", "schedule.max_steps=6", "--set", "output.checkpoint_every=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(proc.stderr.read(100)) == 100  # what `| head -c 100` reads, then it goes away
    proc.stdout.close()
    proc.stderr.close()
    deadline = time.monotonic() + 240
    while not (run / "events.jsonl").is_file() or not any(
            e["type"] == "step" for e in read_events(run / "events.jsonl")[0]):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first step"
        time.sleep(0.2)
    proc.send_signal(signal.SIGHUP)  # the terminal hangs up mid-run
    assert proc.wait(timeout=240) == 0
    events, _ = read_events(run / "events.jsonl")
    assert [e["step"] for e in events if e["type"] == "step"] == list(range(1, 7))
    assert events[-1]["type"] == "run_finished" and events[-1]["status"] == "completed"
    text = log.read_text()
    assert "checkpoint at step 6" in text and text.rstrip().endswith("run completed")
    assert "Traceback" not in text and "BrokenPipe" not in text


def test_a_hang_up_in_the_middle_of_a_write_loses_nothing(tmp_path):
    import io

    from trainer.run.terminal import _Tee

    class Terminal(io.StringIO):
        def write(self, text):
            tee.detach()  # SIGHUP's handler runs between write and flush, as it did in a real run
            return super().write(text)

    log = open(tmp_path / "log", "w", encoding="utf-8")
    tee = _Tee(Terminal(), log)
    assert tee.write("step 2/6\n") == 9
    tee.write("run completed\n")  # the terminal is gone: the log alone gets it
    log.close()
    assert (tmp_path / "log").read_text() == "step 2/6\nrun completed\n" and tee.terminal is None
