"""A diffusers pipeline saved with the scheduler it samples with (DDPM, DDIM, PNDM, DPM-Solver, UniPC, DEIS, Euler):
its training schedule is checked before any work, and the bundle keeps the scheduler and samples with it."""

import json
import re

import pytest
import torch

from tdcdiff.bundle import check_bundle_scheduler
from tdcdiff.pipeline_schedule import scheduler_from_config
from tdcdiff.samplers import PIPELINE_SAMPLERS, SAMPLERS, make_sampler, sampler_for_scheduler, visited_timesteps


def _tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, add_attention=False)


def _save_pipeline(path, scheduler):
    """save_pretrained of a tiny unconditional pipeline (DDIMPipeline or PNDMPipeline for those schedulers, as
    diffusers pairs them; DDPMPipeline, which takes any scheduler, for the others)."""
    import diffusers

    name = type(scheduler).__name__.removesuffix("Scheduler")
    pipeline = getattr(diffusers, f"{name}Pipeline", diffusers.DDPMPipeline)
    pipeline(unet=_tiny_unet(), scheduler=scheduler).save_pretrained(path)
    return path


# Settings pipelines are saved with: DDIM v-prediction cosine (as issue 23 tried), Stable Diffusion's PNDM
# (skip_prk_steps, set_alpha_to_one false, steps_offset 1), DPM-Solver with Karras sigmas ending at sigma_min.
PIPELINES = {
    "ddim": ("DDIMScheduler", dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                   prediction_type="v_prediction")),
    "pndm": ("PNDMScheduler", dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", skip_prk_steps=True,
                                   set_alpha_to_one=False, steps_offset=1)),
    "dpm-solver++": ("DPMSolverMultistepScheduler", dict(num_train_timesteps=1000, use_karras_sigmas=True,
                                                         final_sigmas_type="sigma_min", solver_order=3)),
}


@pytest.mark.parametrize("class_name", list(PIPELINE_SAMPLERS))
def test_every_pipeline_scheduler_class_gives_a_bundle_schedule_and_a_sampler(class_name):
    """Each class's own settings stay out of the training DDPMScheduler (a bundle holds it), its betas and
    prediction type go in, and its sampler visits the timesteps and its last step returns the model's x0."""
    import diffusers

    given = getattr(diffusers, class_name)(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                           prediction_type="sample")
    config = {k: v for k, v in given.config.items() if not k.startswith("_")}
    train = scheduler_from_config(config)
    check_bundle_scheduler(train, class_name)
    assert (train.config.beta_schedule, train.config.prediction_type) == ("squaredcos_cap_v2", "sample")
    torch.testing.assert_close(train.alphas_cumprod, given.alphas_cumprod, rtol=0, atol=0)
    name, note = sampler_for_scheduler(class_name, "the pipeline")
    assert name in SAMPLERS and note.startswith(f"{class_name} of the pipeline -> ")
    visited = visited_timesteps(7, 1000)
    sampler = make_sampler(name, train, visited)
    assert [int(t) for t in sampler.timesteps] == visited
    if name != "ddpm":  # the ancestral step adds noise at t > 0
        x0 = torch.full((2, 1, 4, 4), 0.5)
        last = make_sampler(name, train, visited[-1:])
        noisy = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)) * last.init_noise_sigma
        torch.testing.assert_close(last.step(x0, visited[-1], noisy).prev_sample, x0, rtol=0, atol=1e-5)


def test_a_scheduler_class_no_sampler_follows_is_one_error_before_any_work(tmp_path):
    from diffusers import EulerAncestralDiscreteScheduler
    from typer.testing import CliRunner

    from tdcdiff.cli import app
    from tdcdiff.run import Run

    pipe = _save_pipeline(tmp_path / "pipe", EulerAncestralDiscreteScheduler(num_train_timesteps=100,
                                                                            beta_schedule="squaredcos_cap_v2"))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--base", str(pipe), "--out", str(out), "--quiet"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "samples with EulerAncestralDiscreteScheduler, which no sampler of tdcdiff follows; supported: " \
           "DDPMScheduler, DDIMScheduler" in " ".join(result.output.split())
    assert "pass --sampler" in result.output and not out.exists()
    # With a sampler given, its training schedule is all the run needs
    assert Run(out, overrides={"sampler": "unipc"}, base=str(pipe), progress=False).config.sampler == "unipc"


