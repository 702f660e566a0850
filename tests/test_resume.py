"""Crash and resume for real: a CLI process is SIGKILLed mid-stage, rerun, and must finish with exactly
what an uninterrupted run gives."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

CONFIG = """
base: {steps: 60, batch_size: 32, lr: 0.002, warmup_steps: 2, checkpoint_every: 10, log_every: 10}
groups: 2
k: 0.4
search: {rounds: 1, candidates_per_round: 2}
finetune: {steps: 40, batch_size: 32, lr: 0.0005, warmup_steps: 1, checkpoint_every: 10, log_every: 10}
sample_steps: 4
num_samples: 8
eval_samples: 32
eval_seeds: 1
"""


def cli(*args):
    return [sys.executable, "-m", "tdcdiff.cli", *args, "--quiet"]


def run_to_end(args, cwd):
    proc = subprocess.run(cli(*args), capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]


def kill_when(args, cwd, marker: Path):
    """Start the command, SIGKILL it as soon as `marker` exists; return False if it finished first."""
    proc = subprocess.Popen(cli(*args), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        if marker.exists():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    return False


def assert_same_weights(a: Path, b: Path):
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0)


@pytest.fixture()
def config_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    return path


@pytest.mark.slow
def test_train_base_killed_mid_training_resumes_to_the_same_weights(tmp_path, config_file):
    run_to_end(["train-base", "--out", "straight", "--config", str(config_file)], tmp_path)
    killed = tmp_path / "killed"
    assert kill_when(["train-base", "--out", "killed", "--config", str(config_file)], tmp_path,
                     killed / "base" / "checkpoint" / "state.json"), "the run finished before it could be killed"
    assert not (killed / "base" / "final").exists()
    run_to_end(["train-base", "--out", "killed", "--config", str(config_file)], tmp_path)
    assert_same_weights(tmp_path / "straight/base/final/model.safetensors", killed / "base/final/model.safetensors")


@pytest.mark.slow
def test_run_killed_in_stage_two_resumes_to_the_same_bundle(tmp_path, config_file):
    run_to_end(["run", "--out", "straight", "--config", str(config_file)], tmp_path)
    killed = tmp_path / "killed"
    assert kill_when(["run", "--out", "killed", "--config", str(config_file)], tmp_path,
                     killed / "finetune" / "group_0" / "checkpoint" / "state.json"), \
        "the run finished before it could be killed"
    assert not (killed / "bundle").exists()
    run_to_end(["run", "--out", "killed", "--config", str(config_file)], tmp_path)
    for group in (0, 1):
        assert_same_weights(tmp_path / f"straight/bundle/expert_{group}/model.safetensors",
                            killed / f"bundle/expert_{group}/model.safetensors")


# -- check_out_dir: a run's samples/ and report/, a tune's candidates/, a diffusers model folder and a folder that only
# looks like tdcdiff's (attack 2026-12-07g rows 700, 701, 704, 708) ------------------------------------------------
def _not_outs(tmp_path):
    """{folder: the refusal after "--out <folder> " with {what} and {kind}} for run and tune."""
    import json

    from diffusers import UNet2DModel

    for folder in ("R/samples", "R/report", "T/candidates/00-single", "web", "proj/checkpoint"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "R" / "config.json").write_text("{}")
    (tmp_path / "R" / "samples" / "tdc.png").write_bytes(b"")
    (tmp_path / "R" / "report" / "report.html").write_text("")
    (tmp_path / "T" / "tune.json").write_text("{}")
    (tmp_path / "web" / "manifest.json").write_text(json.dumps({"name": "my web app", "icons": []}))
    (tmp_path / "proj" / "train.py").write_text("")
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=4,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                layers_per_block=1).save_pretrained(tmp_path / "M")
    mixed = "a {kind} there would mix its files into it; use a new or empty --out"
    then = "{then}"
    return {"R/samples": f"is the samples/ folder of run {tmp_path}/R (its sample grids), not a {{what}}: {mixed}",
            "R/report": f"is the report/ folder of run {tmp_path}/R (its report), not a {{what}}: {mixed}",
            "T/candidates": f"is the candidates/ folder of tune {tmp_path}/T (its candidate runs), not a {{what}}: "
                            f"{mixed}",
            "M": f"is a diffusers model (config.json and diffusion_pytorch_model weights), not a {{what}}: tdcdiff "
                 f"takes it as the trained model to prune, `tdcdiff run --base {tmp_path}/M` (or Run(..., "
                 f"base=...)){then}; use a new or empty --out",
            "web": f"is not empty and not a tdcdiff {{what}} (it holds manifest.json, which is not a tdcdiff bundle's "
                   f"manifest): {mixed}",
            "proj": f"is not empty and not a tdcdiff {{what}} (it holds checkpoint/, which is not a training "
                    f"checkpoint): {mixed}"}


@pytest.mark.parametrize("command", ["run", "tune"])
def test_run_folders_tune_candidates_and_foreign_folders_are_refused_as_out_by_name(tmp_path, command):
    from typer.testing import CliRunner

    from tdcdiff.cli import app
    from tdcdiff.run import Run
    from tdcdiff.run.rundir import check_out_dir
    from tdcdiff.tune import Tune

    outs = _not_outs(tmp_path)
    what, kind = {"run": ("run directory", "run"), "tune": ("tune directory", "tune")}[command]
    then = "" if command == "run" else ", then give that run as --base-from of `tdcdiff tune`"
    before = sorted(tmp_path.rglob("*"))
    for out, message in outs.items():
        expected = f"--out {tmp_path}/{out} " + message.format(what=what, kind=kind, then=then)
        result = CliRunner().invoke(app, [command, "--out", str(tmp_path / out), "--base-steps", "1", "--dry-run"])
        assert result.exit_code == 2 and result.output == f"error: {expected}\n", (out, result.output)
        with pytest.raises(ValueError) as refused:
            check_out_dir(tmp_path / out, what, "--out")
        assert str(refused.value) == expected
        api = Tune if command == "tune" else lambda p, progress: Run(p, progress=progress).train_base()
        with pytest.raises(ValueError) as refused:
            api(tmp_path / out, progress=False)
        assert str(refused.value) == expected.replace("--out ", "").replace("empty --out", "empty directory")
    assert sorted(tmp_path.rglob("*")) == before
    check_out_dir(tmp_path / "T" / "candidates" / "00-single", "run directory")  # a candidate run: a run directory
    (tmp_path / "mine").mkdir()  # the user's own files only: kept beside the run, as before
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    check_out_dir(tmp_path / "mine", what)
