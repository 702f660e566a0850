"""The bad-input catalogue (docs/errors.md): every entry fails fast with a message naming the problem."""

import errno
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from tdcdiff.cli import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"

CLI_CASES = [
    ("k zero", ["run", "--k", "0"], r"k must be in \(0, 1\]"),
    ("k above one", ["run", "--k", "1.5"], r"k must be in \(0, 1\]"),
    ("no groups", ["run", "--groups", "0"], "number of groups N must be >= 1"),
    ("more groups than timesteps", ["run", "--groups", "2000"], "N=2000 exceeds T=1000"),
    ("zero sampling steps", ["run", "--steps", "0"], "sampling steps must be between 1 and T=1000"),
    ("learning rate too large", ["run", "--base-lr", "5"], r"learning rate must be in \(0, 1\)"),
    ("unknown sampler", ["run", "--sampler", "euler"], "unknown sampler 'euler'"),
    ("unknown grouping", ["run", "--grouping", "equal"], "unknown grouping strategy 'equal'"),
    ("unknown proposer", ["run", "--proposer", "gpt"], "unknown proposer 'gpt'"),
    ("unknown ordering", ["run", "--ordering", "random"], "unknown difficulty ordering 'random'"),
    ("unknown schedule", ["run", "--schedule", "cosine"], "unknown beta_schedule 'cosine'"),
    ("unknown importance", ["run", "--importance", "random"], "unknown importance 'random'"),
    ("mix out of range", ["run", "--mix", "2"], r"mix_fraction must be in \[0, 1\]"),
    ("unknown budget unit", ["run", "--budget-unit", "seconds"], "unknown budget unit 'seconds'"),
    ("latency batch zero", ["run", "--latency-batch", "0"], "latency_batch must be >= 1, got 0"),
    ("missing data path", ["run", "--data", "/no/such/images"], r"/no/such/images. is neither a known dataset name .* nor an existing path"),
    ("missing config file", ["run", "--config", "/no/such.yaml"], "config file /no/such.yaml does not exist"),
    ("plan before training", ["plan"], "no trained base model at"),
    ("missing bundle", ["sample", "--bundle", "/no/such/bundle"], "no bundle at /no/such/bundle"),
]


@pytest.mark.parametrize("name, args, message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_rejects_bad_input_with_a_clear_message(name, args, message, tmp_path):
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")] if args[0] != "sample" else args)
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "base" / "final").exists()


@pytest.mark.parametrize(
    "content, suffix, message",
    [("bogus: 1\n", ".yaml", r"unknown config keys \['bogus'\]"), ("base:\n  nonsense: 3\n", ".yaml", "unknown keys .* in config section 'base'"),
     ("k = 0.3\n", ".ini", r"must end in \.yaml, \.yml, \.toml or \.json"), ("base:\n  lr: fast\n", ".yaml", "'base.lr' must be a number")],
)
def test_bad_config_files(tmp_path, content, suffix, message):
    path = tmp_path / f"config{suffix}"
    path.write_text(content)
    result = CliRunner().invoke(app, ["run", "--config", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and re.search(message, result.output), result.output


def test_llm_proposer_without_endpoint_fails_before_training(tmp_path):
    unset = {name: None for name in ("TDCDIFF_LLM_BASE_URL", "OPENAI_BASE_URL", "TDCDIFF_LLM_MODEL")}
    result = CliRunner().invoke(app, ["run", "--proposer", "llm", "--out", str(tmp_path / "run")], env=unset)
    assert result.exit_code == 2 and "TDCDIFF_LLM_BASE_URL" in result.output, result.output
    assert not (tmp_path / "run" / "base").exists()


def test_model_whose_output_shape_differs_from_its_input(scheduler):
    from tdcdiff.pipeline import sample

    class Squash(nn.Module):
        def forward(self, x, t):
            return x.mean(dim=1, keepdim=True).repeat(1, 3, 1, 1)  # 2 x 1 channels would be a learned variance

    with pytest.raises(ValueError, match=r"denoiser output has shape \(64, 3, 8, 8\) but its input has shape \(64, 1, 8, 8\)"):
        sample(Squash(), scheduler, sample_shape=(1, 8, 8), steps=2, progress=False)


def test_data_with_the_wrong_channel_count_for_the_model(tmp_path, digits, scheduler):
    from tdcdiff.models import build_unet
    from tdcdiff.train import TrainConfig, train

    with pytest.raises(ValueError, match="takes 3-channel images but the data has 1 channels"):
        train(build_unet("digits-8", in_channels=3), digits.images, scheduler, TrainConfig(steps=1), tmp_path, progress=False)


def test_full_disk_names_the_file_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    from tdcdiff import serialization
    from tdcdiff.models import build_unet

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(serialization.os, "fsync", no_space)
    with pytest.raises(OSError, match=r"no space left on device while writing .*plan\.json"):
        serialization.atomic_write_text(tmp_path / "plan.json", "{}")
    with pytest.raises(OSError, match=r"no space left on device while writing .*model"):
        serialization.save_model(build_unet("digits-8"), tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_every_case_is_in_the_catalogue():
    text = DOC.read_text()
    for name, _, _ in CLI_CASES:
        assert f"| {name} |" in text, f"docs/errors.md lacks '{name}'"


def test_nothing_is_unpickled():
    """Files a user may be handed are read with safetensors or JSON; never pickle or an unrestricted torch.load."""
    source = Path(__file__).resolve().parents[1] / "src" / "tdcdiff"
    for path in source.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