def test_a_schedule_a_bundle_cannot_hold_is_refused_before_any_work(tmp_path):
    from diffusers import DDIMScheduler

    from conftest import tiny_config
    from tdcdiff.base_model import BaseModelError
    from tdcdiff.run import Run

    pipe = _save_pipeline(tmp_path / "pipe", DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                                           steps_offset=100))
    run = Run(tmp_path / "run", tiny_config(), base=str(pipe), progress=False)
    with pytest.raises(BaseModelError, match=r"^the training schedule of --base .*: 'scheduler.steps_offset' must be "
                                             r"an integer from 0 to T-1=99, got 100; fix the pipeline's scheduler "
                                             r"config$"):
        run.train_base()
    assert not (tmp_path / "run" / "base").exists()


def test_an_unset_sampler_is_the_pipelines_and_a_given_one_wins(tmp_path):
    from diffusers import PNDMScheduler

    from tdcdiff.run import Run, RunConfig

    pipe = _save_pipeline(tmp_path / "pipe", PNDMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2"))
    assert RunConfig().sampler is None and Run(tmp_path / "plain", progress=False).config.sampler == "ddim"
    assert Run(tmp_path / "a", base=str(pipe), progress=False).config.sampler == "pndm"
    assert Run(tmp_path / "b", overrides={"sampler": "ddim"}, base=str(pipe), progress=False).config.sampler == "ddim"


@pytest.mark.slow
@pytest.mark.parametrize("sampler", list(PIPELINES))
def test_a_pipeline_goes_from_run_base_to_a_bundle_that_samples_with_its_scheduler(tmp_path, sampler):
    """`tdcdiff run --base DIR` on a DDIM, a PNDM and a DPM-Solver pipeline: the bundle's default sampling is the
    pipeline's scheduler's sampler, its provenance keeps the scheduler's class and settings, and
    `bundle.pipeline()` and `tdcdiff sample --bundle` sample with it, the same images twice."""
    import diffusers
    from typer.testing import CliRunner

    from conftest import tiny_config
    from tdcdiff.bundle import load_bundle
    from tdcdiff.cli import app

    class_name, settings = PIPELINES[sampler]
    pipe = _save_pipeline(tmp_path / "pipe", getattr(diffusers, class_name)(**settings))
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config().to_dict()))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--base", str(pipe), "--config", str(config), "--out", str(out),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    bundle = load_bundle(out / "bundle")
    assert bundle.sampling.sampler == sampler and bundle.manifest["sampling"]["sampler"] == sampler
    kept = bundle.manifest["provenance"]["pipeline_scheduler"]
    assert kept["_class_name"] == class_name and all(kept[k] == v for k, v in settings.items())
    assert bundle.manifest["provenance"]["sampling_note"].startswith(f"{class_name} of --base {pipe} -> ")
    assert bundle.scheduler.config.num_train_timesteps == settings["num_train_timesteps"]
    first, again = (bundle.pipeline()(batch_size=3, num_inference_steps=4, output_type="pt", progress=False).images
                    for _ in range(2))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert torch.isfinite(first).all()
    grid = tmp_path / "grid.png"
    shown = CliRunner().invoke(app, ["sample", "--bundle", str(out / "bundle"), "--num", "2", "--output", str(grid),
                                     "--quiet"])
    assert shown.exit_code == 0 and grid.exists() and f"{sampler} 4 steps" in shown.output, shown.output


