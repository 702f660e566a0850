import pytest
import torch

from tdcdiff.pipeline import SAMPLERS, TDCPipeline, sample, save_grid


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("steps", [3, 8])
def test_each_sampler_runs_at_two_step_counts(sampler, steps, tiny_unet, scheduler):
    result = sample(tiny_unet, scheduler, sample_shape=(1, 8, 8), sampler=sampler, steps=steps, num_images=5,
                    batch_size=2, progress=False)
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


def test_pipeline_arguments_given_as_zero_or_empty_are_checked_not_replaced_by_defaults(tiny_unet, scheduler):
    # num_inference_steps=0 sampled at the default steps, sampler="" with the default sampler, cache_interval=0
    # without caching: each `x or default` took a given falsy value for "not given".
    pipe = TDCPipeline(tiny_unet, scheduler, (1, 8, 8))
    with pytest.raises(ValueError, match="steps must be between 1 and"):
        pipe(batch_size=1, num_inference_steps=0, progress=False)
    with pytest.raises(ValueError, match="unknown sampler ''"):
        pipe(batch_size=1, num_inference_steps=2, sampler="", progress=False)
    with pytest.raises(ValueError, match="cache_interval .* must be an integer >= 1, got 0"):
        pipe(batch_size=1, num_inference_steps=2, cache_interval=0, progress=False)


def test_sample_takes_numpy_integers_and_refuses_a_malformed_shape_or_sampling_path(tiny_unet, scheduler):
    import numpy as np

    a = sample(tiny_unet, scheduler, sample_shape=(1, 8, 8), steps=2, num_images=2, seed=np.int64(5), progress=False)
    b = sample(tiny_unet, scheduler, sample_shape=(1, 8, 8), steps=2, num_images=2, seed=5, progress=False)
    assert torch.equal(a.images, b.images)  # a numpy seed was "must be between 0 and 4294967295, got 5"
    with pytest.raises(ValueError, match="seed must be an integer, got 5.0"):
        sample(tiny_unet, scheduler, sample_shape=(1, 8, 8), steps=2, seed=5.0, progress=False)
    with pytest.raises(ValueError, match=r"sample_shape must be \(channels, height, width\), .* got \(8, 8\)"):
        sample(tiny_unet, scheduler, sample_shape=(8, 8), steps=2, progress=False)  # was "the data has 8 channels"
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):  # ignored (fp32) by a built SamplingModel
        sample(TDCPipeline(tiny_unet, scheduler, (1, 8, 8)).runner, scheduler, sample_shape=(1, 8, 8), steps=2,
               precision="fp16", progress=False)


def test_class_labels_on_the_meta_device_are_one_error(scheduler):
    # attack 2026-12-07f row 573: torch's "Tensor.item() cannot be called on meta tensors" (RuntimeError)
    from diffusers import UNet2DModel

    from tdcdiff.models import build_unet

    config = {k: v for k, v in build_unet("digits-8").config.items() if not k.startswith("_")}
    model = UNet2DModel.from_config({**config, "num_class_embeds": 11})
    with pytest.raises(ValueError, match=r"^class_labels are on device 'meta', which holds no data: give them on the "
                                         r"CPU or the model's device \(they are moved to the model's\)$"):
        sample(model, scheduler, sample_shape=(1, 8, 8), steps=2, num_images=2, progress=False,
               class_labels=torch.tensor([3, 1], device="meta"))


def test_the_pipeline_takes_diffusers_generator_and_return_dict_and_names_what_it_does_not_take(tiny_unet, scheduler):
    # attack 2026-12-07f rows 580/581: generator= and return_dict=False were Python's TypeError, pipe("a cat") and
    # pipe(batch_size=2.0) said "num_images must be an integer"
    pipe = TDCPipeline(tiny_unet, scheduler, (1, 8, 8))
    call = dict(num_inference_steps=2, output_type="pt", progress=False)
    a = pipe(2, generator=torch.Generator().manual_seed(0), **call).images
    b = pipe(2, generator=torch.Generator().manual_seed(0), **call).images
    c = pipe(2, generator=torch.Generator().manual_seed(1), **call).images
    assert torch.equal(a, b) and not torch.equal(a, c)
    (images,) = pipe(2, return_dict=False, **call)  # a tuple, as diffusers' pipelines return
    assert torch.equal(images, pipe(2, seed=0, **call).images) and torch.equal(images, pipe(2, **call).images)
    takes = ("it takes: batch_size, num_inference_steps, generator, sampler, seed, output_type, return_dict, progress, "
             "class_labels, guidance_scale, cache_interval, cache_depth, prompt, negative_prompt$")
    for given, message in [
        ({"generator": [torch.Generator()] * 2}, r"^generator must be one torch.Generator \(a list of one per image, "
                                                 r"as diffusers takes, is not: the batch is drawn from one seed\), got "
                                                 r"list; or give seed=$"),
        ({"generator": torch.Generator(), "seed": 3}, "^give seed or generator, not both$"),
        ({"eta": 0.0}, r"^TDCPipeline takes no 'eta' argument \(tdcdiff's DDIM is deterministic, eta 0; "
                       r"sampler='ddpm' samples stochastically\); " + takes),
        ({"num_images_per_prompt": 2}, r"^TDCPipeline takes no 'num_images_per_prompt' argument \(batch_size is the "
                                       r"number of images; one prompt serves all of them\); " + takes),
        ({"guidance": 2}, "^TDCPipeline takes no 'guidance' argument; " + takes),
        ({"batch_size": "a cat"}, r"^TDCPipeline's first argument is batch_size \(the number of images\), got the text "
                                  r"'a cat'; this pipeline's model is not text-conditional, so it takes no prompt$"),
        ({"batch_size": 2.0}, "^batch_size must be an integer, got 2.0$"),
        ({"num_inference_steps": 2.5}, "^num_inference_steps must be an integer, got 2.5$"),
        ({"output_type": "latent", "sampler": "nope"}, r"^unknown output_type 'latent'; choose 'pil', 'np' or 'pt'$"),
    ]:
        with pytest.raises(ValueError, match=message):
            pipe(**{**call, **given})


