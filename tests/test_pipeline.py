import pytest
import torch

from tdcdiff.pipeline import SAMPLERS, TDCPipeline, sample, save_grid


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("steps", [3, 8])
def test_each_sampler_runs_at_two_step_counts(sampler, steps, tiny_unet, scheduler):
    result = sample(tiny_unet, scheduler, sample_shape=(1, 8, 8), sampler=sampler, steps=steps, num_images=5, batch_size=2, progress=False)
    assert result.images.shape == (5, 1, 8, 8)
    assert result.images.min() >= -1 and result.images.max() <= 1
    assert len(result.timesteps) == steps and result.timesteps == sorted(result.timesteps, reverse=True)


def test_same_seed_same_images(tiny_unet, scheduler):
    a = sample(tiny_unet, scheduler, sample_shape=(1, 8, 8), steps=4, num_images=3, seed=7, progress=False)
    b = sample(tiny_unet, scheduler, sample_shape=(1, 8, 8), steps=4, num_images=3, seed=7, progress=False)
    c = sample(tiny_unet, scheduler, sample_shape=(1, 8, 8), steps=4, num_images=3, seed=8, progress=False)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)


def test_bad_sampling_settings(tiny_unet, scheduler):
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        sample(tiny_unet, scheduler, sample_shape=(1, 8, 8), sampler="heun", progress=False)
    with pytest.raises(ValueError, match="steps must be between 1 and"):
        sample(tiny_unet, scheduler, sample_shape=(1, 8, 8), steps=0, progress=False)


def test_grid_and_pipeline(tmp_path, tiny_unet, scheduler):
    from PIL import Image

    images = torch.rand(10, 1, 8, 8) * 2 - 1
    path = save_grid(images, tmp_path / "grid.png", nrow=5)
    with Image.open(path) as grid:
        assert grid.size[0] > grid.size[1] > 0
    out = TDCPipeline(tiny_unet, scheduler, (1, 8, 8))(batch_size=2, num_inference_steps=3, progress=False)
    assert len(out.images) == 2 and out.images[0].size == (8, 8)
