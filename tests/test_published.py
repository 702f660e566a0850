"""Published model code (tests/published: improved-diffusion's UNetModel, pytorch_diffusion's DDPM Model,
denoising-diffusion-pytorch's Unet, unchanged) through every stage, as a user brings it: `Run(...,
base="module:function")` -> plan (measured) -> prune (every expert within 3% of its FLOPs budget) -> fine-tune ->
bundle -> load -> the loaded bundle samples exactly as the router of the fine-tuned models does. And a model the
stages could save once but not again is refused before any work."""

import pytest
import torch

from conftest import tiny_config
from published.improved_diffusion.unet import UNetModel
from published.models import PytorchDiffusionModel
from published.pytorch_diffusion.model import Model
from tdcdiff.base_model import BaseModelError
from tdcdiff.bundle import load_bundle
from tdcdiff.flops import count_flops
from tdcdiff.pipeline import SAMPLERS, sample
from tdcdiff.router import Router
from tdcdiff.serialization import load_model

MODELS = ["improved_diffusion", "pytorch_diffusion", "denoising_diffusion_pytorch"]

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.mark.parametrize("name", MODELS)
def test_published_model_runs_every_stage_and_its_bundle_samples_identically(tmp_path, name):
    from tdcdiff.run import Run

    run = Run(tmp_path / "run", tiny_config(groups=3), progress=False, base=f"published.models:{name}")
    run.train_base()
    plan = run.plan()  # ordering "measured": a uniform trial pruning of the base
    assert plan.sensitivity is not None and sorted(plan.fractions) == pytest.approx([0.6, 0.8, 1.0])
    summaries = run.prune()
    errors = [s["flops"] / s["budget"] - 1 for s in summaries]
    print(f"{name}: FLOPs error per expert {[f'{e:+.2%}' for e in errors]}")
    assert all(abs(e) <= 0.03 for e in errors), errors
    assert [s["flops"] < plan.base_flops for s in summaries] == [f < 1 for f in plan.fractions]
    run.finetune()
    bundle = load_bundle(run.export_bundle())

    experts = [load_model(run.dir / "finetune" / f"group_{i}" / "final") for i in range(len(plan.budgets))]
    assert [count_flops(e, run.sample_shape) for e in experts] == [s["flops"] for s in summaries]
    in_memory = Router(experts, plan.grouping).eval()
    for sampler in SAMPLERS:
        a, b = (sample(router, run.scheduler, sample_shape=run.sample_shape, sampler=sampler, steps=4, num_images=4,
                       seed=5, progress=False).images for router in (in_memory, bundle.router))
        assert torch.isfinite(a).all() and torch.equal(a, b), sampler


class InstanceKwargsUNet(UNetModel):
    """A class whose constructor does not record its arguments: only the function below sets them, on the instance."""


def instance_kwargs():
    kwargs = dict(in_channels=1, model_channels=64, out_channels=1, num_res_blocks=1, attention_resolutions=[],
                  channel_mult=[1, 2])
    model = InstanceKwargsUNet(**kwargs)
    model.tdcdiff_init_kwargs = kwargs
    return model


class TupleModel(Model):
    """pytorch_diffusion's Model recording its arguments as given: ch_mult a tuple, which JSON brings back a list."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.tdcdiff_init_kwargs = kwargs


def tuple_arguments():
    return TupleModel(ch=64, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                      in_channels=1, resolution=8)


def lost_argument():
    model = PytorchDiffusionModel(ch=64, out_ch=1, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4],
                                  dropout=0.0, in_channels=1, resolution=8)
    model.tdcdiff_init_kwargs = {**model.tdcdiff_init_kwargs, "ch_mult": [1, 2, 2]}  # not what built it
    return model


@pytest.mark.parametrize("function, message", [
    ("instance_kwargs",
     r"a InstanceKwargsUNet rebuilt from its saved arguments has no tdcdiff_init_kwargs, so a pruned "
                        r"model could not be saved; set self.tdcdiff_init_kwargs in InstanceKwargsUNet.__init__"),
    ("tuple_arguments", r"every stage rebuilds the model as TupleModel\(\*\*tdcdiff_init_kwargs\) from JSON, and that "
                        r"fails \(TypeError: can only concatenate tuple \(not \"list\"\) to tuple\); record arguments"),
    ("lost_argument", r"a PytorchDiffusionModel rebuilt from its tdcdiff_init_kwargs differs from the model in tensor "
                      r"'down\.1\.downsample\.conv\.bias'; record every constructor argument that shapes the model"),
])
def test_a_model_that_cannot_be_saved_again_is_refused_before_any_work(tmp_path, function, message):
    from tdcdiff.run import Run

    run = Run(tmp_path / "run", tiny_config(), progress=False, base=f"test_published:{function}")
    with pytest.raises(BaseModelError, match=rf"^--base test_published:{function}: {message}") as err:
        run.train_base()
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "base").exists()