def test_a_sample_shape_of_other_channels_names_sample_shape_not_the_clis_flag(tiny_unet, scheduler):
    # attack 2026-12-07f row 559: "load the data with channels=1 (--channels)" to an API caller, who has no data
    from tdcdiff.flops import count_flops

    message = r"^the model takes 1-channel images but sample_shape \(3, 8, 8\) has 3 channels; give sample_shape " \
              r"\(1, 8, 8\)$"
    with pytest.raises(ValueError, match=message):
        sample(tiny_unet, scheduler, sample_shape=(3, 8, 8), steps=2, progress=False)
    with pytest.raises(ValueError, match=message):
        count_flops(tiny_unet, (3, 8, 8))


def test_a_positional_holding_another_arguments_value_is_named_by_that_argument(tiny_unet, scheduler):
    # attack 2026-12-07g row 717: pipe(2, g) (diffusers' DDPMPipeline takes the generator second) said
    # "num_inference_steps must be an integer, got <torch._C.Generator ...>"; sample()'s two positionals likewise
    pipe = TDCPipeline(tiny_unet, scheduler, (1, 8, 8))
    by_name = r" \(only batch_size and num_inference_steps are taken by position\)$"
    second = r"^TDCPipeline's second argument is num_inference_steps \(the number of sampling steps\), got "
    for args, message in [
        ((2, torch.Generator()), second + "a torch.Generator; pass it by name: generator=..." + by_name),
        ((2, [torch.Generator()] * 2), second + "a list of torch.Generator; pass it by name: generator=..." + by_name),
        ((torch.Generator(),), r"^TDCPipeline's first argument is batch_size \(the number of images\), got a "
                               r"torch.Generator; pass it by name: generator=\.\.\." + by_name),
        ((2, "np"), second + "'np'; pass it by name: output_type='np'" + by_name),
        ((2, "ddpm"), second + "'ddpm'; pass it by name: sampler='ddpm'" + by_name),
        ((2, "a cat"), second + "the text 'a cat'; this pipeline's model is not text-conditional, so it takes no "
                                "prompt$"),
    ]:
        with pytest.raises(ValueError, match=message):
            pipe(*args, progress=False)
    first = r"^sample\(\)'s second argument is train_scheduler \(the training noise schedule, e.g. a bundle's " \
            r"Bundle.scheduler\), got "
    with pytest.raises(ValueError, match=first + r"a model \(UNet2DModel\); sample\(model, train_scheduler, \.\.\.\) "
                                              r"takes the model first$"):
        sample(scheduler, tiny_unet, sample_shape=(1, 8, 8), steps=2, progress=False)
    with pytest.raises(ValueError, match=first + "the sampler name 'ddim'; pass sampler='ddim' by name$"):
        sample(tiny_unet, "ddim", sample_shape=(1, 8, 8), steps=2, progress=False)


def test_pipeline_cache_settings_not_given_are_the_defaults_item_by_item(tiny_unet, scheduler):
    # attack 2026-12-08 row 871: cache_depth alone on defaults that cache every 2 steps was refused as "given
    # without feature caching"; it takes the defaults' interval, as an interval alone takes their depth
    def reference(**cache):
        return sample(tiny_unet, scheduler, sample_shape=(1, 8, 8), steps=4, num_images=2, seed=3, compile="none",
                      progress=False, **cache).images

    pipe = TDCPipeline(tiny_unet, scheduler, (1, 8, 8), compile="none", defaults="ddim:4:c2:d2")
    call = dict(batch_size=2, seed=3, output_type="pt", progress=False)
    by_depth, by_interval, off = (pipe(**call, **cache).images for cache in (
        dict(cache_depth=1), dict(cache_interval=3), dict(cache_interval=1)))
    assert torch.equal(by_depth, reference(cache_interval=2, cache_depth=1))
    assert torch.equal(by_interval, reference(cache_interval=3, cache_depth=2))
    assert torch.equal(off, reference())
    assert not torch.equal(by_depth, off) and not torch.equal(by_interval, by_depth)
    uncached = TDCPipeline(tiny_unet, scheduler, (1, 8, 8), compile="none", defaults="ddim:4")
    with pytest.raises(ValueError, match=r"^cache_depth \(--cache-depth\) 2 was given without feature caching; give "
                                         r"cache_interval \(--cache-interval\) >= 2 too, or drop cache_depth$"):
        uncached(**call, cache_depth=2)
    with pytest.raises(ValueError, match=r"^cache_depth \(--cache-depth\) 2 was given without feature caching"):
        pipe(**call, cache_interval=1, cache_depth=2)
