"""Noise schedules: linear betas scaled to T (and old runs kept unscaled), schedules given by a pipeline checked,
and a zero-terminal-SNR v-prediction pipeline through the whole method."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from typer.testing import CliRunner

from tdcdiff.cli import app
from tdcdiff.run import Run, RunConfig
from tdcdiff.schedule import MAX_TERMINAL_ALPHA_BAR, SCHEDULE_VERSION, check_given_schedule, make_scheduler


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize("T", [21, 50, 100, 250, 1000, 4000])
def test_linear_betas_are_scaled_by_1000_over_T_as_improved_diffusion_does(schedule, T):
    # improved_diffusion/gaussian_diffusion.py, get_named_beta_schedule("linear", T):
    # scale = 1000 / T; betas = np.linspace(scale * 0.0001, scale * 0.02, T)
    scale = 1000 / T
    expected = np.linspace(scale * 1e-4, scale * 0.02, T)
    if schedule == "scaled_linear":
        expected = np.linspace((scale * 1e-4) ** 0.5, (scale * 0.02) ** 0.5, T) ** 2
    betas = make_scheduler(T, schedule).betas.double().numpy()
    np.testing.assert_allclose(betas, expected, rtol=1e-6)
    assert make_scheduler(T, schedule).alphas_cumprod[-1] < MAX_TERMINAL_ALPHA_BAR  # x_{T-1} is noise
    unscaled = make_scheduler(T, schedule, version=1)
    if T == 1000:
        assert torch.equal(unscaled.betas, make_scheduler(T, schedule).betas)
    else:
        np.testing.assert_allclose(unscaled.betas.double().numpy(), expected / scale, rtol=1e-6)


def test_a_short_unscaled_schedule_left_most_of_the_image_in_x_T():
    """The case of the issue: --timesteps 100 with the old unscaled linear betas ended at alpha_bar 0.37."""
    assert make_scheduler(100, version=1).alphas_cumprod[-1] > 0.3
    assert make_scheduler(100).alphas_cumprod[-1] < 1e-4


def test_timesteps_too_few_for_scaled_betas_are_refused():
    with pytest.raises(ValueError, match=r"T=20 is too few for the linear schedule: .* the last, 1, would reach 1 "
                                         r"\(no signal left\); use T >= 21 or the cosine schedule"):
        make_scheduler(20)
    with pytest.raises(ValueError, match="T=12 is too few for the scaled_linear schedule"):
        make_scheduler(12, "scaled_linear")
    make_scheduler(21)
    make_scheduler(20, version=1)  # unscaled, as before
    make_scheduler(2, "squaredcos_cap_v2")  # the cosine schedule is defined for any T
    with pytest.raises(ValueError, match=r"unknown schedule_version 3; choose one of \(1, 2\)"):
        make_scheduler(1000, version=3)
    with pytest.raises(ValueError, match="T=20 is too few for the linear schedule"):
        RunConfig(num_train_timesteps=20).validate()


def test_old_runs_keep_the_unscaled_schedule_and_new_runs_get_the_current_one(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    settings = RunConfig(num_train_timesteps=100).to_dict()
    del settings["schedule_version"]  # a config.json written before the version was recorded
    (old / "config.json").write_text(json.dumps(settings))
    unscaled = make_scheduler(100, version=1)
    for run in (Run(old, progress=False), Run(old, RunConfig(num_train_timesteps=100), progress=False)):
        assert run.config.schedule_version == 1
        assert torch.equal(run.scheduler.betas, unscaled.betas)
    (old / "base").mkdir()  # stage 1 has run: asking for the new schedule is a change of a finished stage
    with pytest.raises(ValueError, match=r"setting 'schedule_version' differs .* \(1 -> 2\) and stage 'base' has "
                                         r"already run"):
        Run(old, RunConfig(num_train_timesteps=100, schedule_version=2), progress=False)
    new = Run(tmp_path / "new", RunConfig(num_train_timesteps=100), progress=False)
    assert new.config.schedule_version == SCHEDULE_VERSION == 2
    assert torch.equal(new.scheduler.betas, make_scheduler(100).betas)
    # attack 2026-12-08 row 851: null was read as the current version, a missing key as 1
    settings["schedule_version"] = None
    (old / "config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=r"config.json is damaged \('schedule_version' is null, which a run never "
                                         r"writes: it would sample with another schedule's betas"):
        Run(old, progress=False)


def test_a_given_schedule_that_leaves_signal_at_T_warns():
    with pytest.warns(UserWarning, match=r"the noise schedule of a pipeline ends at alpha_bar = 0.364 at t=T-1 "
                                         r"\(x_\(T-1\) keeps 60% of the image\)"):
        check_given_schedule(DDPMScheduler(num_train_timesteps=100), "a pipeline")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for scheduler in (make_scheduler(100), make_scheduler(1000, "scaled_linear"),
                          DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2"),
                          DDPMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction")):
            check_given_schedule(scheduler, "a pipeline")
    with pytest.raises(ValueError, match=r"zero terminal SNR .* predicts epsilon, from which no x0 follows at t=T-1; "
                                         r"use a v_prediction \(or sample\) model"):
        check_given_schedule(DDPMScheduler(rescale_betas_zero_snr=True), "a pipeline")


def test_a_schedule_passed_to_the_api_gets_the_same_rule_once_where_it_enters(tmp_path):
    """sample(), TDCPipeline and train() check a schedule the user's code passes as --base does (attack 2026-12-07e
    row 313: alpha_bar(T-1) = 0.99999 sampled with no word); tdcdiff's own inner calls do not warn again."""
    from tdcdiff.models import build_unet
    from tdcdiff.pipeline import TDCPipeline, sample
    from tdcdiff.train import TrainConfig, train

    far = DDPMScheduler(num_train_timesteps=100)  # ends at alpha_bar 0.364
    unet = build_unet("digits-8").eval()
    ends = r"ends at alpha_bar = 0.364 at t=T-1 \(x_\(T-1\) keeps 60% of the image\)"
    with pytest.warns(UserWarning, match=f"the noise schedule of the train_scheduler given to sample\\(\\) {ends}"):
        sample(unet, far, sample_shape=(1, 8, 8), steps=2, num_images=1, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TDCPipeline(unet, far, (1, 8, 8))(1, 2, output_type="pt", progress=False)  # its sample() call: no second
    assert [str(w.message)[:61] for w in caught] == ["the noise schedule of the scheduler given to TDCPipeline ends"]
    assert caught[0].filename == __file__  # the user's line, through sample()'s torch.no_grad wrapper
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    with pytest.warns(UserWarning, match=f"the noise schedule of the scheduler given to train\\(\\) {ends}"):
        train(unet, images, far, TrainConfig(steps=1, batch_size=2, warmup_steps=0), tmp_path / "t", progress=False)
    with pytest.raises(ValueError, match=r"zero terminal SNR .* predicts epsilon"):  # before anything is written
        train(unet, images, DDPMScheduler(rescale_betas_zero_snr=True), TrainConfig(steps=1), tmp_path / "z")
    assert not (tmp_path / "z").exists()


def pipeline(directory, scheduler):
    """A diffusers pipeline directory (save_pretrained) with a tiny UNet2DModel for 1x8x8 images."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, add_attention=False)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(directory)
    return directory


def tiny_config_file(tmp_path):
    from conftest import tiny_config

    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_config().to_dict()))
    return path


def test_an_epsilon_pipeline_with_zero_terminal_snr_is_refused_before_any_write(tmp_path):
    base = pipeline(tmp_path / "pipe", DDPMScheduler(rescale_betas_zero_snr=True, prediction_type="epsilon"))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--base", str(base), "--config", str(tiny_config_file(tmp_path)),
                                      "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "error: the noise schedule has zero terminal SNR" in result.output
    assert not out.exists()


def test_a_pipeline_schedule_that_leaves_signal_warns_before_stage_1(tmp_path):
    base = pipeline(tmp_path / "pipe", DDPMScheduler(num_train_timesteps=100))  # unscaled linear betas at T=100
    run = Run(tmp_path / "run", RunConfig(base_model=str(base), data="digits", image_size=8), progress=False)
    with pytest.warns(UserWarning, match=f"the noise schedule of --base {base} ends at alpha_bar = 0.364"):
        run.train_base()


def strict_json(path):
    """The file's JSON; fails on NaN and +-Infinity, which Python writes but JSON does not have."""
    def refuse(name):
        raise AssertionError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_zero_terminal_snr_v_prediction_pipeline_end_to_end(tmp_path):
    """`tdcdiff run --base DIR` on a pipeline whose scheduler has rescale_betas_zero_snr (alpha_bar = 0 at t=T-1,
    SNR-dB -inf): the SNR groups split by the finite levels, every JSON file written is valid JSON, and the bundle
    samples with every sampler, also through `tdcdiff sample --steps 61`, whose diffusers trailing spacing ends
    at t = -1."""
    from tdcdiff.bundle import load_bundle
    from tdcdiff.grouping import make_groups
    from tdcdiff.pipeline import SAMPLERS

    scheduler = DDPMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    base = pipeline(tmp_path / "pipe", scheduler)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--base", str(base), "--config", str(tiny_config_file(tmp_path)),
                                      "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    written = sorted(out.rglob("*.json"))
    assert out / "plan" / "plan.json" in written and out / "bundle" / "manifest.json" in written
    for path in written:
        strict_json(path)
    plan = strict_json(out / "plan" / "plan.json")
    assert plan["grouping"]["boundaries"] == make_groups("snr", 2, scheduler).boundaries
    assert max(g["size"] for g in plan["grouping"]["groups"]) < 0.8 * 1000
    assert all(math.isfinite(g["snr_db_end"]) for g in plan["grouping"]["groups"])
    bundle = load_bundle(out / "bundle")
    assert bundle.scheduler.config.rescale_betas_zero_snr and bundle.scheduler.alphas_cumprod[-1] == 0
    for sampler in SAMPLERS:
        images = bundle.pipeline()(batch_size=2, num_inference_steps=3, sampler=sampler, output_type="pt",
                                   progress=False).images
        assert torch.isfinite(images).all(), sampler
        grid = tmp_path / f"{sampler}.png"
        result = CliRunner().invoke(app, ["sample", "--bundle", str(out / "bundle"), "--sampler", sampler, "--steps",
                                          "61", "--num", "2", "--output", str(grid), "--quiet"])
        assert result.exit_code == 0 and grid.exists(), result.output
