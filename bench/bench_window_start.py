"""Time from `python -m app` to the window's first painted frame.

    python bench/bench_window_start.py [--runs 10]
    xvfb-run -a python bench/bench_window_start.py     # a real X server instead of offscreen rendering

Each run starts a fresh interpreter with SDTRAINER_EXIT_AFTER_FIRST_FRAME=1: the app prints a line once the
first paint event has been handled and quits. The clock runs from just before the process is spawned to that
line, so interpreter start-up and every import count. Settings go to a temporary folder, not yours.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 2.0


def one_run(env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - start
    _, err = proc.communicate(timeout=30)
    if not line.startswith("first frame") or proc.returncode != 0:
        raise SystemExit(f"the window did not report a first frame (exit {proc.returncode}): {err.strip()[-500:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="sdtrainer-bench-")
    env = {**os.environ, "SDTRAINER_EXIT_AFTER_FIRST_FRAME": "1", "XDG_CONFIG_HOME": f"{home}/config",
           "XDG_DATA_HOME": f"{home}/data"}
    if not env.get("DISPLAY") and not env.get("WAYLAND_DISPLAY"):
        env.setdefault("QT_QPA_PLATFORM", "offscreen")
    platform = env.get("QT_QPA_PLATFORM") or ("wayland" if env.get("WAYLAND_DISPLAY") else "xcb")
    one_run(env)  # warm the OS file cache and __pycache__, as any second launch would be
    times = [one_run(env) for _ in range(args.runs)]
    median = statistics.median(times)
    print(f"window start to first frame ({platform}, {args.runs} runs): min {min(times):.3f} s, "
          f"median {median:.3f} s, max {max(times):.3f} s (target < {TARGET_S} s)")
    return 0 if median < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
