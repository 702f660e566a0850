"""Bring your own model: denoiser checks, learned variance, class conditioning and guidance, `run --base`."""

import math

import pytest
import torch
from torch import nn

from tdcdiff.models import NonFiniteDenoiser, build_unet, check_finite
from tdcdiff.pipeline import SAMPLERS, sample
from tdcdiff.train import TrainConfig, TrainingDiverged, train

FAST = dict(batch_size=16, warmup_steps=1, checkpoint_every=100, log_every=1)


class LogTimeNet(nn.Module):
    """A tiny denoiser whose time embedding is log(t): -inf at t=0, as Fourier embeddings fed integer t can be."""

    def __init__(self, channels: int = 1, out_channels: int | None = None, nan_when_training: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)
        self.embed = nn.Linear(1, out_channels or channels)
        self.nan_when_training = nan_when_training

    def forward(self, x, t):
        emb = self.embed(torch.log(t.float()).view(-1, 1) if not self.nan_when_training else (t.float() / 1000).view(-1,
                                                                                                                     1))
        out = self.conv(x) + emb[:, :, None, None]
        return out * float("nan") if self.nan_when_training and self.training else out


def test_log_time_embedding_is_named_before_training(tmp_path, digits, scheduler):
    torch.manual_seed(0)
    with pytest.raises(NonFiniteDenoiser, match=r"not finite at t=0: a time embedding such as log\(t\) fails at t=0"):
        train(LogTimeNet(), digits.images, scheduler, TrainConfig(steps=2, **FAST), tmp_path, progress=False)
    assert not (tmp_path / "checkpoint").exists()


def test_non_finite_from_the_start_does_not_blame_the_learning_rate(tmp_path, digits, scheduler):
    torch.manual_seed(0)
    model = LogTimeNet(nan_when_training=True)
    check_finite(model, digits.images, scheduler.alphas_cumprod)  # finite in eval mode: the check passes
    with pytest.raises(TrainingDiverged, match="before any update of this run.*not a learning-rate problem") as err:
        train(model, digits.images, scheduler, TrainConfig(steps=2, **FAST), tmp_path, progress=False)
    assert "learning rate or" not in str(err.value)


def _tiny_unet(**changes):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    settings = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                    norm_num_groups=8, add_attention=False)
    return UNet2DModel(**(settings | changes))


@pytest.fixture()
def pipeline_dir(tmp_path):
    """A diffusers pipeline directory as a user would have it: save_pretrained of a UNet2DModel with a learned
    variance (2 output channels for 1) + DDPMScheduler."""
    from diffusers import DDPMPipeline, DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2",
                              prediction_type="v_prediction",
                              variance_type="learned_range")
    DDPMPipeline(unet=_tiny_unet(out_channels=2), scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


def test_learned_variance_model_samples_with_every_sampler(scheduler):
    model = _tiny_unet(out_channels=2)  # 2C outputs: prediction + variance (IDDPM-style)
    for sampler in SAMPLERS:
        images = sample(model, scheduler, sample_shape=(1, 8, 8), sampler=sampler, steps=5, num_images=3,
                        progress=False).images
        assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all(), sampler


def test_ddpm_uses_the_learned_variance_half(scheduler):
    """DDPM with a 2C model uses the variance half: changing only that half changes the DDPM samples, not DDIM's."""
    model = _tiny_unet(out_channels=2)
    other = _tiny_unet(out_channels=2)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.conv_out.bias[1] += 1.0  # channel 1 is the variance half of a 1-channel model
    runs = {}
    for sampler in ("ddpm", "ddim"):
        a, b = (sample(m, scheduler, sample_shape=(1, 8, 8), sampler=sampler, steps=5, num_images=2,
                       progress=False).images
                for m in (model, other))
        runs[sampler] = (a - b).abs().max().item()
    assert runs["ddim"] == 0 and runs["ddpm"] > 1e-4


def test_learned_variance_trains_on_the_prediction_half(tmp_path, digits, scheduler):
    result = train(_tiny_unet(out_channels=2), digits.images, scheduler, TrainConfig(steps=2, **FAST), tmp_path,
                   progress=False)
    assert math.isfinite(result.final_loss)


def _tiny_config_file(tmp_path, **changes):
    import json

    from conftest import tiny_config

    settings = tiny_config(**changes).to_dict()
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(settings))
    return path


