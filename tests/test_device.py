"""Every stage runs on the run's device (RunConfig.device, --device): the plumbing, checked on the CPU ("cpu", and the
"meta" device where no forward is needed). What a GPU would run is not run here."""

import pytest
import torch

from tdcdiff.run import Run, RunConfig
from tdcdiff.train.loop import accelerator_device


def test_the_device_setting_resolves_auto_and_is_checked_up_front():
    assert RunConfig().device == "auto"
    assert RunConfig().torch_device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert RunConfig(device="cpu").torch_device == "cpu"
    with pytest.raises(ValueError, match=r"device must be auto, cpu, cuda or cuda:N, got gpu"):
        RunConfig(device="gpu").validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible here")
def test_a_cuda_device_this_machine_lacks_is_one_error_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from tdcdiff.cli import app

    result = CliRunner().invoke(app, ["run", "--device", "cuda", "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "device 'cuda' (--device) is not visible here: torch sees 0 CUDA device(s)" in result.output
    assert not (tmp_path / "run").exists()


def test_training_gets_the_device():
    assert accelerator_device("cpu") == {"cpu": True}
    assert accelerator_device(None) == {"cpu": not torch.cuda.is_available()}
    assert accelerator_device("cuda") == {"cpu": False}  # accelerate puts "cuda" on the current GPU


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run after stage 1, on the CPU."""
    from conftest import tiny_config

    config = tiny_config(device="cpu")
    config.base.steps = 2
    run = Run(tmp_path_factory.mktemp("device") / "run", config, progress=False)
    run.train_base()
    return run


def test_saved_models_load_onto_the_runs_device(trained, monkeypatch):
    assert trained.base_model().conv_in.weight.device.type == "cpu" and trained.sampling_precision == "fp32"
    monkeypatch.setattr(RunConfig, "torch_device", property(lambda self: "meta"))
    assert trained.base_model().conv_in.weight.device.type == "meta"
    monkeypatch.setattr(RunConfig, "torch_device", property(lambda self: "cuda"))
    assert trained.sampling_precision == "bf16"  # sample grids on a GPU: bf16 autocast


def test_training_and_sampling_are_handed_the_runs_device(trained, monkeypatch):
    """Stage 2 trains on the run's device, and the sample grids sample there."""
    from tdcdiff.run import stages

    calls = {}

    def record(name):
        def call(*args, **kwargs):
            calls[name] = kwargs
            raise StopIteration

        return call

    trained.prune()
    monkeypatch.setattr(RunConfig, "torch_device", property(lambda self: "meta"))
    monkeypatch.setattr(stages, "train", record("train"))
    monkeypatch.setattr(stages, "sample", record("sample"))
    run = Run(trained.dir, progress=False)
    with pytest.raises(StopIteration):
        run.finetune()
    assert calls["train"]["device"] == "meta"
    with pytest.raises(StopIteration):
        run.sample_grid("base", run.base_model())
    assert calls["sample"]["device"] == torch.device("meta") and calls["sample"]["precision"] == "fp32"


@pytest.mark.skipif(torch.backends.mps.is_available() or (hasattr(torch, "accelerator") and getattr(
    torch.accelerator.current_accelerator(), "type", None) == "mps"), reason="this machine has MPS")
def test_a_device_type_this_torch_build_lacks_is_one_error_before_reading(tmp_path, tiny_unet, scheduler):
    # attack 2026-12-07f row 552: load_bundle(device="mps") read and checked the whole bundle, then torch's
    # RuntimeError "PyTorch is not linked with support for mps devices" from Module.to
    from tdcdiff.bundle import load_bundle
    from tdcdiff.pipeline import sample
    from tdcdiff.train import TrainConfig, train

    message = r"^device 'mps' is not available here: this torch build and machine have 'cpu'.*; use 'cpu'$"
    with pytest.raises(ValueError, match=message):
        load_bundle(tmp_path / "nowhere", device="mps")  # the device first: no "no bundle at ..."
    with pytest.raises(ValueError, match=message):
        sample(tiny_unet, scheduler, sample_shape=(1, 8, 8), steps=2, device="mps", progress=False)
    with pytest.raises(ValueError, match=message):
        train(tiny_unet, torch.zeros(4, 1, 8, 8), scheduler, TrainConfig(steps=1, batch_size=2), tmp_path / "t",
              device="mps", progress=False)
    assert not (tmp_path / "t").exists()
