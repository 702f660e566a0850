"""bench/recipes.py --quick: every stage-2 recipe on one pruned expert, equal compute, end to end in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_recipe_comparison(tmp_path):
    # No timeout: on a loaded machine --quick can take minutes, and a slow machine is not a failure.
    out = tmp_path / "recipes"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "recipes.py"), "--quick", "--quiet", "--budgets", "0.5",
                           "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "TDCDIFF_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = {r["recipe"]: r for r in results["rows"]}
    assert list(rows) == ["plain", "distill", "features", "mix", "longer (2x)"]
    assert results["timesteps"] == "t 0-302"
    plain = rows["plain"]["train_flops"]
    for name in ("distill", "features", "mix"):  # equal compute: fewer steps where a teacher runs
        assert rows[name]["equal_compute"] and rows[name]["train_flops"] == pytest.approx(plain, rel=0.25)
    assert rows["distill"]["steps"] < rows["plain"]["steps"] == rows["mix"]["steps"]
    assert rows["longer (2x)"]["train_flops"] == 2 * plain and not rows["longer (2x)"]["equal_compute"]
    assert rows["features"]["runs"][0]["feature_points"] and not rows["plain"]["runs"][0]["feature_points"]
    assert rows["plain"]["bpd_minus_plain"] == 0 and rows["distill"]["bpd_minus_plain_se"] > 0
    assert "features" in done.stdout and "bpd - plain" in done.stdout
    # The experts keep the pruned architecture: feature distillation's projections are not in them.
    pruned, trained = (json.loads((out / "budget_0.5" / d / "architecture.json").read_text())
                       for d in ("pruned", "seed_0/features/final"))
    assert trained["class"] == pruned["class"] and trained["config"] == pruned["config"]
    assert trained["weights"]["bytes"] == pruned["weights"]["bytes"]  # the same tensors, no projections added