@pytest.mark.slow
def test_run_from_a_diffusers_pipeline_directory(tmp_path, pipeline_dir):
    """`tdcdiff run --base DIR`: stage 1 skipped, the pipeline's scheduler (v-prediction, cosine, T=500, learned
    variance) used throughout, the variance half kept by pruning, and the bundle samples identically after
    loading, with every sampler."""
    from typer.testing import CliRunner

    from tdcdiff.bundle import load_bundle
    from tdcdiff.cli import app
    from tdcdiff.serialization import load_model

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--base", str(pipeline_dir), "--config", str(_tiny_config_file(tmp_path)),
                                      "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert not (out / "base" / "train.json").exists()  # no stage-1 training
    given = _tiny_unet(out_channels=2)
    base = load_model(out / "base" / "final")
    for key, value in given.state_dict().items():
        torch.testing.assert_close(base.state_dict()[key], value, rtol=0, atol=0)
    bundle = load_bundle(out / "bundle")
    config = bundle.scheduler.config
    assert (config.prediction_type, config.num_train_timesteps, config.beta_schedule, config.variance_type) == (
        "v_prediction", 500, "squaredcos_cap_v2", "learned_range")
    assert all(expert.model.conv_out.out_channels == 2 for expert in bundle.router.experts)
    for sampler in SAMPLERS:
        first, again = (bundle.pipeline()(batch_size=4, num_inference_steps=5, sampler=sampler, output_type="pt",
                                          progress=False).images for _ in range(2))
        torch.testing.assert_close(first, again, rtol=0, atol=0)
        assert torch.isfinite(first).all(), sampler


@pytest.mark.parametrize("args, message", [
    (["--image-size", "16"], r"takes 8x8 images but the data 'digits' is 16x16; load it with --image-size 8"),
    (["--channels", "3"], r"the model takes 1-channel images but the data has 3 channels"),
])
def test_data_that_does_not_fit_the_given_model_is_named_before_any_work(tmp_path, pipeline_dir, args, message):
    from typer.testing import CliRunner

    from tdcdiff.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--base", str(pipeline_dir), "--config", str(_tiny_config_file(tmp_path)),
                                      "--out", str(out), "--quiet", *args])
    assert result.exit_code == 2 and "error:" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert __import__("re").search(message, " ".join(result.output.split())), result.output
    assert not (out / "base").exists()  # so another --base may be given on the next try


def _conditional_unet(num_class_embeds: int = 11):
    """A class-conditional UNet2DModel with attention: 10 digit classes + the null class (id 10)."""
    return _tiny_unet(num_class_embeds=num_class_embeds, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)


@pytest.mark.slow
def test_class_conditional_model_with_label_dropout_through_every_stage(tmp_path):
    from dataclasses import replace

    from conftest import tiny_config
    from tdcdiff.bundle import load_bundle
    from tdcdiff.run import Run

    _conditional_unet().save_pretrained(tmp_path / "model")
    config = tiny_config(base_model_steps=20)
    config.base = replace(config.base, label_dropout=0.2)
    run = Run(tmp_path / "run", config, progress=False, base=tmp_path / "model")
    run.train_base()
    run.prune()
    run.finetune()
    bundle = load_bundle(run.export_bundle())
    assert bundle.manifest["conditioning"] == {"num_class_embeds": 11, "num_classes": 10, "null_class": 10}
    assert json_of(run.dir / "finetune" / "group_0" / "train.json")["null_class"] == 10
    pipe = bundle.pipeline()
    guided = pipe(batch_size=4, num_inference_steps=5, output_type="pt", progress=False, class_labels=[0, 1, 2, 3],
                  guidance_scale=3.0).images
    again = pipe(batch_size=4, num_inference_steps=5, output_type="pt", progress=False, class_labels=[0, 1, 2, 3],
                 guidance_scale=3.0).images
    plain = pipe(batch_size=4, num_inference_steps=5, output_type="pt", progress=False,
                 class_labels=[0, 1, 2, 3]).images
    assert torch.isfinite(guided).all()
    torch.testing.assert_close(guided, again, rtol=0, atol=0)
    assert (guided - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="the model is class-conditional .* pass class_labels"):
        pipe(batch_size=2, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"class labels must be in 0..10"):
        pipe(batch_size=2, num_inference_steps=2, progress=False, class_labels=11)

    from typer.testing import CliRunner

    from tdcdiff.cli import app

    grid = tmp_path / "threes.png"
    result = CliRunner().invoke(app, ["sample", "--bundle", str(run.dir / "bundle"), "--class", "3", "--guidance", "2",
                                      "--num", "4", "--steps", "3", "--output", str(grid), "--quiet"])
    assert result.exit_code == 0 and grid.exists(), result.output


def json_of(path):
    import json

    return json.loads(path.read_text())