def test_a_bundle_of_sigmoid_betas_samples_with_every_sampler_from_the_cli(tmp_path, tiny_unet):
    """Attack 2026-12-07g row 724: save_bundle took DDPMScheduler(beta_schedule="sigmoid") and `tdcdiff sample
    --bundle` ended in diffusers' NotImplementedError for ddim and dpm-solver++, whose classes lack the schedule;
    every sampler is now given its betas."""
    from diffusers import DDPMScheduler
    from typer.testing import CliRunner

    from tdcdiff.bundle import load_bundle, save_bundle
    from tdcdiff.cli import app
    from tdcdiff.flops import count_flops
    from tdcdiff.grouping import make_groups

    scheduler = DDPMScheduler(beta_schedule="sigmoid")
    flops = count_flops(tiny_unet, (1, 8, 8))
    path = save_bundle(tmp_path / "b", [tiny_unet, tiny_unet], make_groups("uniform", 2, scheduler), scheduler,
                       sample_shape=(1, 8, 8), expert_flops=[flops, flops], base_flops=flops)
    assert load_bundle(path).scheduler.config.beta_schedule == "sigmoid"
    for sampler in SAMPLERS:
        grid = tmp_path / f"{sampler}.png"
        result = CliRunner().invoke(app, ["sample", "--bundle", str(path), "--sampler", sampler, "--steps", "3",
                                          "--num", "2", "--output", str(grid), "--quiet"])
        assert result.exit_code == 0 and grid.exists(), (sampler, result.output)


def test_a_pipeline_of_sigmoid_betas_is_trained_and_sampled_with_any_sampler(tmp_path):
    """Attack 2026-12-07g row 775: `tdcdiff run --base P --sampler ddim`, P's DDPMScheduler of sigmoid betas, trained
    every stage, then failed at the samples stage: the run's schedule is the pipeline's betas, and each sampler
    follows them."""
    from diffusers import DDPMScheduler

    from tdcdiff.run import Run

    given = DDPMScheduler(num_train_timesteps=100, beta_schedule="sigmoid", beta_start=1e-3, beta_end=0.2)
    pipe = _save_pipeline(tmp_path / "pipe", given)
    for sampler in SAMPLERS:
        run = Run(tmp_path / sampler, overrides={"sampler": sampler}, base=str(pipe), progress=False)
        assert run.config.sampler == sampler
    train = scheduler_from_config(json.loads((pipe / "scheduler" / "scheduler_config.json").read_text()))
    check_bundle_scheduler(train, "the pipeline")
    visited = visited_timesteps(7, 100)
    for sampler in SAMPLERS:
        torch.testing.assert_close(make_sampler(sampler, train, visited).alphas_cumprod, given.alphas_cumprod,
                                   rtol=0, atol=0, msg=sampler)


@pytest.mark.slow
def test_run_base_with_sigmoid_betas_and_sampler_ddim_ends_with_samples(tmp_path):
    """Row 775 end to end: the dry run, then the whole run with --sampler ddim, then the bundle sampled with
    dpm-solver++ (the other sampler whose class lacks sigmoid betas)."""
    from diffusers import DDPMScheduler
    from typer.testing import CliRunner

    from conftest import tiny_config
    from tdcdiff.cli import app

    pipe = _save_pipeline(tmp_path / "pipe", DDPMScheduler(num_train_timesteps=100, beta_schedule="sigmoid",
                                                           beta_start=1e-3, beta_end=0.2))
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config().to_dict()))
    out = tmp_path / "run"
    command = ["run", "--base", str(pipe), "--config", str(config), "--out", str(out), "--sampler", "ddim", "--quiet"]
    dry = CliRunner().invoke(app, [*command, "--dry-run"])
    assert dry.exit_code == 0 and not out.exists(), dry.output
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0 and (out / "bundle").is_dir(), result.output
    grid = tmp_path / "grid.png"
    shown = CliRunner().invoke(app, ["sample", "--bundle", str(out / "bundle"), "--sampler", "dpm-solver++",
                                     "--num", "2", "--output", str(grid), "--quiet"])
    assert shown.exit_code == 0 and grid.exists(), shown.output


