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