def test_class_count_that_does_not_fit_the_model_is_named(tmp_path, digits, scheduler):
    from dataclasses import replace

    from conftest import tiny_config
    from tdcdiff.run import Run

    _conditional_unet(num_class_embeds=10).save_pretrained(tmp_path / "model")
    config = tiny_config()
    config.base = replace(config.base, label_dropout=0.1)  # id 9 becomes the null class: 9 ids left for 10 digits
    with pytest.raises(ValueError, match=r"the data 'digits' has 10 classes but --base .* embeds 10 class ids "
                                         r"\(id 9 is the null class\)"):
        Run(tmp_path / "run", config, progress=False, base=tmp_path / "model").train_base()
    with pytest.raises(ValueError, match=r"class-conditional \(10 class ids\) but the data has no labels"):
        train(_conditional_unet(10), digits.images, scheduler, TrainConfig(steps=1, **FAST), tmp_path / "t",
              progress=False)
    with pytest.raises(ValueError, match="guidance_scale != 1 needs null_class"):
        sample(_conditional_unet(10), scheduler, sample_shape=(1, 8, 8), steps=2, num_images=2, class_labels=1,
               guidance_scale=2.0, progress=False)
    with pytest.raises(ValueError, match="this model has no class embedding: drop --guidance"):
        sample(build_unet("digits-8"), scheduler, sample_shape=(1, 8, 8), steps=2, num_images=2, guidance_scale=2.0,
               progress=False)


def log_time_net() -> nn.Module:
    """`--base test_byom:log_time_net`: a user's function returning their own module."""
    torch.manual_seed(0)
    return LogTimeNet()


def test_run_base_function_is_checked_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from tdcdiff.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--base", "test_byom:log_time_net", "--config",
                                      str(_tiny_config_file(tmp_path)), "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "error: the model's output is not finite at t=0: a time embedding such as log(t)" in result.output
    assert not (out / "base").exists()  # so another --base may be given on the next try


@pytest.mark.parametrize("make, message", [
    (lambda d: d.mkdir(), r"config.json is missing"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"_class_name": "UNet3DConditionModel"}')),
     r"model class 'UNet3DConditionModel' is not one tdcdiff loads; supported: UNet2DModel, DiTTransformer2DModel, "
     r"UNet2DConditionModel"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"_class_name": "UNet2DModel"}')),
     r"has no .safetensors weights; tdcdiff never unpickles weights"),
    (lambda d: (d.mkdir(), (d / "model_index.json").write_text('{"vae": ["diffusers", "AutoencoderTiny"], '
                                                              '"unet": ["diffusers", "UNet2DModel"]}')),
     r"vae: model class 'AutoencoderTiny' is not one tdcdiff loads; supported: AutoencoderKL$"),
    (lambda d: (d.mkdir(), (d / "model_index.json").write_text('{"vae": ["diffusers", "AutoencoderKL"], '
                                                              '"unet": ["diffusers", "UNet2DModel"]}')),
     r"vae has no .safetensors weights; tdcdiff never unpickles weights"),
    (lambda d: None, r"is neither a diffusers model or pipeline directory, a module:function, nor a Hub name"),
])
def test_base_that_cannot_be_loaded_is_named(tmp_path, make, message):
    from tdcdiff.base_model import BaseModelError, load_base_model

    target = tmp_path / "given"
    make(target)
    with pytest.raises(BaseModelError, match=message):
        load_base_model(str(target) if target.exists() else "./no/such/model")


def test_dit_with_learned_sigma_samples_guided_with_every_sampler(scheduler):
    """A tiny DiTTransformer2DModel (adaLN-Zero, learned sigma): its null class is id num_embeds_ada_norm."""
    from diffusers import DiTTransformer2DModel

    from tdcdiff.models import num_class_embeds

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2,
                                  num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                  norm_type="ada_norm_zero")
    assert num_class_embeds(model) == 11
    for sampler in SAMPLERS:
        images = sample(model, scheduler, sample_shape=(1, 8, 8), sampler=sampler, steps=4, num_images=3,
                        class_labels=[1, 2, 3], guidance_scale=2.0, null_class=10, progress=False).images
        assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all(), sampler


def test_router_passes_class_labels_to_each_expert(scheduler):
    from tdcdiff.grouping import make_groups
    from tdcdiff.models import as_denoiser
    from tdcdiff.router import Router

    experts = [_conditional_unet(), _conditional_unet()]
    with torch.no_grad():
        experts[1].class_embedding.weight.mul_(2)  # experts that answer differently per class
    router = Router(experts, make_groups("uniform", 2, scheduler)).eval()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 900, 20, 950])
    y = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        routed = router(x, t, y)
        by_hand = torch.cat([as_denoiser(experts[g])(x[i:i + 1], t[i:i + 1], y[i:i + 1])
                             for i, g in enumerate([0, 1, 0, 1])])
        other_labels = router(x, t, y + 1)
    torch.testing.assert_close(routed, by_hand)
    assert (routed - other_labels).abs().max() > 1e-4