@pytest.mark.parametrize("class_name", ["FlowMatchEulerDiscreteScheduler", "EDMEulerScheduler", "ScoreSdeVeScheduler"])
def test_a_pipeline_scheduler_without_betas_is_refused_whatever_the_sampler(tmp_path, class_name):
    """Attack 2026-12-07g row 774: a flow-matching --base was refused with "pass --sampler", and with --sampler ddim
    its model was trained as an epsilon DDPM of default linear betas without a word. A scheduler without betas is
    refused before any work, sampler or not, in the dry run too, and by load_base_model, naming the class and why."""
    import diffusers
    from typer.testing import CliRunner

    from tdcdiff.base_model import BaseModelError, load_base_model
    from tdcdiff.cli import app
    from tdcdiff.run import Run

    pipe = _save_pipeline(tmp_path / "pipe", getattr(diffusers, class_name)())
    out = tmp_path / "run"
    message = (rf"samples with {class_name}, which takes no betas \(a flow-matching or sigma-only schedule\): its "
               r"model was trained for another objective than tdcdiff's DDPM losses \(epsilon, v or x0 targets over a "
               r"schedule of betas\), and no --sampler changes that; start from a diffusers pipeline whose scheduler "
               r"has betas \(e.g. DDPMScheduler, DDIMScheduler, .*\)$")
    for extra in ([], ["--sampler", "ddim"], ["--sampler", "unipc", "--dry-run"], ["--dry-run"]):
        result = CliRunner().invoke(app, ["run", "--base", str(pipe), "--out", str(out), "--quiet", *extra])
        shown = " ".join(result.output.split())
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, (extra, result.output)
        assert shown.startswith(f"error: --base {pipe} samples with {class_name}, which takes no betas"), shown
        assert "pass --sampler" not in shown and not out.exists(), extra
    with pytest.raises(ValueError, match=rf"^--base {pipe} {message}"):
        Run(out, overrides={"sampler": "ddim"}, base=str(pipe), progress=False)
    with pytest.raises(BaseModelError, match=rf"^{pipe} {message}"):
        load_base_model(str(pipe))
    assert not out.exists()


def test_a_scheduler_class_diffusers_lacks_is_read_by_its_config(tmp_path):
    """A scheduler class diffusers does not have (another library's, or renamed): with betas in its config a sampler
    can be named for it (the run trains on those betas); without any it is refused, as a schedule without betas."""
    from diffusers import DDPMScheduler

    from tdcdiff.run import Run

    pipe = _save_pipeline(tmp_path / "pipe", DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2"))
    index = pipe / "model_index.json"
    index.write_text(index.read_text().replace('"DDPMScheduler"', '"MyScheduler"'))
    config = pipe / "scheduler" / "scheduler_config.json"
    run = Run(tmp_path / "a", overrides={"sampler": "ddim"}, base=str(pipe), progress=False)
    assert (run.config.sampler, run.config.beta_schedule) == ("ddim", "squaredcos_cap_v2")
    config.write_text(json.dumps({"_class_name": "MyScheduler", "num_train_timesteps": 100}))
    with pytest.raises(ValueError, match=r"samples with MyScheduler, which is not a diffusers scheduler class, and "
                                             r"its config names no betas \(none of trained_betas, beta_schedule, "
                                             r"beta_start, beta_end\): its model was trained for another objective"):
        Run(tmp_path / "b", overrides={"sampler": "ddim"}, base=str(pipe), progress=False)


@pytest.mark.parametrize("change, message", [
    ({"trained_betas": [0.01] * 50 + [1.5] + [0.01] * 49},
     r"^error: the noise schedule's betas give noise levels alpha_bar that are not finite and falling from below 1 "
     r"to above 0: alpha_bar at t=50 is -0.303 \(beta 1.5\); .* \(the schedule of --base \S+: fix its scheduler "
     r"config\)$"),
    ({"beta_schedule": "cosine"},
     r"^error: --base \S+: its scheduler config gives no DDPMScheduler \(NotImplementedError: cosine is not "
     r"implemented for .*\); fix the pipeline's scheduler config$"),
])
def test_a_pipeline_schedule_no_sampler_follows_is_refused_in_the_dry_run(tmp_path, change, message):
    """Betas that give no falling noise levels, or a beta_schedule diffusers does not build: the dry run and the run
    say so in one line before any work (the run refused the first at stage 1 only; the second was diffusers'
    NotImplementedError traceback)."""
    from diffusers import DDPMScheduler
    from typer.testing import CliRunner

    from tdcdiff.cli import app

    pipe = _save_pipeline(tmp_path / "pipe", DDPMScheduler(num_train_timesteps=100))
    config = pipe / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    out = tmp_path / "run"
    for extra in (["--dry-run"], []):
        result = CliRunner().invoke(app, ["run", "--base", str(pipe), "--out", str(out), "--quiet", *extra])
        shown = " ".join(result.output.split())
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, (extra, result.output)
        assert re.match(message, shown), shown
        assert not out.exists()
