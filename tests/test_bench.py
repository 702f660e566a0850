"""bench/benchmark.py --quick: the three arms at equal training compute, end to end in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmark_on_digits(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "TDCDIFF_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "benchmark.py"), "--data", "digits", "--quick",
                           "--quiet", "--seeds", "0", "--out", str(out), "--set", "k=0.6"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert results["bench"]["run_settings"]["k"] == 0.6
    names = [m["name"] for m in results["models"]]
    assert names == ["single model", "uniform-pruned", "TDC"]
    compute = {m["name"]: m["train_flops"] for m in results["models"]}
    for name in names:
        assert compute[name] == pytest.approx(compute["TDC"], rel=0.03), compute
    flops = {m["name"]: m["sampling_flops"]["ratio"] for m in results["models"]}
    assert flops["TDC"] < 1 and flops["uniform-pruned"] < 1
    assert (out / "report.html").exists() and (out / "seed_0" / "tdc" / "bundle" / "manifest.json").exists()
    assert "single model" in done.stdout and "TDC vs single model" in done.stdout
