"""bench/gpu_cifar10.py, the GPU script, on the CPU at its toy size: the estimate, tune's frontier and the device."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_script_runs_tunes_frontier_at_a_toy_size_on_the_cpu(tmp_path):
    env = {**os.environ, "TDCDIFF_CACHE": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_cifar10.py"), "--out", str(tmp_path / "tune"),
                           "--data", "digits", "--limit", "300", "--quiet"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert out.startswith("device: cpu") and "toy size, 30 stage-1 steps, 4 steps per candidate" in out
    assert "\nstage 1 " in out and "\nscreening " in out and "CPU-hours here" in out  # the estimate, first
    rows = {line.strip(" *").split("  ")[0] for line in out.split("\nchosen: ")[0].splitlines()}
    assert {"base", "single", "uniform 0.6", "TDC k=0.3 N=2 snr"} <= rows, out  # the frontier's table
    assert "\nchosen: " in out and "min of process CPU (estimated " in out
    assert (tmp_path / "tune" / "frontier.png").exists() and (tmp_path / "tune" / "results.json").exists()
