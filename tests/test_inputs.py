"""Inputs that are checked before any work: a given model's size and fit (built on the meta device first), the
memory one training batch or one sampling run needs, the null class against the data's classes, timesteps that
are not integers, repeated tune options, and tune's refusals before anything is written."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from tdcdiff.base_model import BaseModelError, check_fits_data, load_base_model
from tdcdiff.cli import app

UNET = {"_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 1, "out_channels": 1,
        "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]}


def model_dir(path, widths, **config):
    """A diffusers model directory whose config.json asks for `widths` and whose weights file holds one tensor:
    what is checked before the weights are read never needs them."""
    path.mkdir()
    groups = min(32, min(widths))
    (path / "config.json").write_text(json.dumps({**UNET, "block_out_channels": widths, "norm_num_groups": groups,
                                                  **config}))
    save_file({"conv_in.bias": torch.zeros(widths[0])}, path / "diffusion_pytorch_model.safetensors")
    return path


@pytest.fixture()
def parameter_devices():
    """The device of every parameter registered while the test runs (torch's module registration hook)."""
    from torch.nn.modules import module

    devices = []
    handle = module.register_module_parameter_registration_hook(lambda m, name, p: devices.append(p.device.type))
    yield devices
    handle.remove()


def test_huge_given_model_that_does_not_fit_the_data_is_refused_on_the_meta_device(tmp_path, parameter_devices):
    """block_out_channels [1024, 2048] (933 M parameters, 2.9 GB built): refused for its channel count before one
    parameter exists off the meta device, and through the CLI before the run directory is made."""
    given = model_dir(tmp_path / "wide", [1024, 2048], in_channels=3, out_channels=3)

    def check(model, vae, text_encoder):
        check_fits_data(model, str(given), channels=1, image_size=8, data_name="digits", num_classes=10,
                        null_class=None, num_train_timesteps=1000)

    with pytest.raises(BaseModelError, match=r"the model takes 3-channel images but the data has 1 channels"):
        load_base_model(str(given), check)
    assert parameter_devices and set(parameter_devices) == {"meta"}
    result = CliRunner().invoke(app, ["run", "--base", str(given), "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 2 and "the model takes 3-channel images" in result.output, result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "run").exists()


def test_given_model_whose_weights_exceed_memory(tmp_path, parameter_devices):
    """Widths of 2**16 and 2**17: about 4e12 parameters, 15 TiB of float32, on any machine more than it has."""
    given = model_dir(tmp_path / "huge", [2**16, 2**17])
    with pytest.raises(BaseModelError, match=rf"the weights of {given} \([\d,]+ parameters as float32\) needs about "
                                             r"[\d.]+ GiB, more than the [\d.]+ GiB of memory this machine has "
                                             r"available now; use a smaller model"):
        load_base_model(str(given))
    assert set(parameter_devices) == {"meta"}


def test_given_weights_that_lack_tensors_of_the_config(tmp_path):
    """diffusers leaves what a weights file lacks on the meta device (or initialises it): refused, named."""
    given = model_dir(tmp_path / "partial", [32, 64])
    with pytest.raises(BaseModelError, match=rf"{given}'s weights lack \d+ of the tensors its config.json's model "
                                             r"has \(e.g. conv_in.weight, .*\): they were not saved with that config"):
        load_base_model(str(given))


def test_given_config_that_is_not_a_regular_file_or_no_model(tmp_path):
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    __import__("os").mkfifo(fifo / "config.json")  # would block a plain read forever
    with pytest.raises(BaseModelError, match=r"fifo/config.json is not a regular file"):
        load_base_model(str(fifo))
    bad = model_dir(tmp_path / "bad", [32, 64, 128])  # three widths for two blocks
    with pytest.raises(BaseModelError, match=r"cannot build UNet2DModel from .*bad/config.json: Must provide the same "
                                             r"number of `block_out_channels` as `down_block_types`.*; write the "):
        load_base_model(str(bad))


def test_given_config_of_too_many_modules_is_stopped_while_it_is_built(tmp_path):
    """layers_per_block 20000, a few bytes of config.json: minutes of building modules before, now a stated cap."""
    given = model_dir(tmp_path / "deep", [32, 64], layers_per_block=20000)
    with pytest.raises(BaseModelError, match=r"deep/config.json describes a model of more than 10,000 modules \(a "
                                             r"DiT-XL has 763\), a stated maximum; check its layer counts"):
        load_base_model(str(given))


def test_training_that_needs_more_memory_than_the_machine_has(tmp_path, monkeypatch):
    """The run's own preset at --image-size 4096: 1 M parameters, but one batch's activations are terabytes. The
    machine is given 16 GiB available: with less (a busy machine), an earlier check (the latency batch's 8 GiB)
    would speak first."""
    from tdcdiff import capacity

    monkeypatch.setattr(capacity, "available_memory", lambda: 16 << 30)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train-base", "--image-size", "4096", "--limit", "4", "--out", str(out), "-q"])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and not out.exists()
    assert ("error: training the UNet preset 'gray-32' (1,045,729 parameters: 19.9 MiB for weights, gradients, AdamW "
            "moments and EMA; one batch of 128 images of 1x4096x4096: about 13576.0 GiB of activations) needs about "
            "13576.0 GiB, more than the ") in result.output, result.output
    assert result.output.rstrip().endswith("lower --batch-size (base.batch_size, finetune.batch_size) or --image-size")


# -- the null class is no class of the data ------------------------------------------------------------------------
def _conditional(tmp_path, classes=11):
    from diffusers import UNet2DModel

    model = UNet2DModel(**{k: v for k, v in UNET.items() if k != "_class_name"}, block_out_channels=(8, 16),
                        norm_num_groups=8, num_class_embeds=classes)
    model.save_pretrained(tmp_path / "model")
    return model


def test_null_class_that_is_a_class_of_the_data_is_refused_before_work(tmp_path, digits, scheduler):
    from conftest import tiny_config
    from tdcdiff.run import Run
    from tdcdiff.train import TrainConfig, train

    model = _conditional(tmp_path)
    config = tiny_config()
    config.base = replace(config.base, label_dropout=0.1, null_class=3)
    run = Run(tmp_path / "run", config, progress=False, base=tmp_path / "model")
    with pytest.raises(ValueError, match=r"null_class 3 is also class 3 of the data 'digits' \(its classes are "
                                         r"0..9\): dropped labels would be read as that class; set null_class "
                                         r"\(base.null_class, finetune.null_class\) to an id no image has, e.g. 10"):
        run.train_base()
    assert not (tmp_path / "run").exists()
    config.base = replace(config.base, null_class=11)
    with pytest.raises(ValueError, match=r"null_class 11 is not one of the 11 class ids --base .* embeds \(0..10\)"):
        Run(tmp_path / "run", config, progress=False, base=tmp_path / "model").train_base()
    # where the data's classes are only known at training: train() itself
    with pytest.raises(ValueError, match=r"null_class 3 is also a class of the data \(its labels are 0..7\): dropped "
                                         r"labels would be read as that class; set null_class to .* e.g. 10"):
        train(model, digits.images[:8], scheduler, TrainConfig(steps=1, label_dropout=0.1, null_class=3),
              tmp_path / "t", labels=digits.labels[:8], progress=False)
    assert not (tmp_path / "t").exists()


# -- sampling: integer timesteps, the null class, memory -----------------------------------------------------------
def test_sampling_model_refuses_a_fractional_timestep_instead_of_truncating_it(tiny_unet):
    """A sigma-space loop's t = 12.7 was evaluated at t = 12; now refused with the reason, 12.0 taken as 12."""
    from tdcdiff.grouping import make_groups
    from tdcdiff.pipeline import SamplingModel
    from tdcdiff.router import Router
    from tdcdiff.schedule import make_scheduler

    x = torch.randn(2, 1, 8, 8)
    router = Router([tiny_unet, tiny_unet], make_groups("uniform", 2, make_scheduler(1000)))
    for model in (tiny_unet, router):
        runner = SamplingModel(model, compile="none")
        with pytest.raises(ValueError, match=r"timestep 12.7 is not an integer: diffusion timesteps here are the "
                                             r"integer training timesteps 0..T-1"):
            runner(x, 12.7)
        torch.testing.assert_close(runner(x, 12.0), runner(x, 12), rtol=0, atol=0)
        torch.testing.assert_close(runner(x, torch.tensor(12)), runner(x, 12), rtol=0, atol=0)


def test_guidance_with_a_null_class_that_is_a_class_of_the_data(tmp_path, scheduler):
    from tdcdiff.pipeline import sample

    model = _conditional(tmp_path)
    for labels in (5, [3, 1]):  # [3, 1]: valid classes, blamed for null_class 3 (attack 2026-12-07e row 481)
        with pytest.raises(ValueError, match=r"^null_class 3 is also a class of the data \(0..9\): guidance would "
                                             r"steer from that class, not from no class"):
            sample(model, scheduler, sample_shape=(1, 8, 8), steps=2, num_images=2, class_labels=labels,
                   guidance_scale=2.0, null_class=3, num_classes=10, progress=False)


def test_a_model_on_the_meta_device_is_refused_before_sampling(tmp_path, scheduler):
    from tdcdiff.pipeline import sample

    with pytest.raises(ValueError, match=r"the model is on the meta device, which holds no weights: load them first"):
        sample(_conditional(tmp_path).to("meta"), scheduler, sample_shape=(1, 8, 8), steps=2, num_images=2,
               class_labels=3, progress=False)
    result = sample(_conditional(tmp_path), scheduler, sample_shape=(1, 8, 8), steps=2, num_images=2, class_labels=3,
                    progress=False, device="cpu:0")  # the same device, written with an index
    assert result.images.shape == (2, 1, 8, 8)


def test_sampling_more_images_than_memory_holds(tiny_unet, scheduler):
    from tdcdiff.pipeline import sample

    with pytest.raises(ValueError, match=r"sampling 1000000000000 images of 1x8x8 \(their initial noise and the "
                                         r"images, kept as float32\) needs about [\d.]+ GiB, more than the [\d.]+ GiB "
                                         r"of memory this machine has available now; sample fewer images"):
        sample(tiny_unet, scheduler, sample_shape=(1, 8, 8), steps=2, num_images=10**12, progress=False)


# -- tune: repeated values, variants, refusals before writes -------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    ({"widths": (0.5, 0.5)}, "--width 0.5 is given twice: each value is one candidate; give each once"),
    ({"widths": (0.5, 0.50000001)}, r"--width 0.50000001 and 0.5 are one candidate \(0.5\)"),
    ({"ks": (0.3, 0.3)}, "--k 0.3 is given twice"),
    ({"groups": (2, 4, 2)}, "--groups 2 is given twice"),
    ({"groupings": ("snr", "snr")}, "--grouping snr is given twice"),
    ({"time_budgets": (0.5, 0.5)}, "--time-budget 0.5 is given twice"),
    ({"uniform_time_budgets": (0.6, 0.6)}, "--uniform-time-budget 0.6 is given twice"),
    ({"curve_sizes": (0.5, 0.5, 1.0), "curves": True}, "curve_sizes 0.5 is given twice"),
    ({"tdc_variants": ({}, {"finetune.mix_fraction": 0.2}, {"finetune.mix_fraction": 0.2})},
     "--variant finetune.mix_fraction=0.2 is given twice"),
    ({"tdc_variants": ({}, {"k": 0.2})},
     r"--variant k=0.2 sets what each TDC candidate takes from the grid \(--k, --groups, --grouping, --depth\)"),
    ({"depth": True, "tdc_variants": ({}, {"search.depth": True})}, "--variant search.depth=True sets what each TDC"),
    ({"tdc_variants": ({}, {"base.steps": 5})},
     "--variant base.steps=5 changes stage 1, which every candidate shares with the base trained once"),
    ({"fid_samples": 10**8}, r"--fid-samples must be at most 50000, got 100000000 \(a stated maximum"),
    ({"fid_seeds": 10**9}, r"--fid-seeds must be at most 100, got 1000000000 \(a stated maximum"),
])
def test_tune_settings_that_would_plan_a_candidate_twice_or_misnamed(changes, message):
    from tdcdiff.tune import TuneConfig

    with pytest.raises(ValueError, match=message):
        TuneConfig(**changes).validate()


@pytest.fixture(scope="module")
def trained_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    result = CliRunner().invoke(app, ["train-base", "--out", str(out), "--limit", "40", "--base-steps", "1",
                                      "--batch-size", "4", "-q"])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("args, message", [
    (["--finetune-lr", "5"], r"--finetune-lr \(the peak learning rate\) must be in \(0, 1\)"),
    (["--groups", "5000"], "number of groups N=5000 exceeds T=1000"),
    (["--variant", "finetune.steps=0"], "finetune.steps must be >= 1, got 0"),
    (["--width", "0.5", "--width", "0.5"], "--width 0.5 is given twice"),
])
def test_tune_from_a_base_refuses_before_copying_it(tmp_path, trained_base, args, message):
    """--base-from's stage 1 was copied into the tune directory before these refusals."""
    out = tmp_path / "tune"
    result = CliRunner().invoke(app, ["tune", "--base-from", str(trained_base), "--out", str(out), "-q", *args])
    assert result.exit_code == 2 and __import__("re").search(message, result.output), result.output
    assert not out.exists()


def test_tune_refuses_data_before_writing_its_candidate_list(tmp_path):
    """Stage 1's refusals (data, preset) came after tune.json and candidates.json were written."""
    out = tmp_path / "tune"
    result = CliRunner().invoke(app, ["tune", "--out", str(out), "-q", "--image-size", "7"])
    assert result.exit_code == 2 and "images of size 7 do not fit the UNet preset" in result.output, result.output
    assert not (out / "tune.json").exists() and not (out / "candidates.json").exists()
    assert not out.exists() or not any(out.iterdir())


def test_unconditional_given_model_with_label_dropout(tmp_path):
    """Refused on the meta-built model before any write (it failed in train(), after config.json was written)."""
    from conftest import tiny_config
    from tdcdiff.run import Run

    given = model_dir(tmp_path / "plain", [32, 64])
    config = tiny_config()
    config.finetune = replace(config.finetune, label_dropout=0.1)
    with pytest.raises(ValueError, match=r"label dropout \(base.label_dropout 0.0, finetune.label_dropout 0.1\) needs "
                                         r"a class-conditional model, but --base .*plain is unconditional"):
        Run(tmp_path / "run", config, progress=False, base=given).train_base()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("changes, message", [
    ({"steps": 2.5}, r"steps must be an integer, got 2.5"),
    ({"steps": True}, r"steps must be an integer, got True"),  # was one step
    ({"num_images": 2.0}, r"num_images must be an integer, got 2.0"),
    ({"seed": -1}, r"seed must be between 0 and 4294967295"),  # was taken as 2**64 - 1
    ({"class_labels": 10**20}, r"class labels must be integer class ids in 0..10, got 100000000000000000000"),
    ({"class_labels": "3"}, r"class labels must be integer class ids in 0..10, got '3'"),
    ({"guidance_scale": float("nan"), "null_class": 10}, r"guidance_scale must be a finite number \(1: no guidance\), "
                                                         "got nan"),
    ({"guidance_scale": 2.0, "null_class": True}, "null_class must be an integer class id, got True"),
    ({"guidance_scale": 1e30, "null_class": 10}, r"sampling produced NaN/inf pixels \(guidance_scale 1e\+30\); lower "
                                                 "the guidance scale"),
    ({"device": "meta"}, r"device 'meta' holds no data: sample on the model's device \(cpu\), or leave device out"),
    # with 2+ GPUs: another device than the model's; else not visible (attack c row 170: never "move the model")
    ({"device": "cuda:1"}, r"device 'cuda:1' is (not the model's device \(cpu\): move the model there first|not "
                           r"visible here: torch sees [01] CUDA device)"),
    ({"device": "gpu0"}, r"device 'gpu0' is not a torch device \(.*\); give e.g. 'cpu' or 'cuda:0'"),
])
def test_sample_arguments_it_cannot_use(tmp_path, scheduler, changes, message):
    from tdcdiff.pipeline import sample

    arguments = {"sample_shape": (1, 8, 8), "steps": 2, "num_images": 2, "class_labels": 3, "progress": False,
                 **changes}
    with pytest.raises(ValueError, match=message):
        sample(_conditional(tmp_path), scheduler, **arguments)
