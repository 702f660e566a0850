"""Bring your own model, end to end per kind (bench/models_zoo.py): `Run(..., base="module:function")` ->
plan -> prune (every expert within 3% of its FLOPs budget) -> fine-tune -> bundle -> load -> the loaded
bundle samples exactly as the router of the fine-tuned models does, for one seed."""

import pytest
import torch

from conftest import tiny_config
from models_zoo import ddpm_pipeline, latent_pipeline
from tdcdiff.bundle import load_bundle
from tdcdiff.flops import count_flops
from tdcdiff.models import as_denoiser
from tdcdiff.pipeline import SAMPLERS, sample
from tdcdiff.router import Router
from tdcdiff.serialization import _REGISTERED, class_path, load_model

# module:function as a user passes it (the function returns the model), or a pipeline directory written here.
KINDS = {"adm": "models_zoo:AdmUNet", "dit": "models_zoo:TinyDiT",
         "diffusers-class-attention": "models_zoo:class_conditional_unet", "diffusers-pipeline": ddpm_pipeline}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_runs_every_stage_and_its_bundle_samples_identically(tmp_path, kind):
    from tdcdiff.run import Run

    base = KINDS[kind] if isinstance(KINDS[kind], str) else KINDS[kind](tmp_path / "pipe")
    run = Run(tmp_path / "run", tiny_config(groups=3), progress=False, base=base)  # budgets 0.6, 0.8, 1.0
    run.train_base()
    plan = run.plan()
    summaries = run.prune()
    errors = [s["flops"] / s["budget"] - 1 for s in summaries]
    print(f"{kind}: FLOPs error per expert {[f'{e:+.2%}' for e in errors]}")
    assert len(summaries) == len(plan.budgets) and all(abs(e) <= 0.03 for e in errors), errors
    run.finetune()
    bundle = load_bundle(run.export_bundle())

    experts = [load_model(run.dir / "finetune" / f"group_{i}" / "final") for i in range(len(plan.budgets))]
    assert [count_flops(e, run.sample_shape) for e in experts] == [s["flops"] for s in summaries]
    assert bundle.manifest["expert_flops"] == [s["flops"] for s in summaries]
    assert type(as_denoiser(bundle.router.experts[0]).model) is type(experts[0])
    in_memory = Router(experts, plan.grouping).eval()
    labels = torch.tensor([0, 3, 7, 9]) if run.labels(experts[0])[0] is not None else None
    for sampler in SAMPLERS:
        a, b = (sample(router, run.scheduler, sample_shape=run.sample_shape, sampler=sampler, steps=4, num_images=4,
                       seed=5, class_labels=labels, progress=False).images for router in (in_memory, bundle.router))
        assert torch.isfinite(a).all() and torch.equal(a, b), sampler


def test_a_function_base_registers_its_class_for_the_run_only(tmp_path):
    """Run registers the class the user's function returns (its code was trusted by naming it); loading a
    bundle of that class in a process that did not register it is refused, naming the fix."""
    from models_zoo import TinyDiT
    from tdcdiff.run import Run

    name = class_path(TinyDiT)
    _REGISTERED.pop(name, None)
    run = Run(tmp_path / "run", tiny_config(), progress=False, base="models_zoo:TinyDiT")
    assert _REGISTERED[name] is TinyDiT
    run.train_base()
    assert type(run.base_model()) is TinyDiT
    _REGISTERED.pop(name)  # as in a fresh process
    with pytest.raises(ValueError, match=r"call `tdcdiff\.register_model_class\(TinyDiT\)`"):
        load_model(run.dir / "base" / "final")
    import tdcdiff

    tdcdiff.register_model_class(TinyDiT)
    assert type(load_model(run.dir / "base" / "final")) is TinyDiT


@pytest.mark.slow
def test_latent_diffusion_pipeline_runs_in_latent_space_and_its_bundle_decodes(tmp_path):
    from safetensors.torch import load_file

    from tdcdiff.latent import Decoder, encode
    from tdcdiff.run import Run

    run = Run(tmp_path / "run", tiny_config(groups=3), progress=False, base=latent_pipeline(tmp_path / "pipe"))
    run.train_base()
    # The data encoded once, scaled by the VAE's scaling_factor, cached in the run directory.
    cached = load_file(run.dir / "latents" / "latents.safetensors")["latents"]
    assert cached.shape == (len(run.pixels), 2, 8, 8) and run.sample_shape == (2, 8, 8)
    torch.testing.assert_close(cached, encode(run.vae, run.pixels.images), rtol=0, atol=0)
    assert not torch.equal(cached, encode(run.vae, run.pixels.images) / 0.5)  # the factor was applied
    plan = run.plan()
    summaries = run.prune()
    errors = [s["flops"] / s["budget"] - 1 for s in summaries]
    print(f"latent: FLOPs error per expert {[f'{e:+.2%}' for e in errors]}")
    assert all(abs(e) <= 0.03 for e in errors), errors
    run.finetune()
    bundle = load_bundle(run.export_bundle())
    assert bundle.manifest["latent"] == {"vae": "vae", "scaling_factor": 0.5}
    assert bundle.sample_shape == (2, 8, 8) and type(bundle.vae).__name__ == "AutoencoderKL"
    for key, value in run.vae.state_dict().items():
        assert torch.equal(bundle.vae.state_dict()[key], value), key

    experts = [load_model(run.dir / "finetune" / f"group_{i}" / "final") for i in range(len(plan.budgets))]
    in_memory = Router(experts, plan.grouping).eval()
    labels = [0, 3, 7, 9]
    # the bundle's default sampler: its pipeline's scheduler's (a DDPMScheduler: ddpm)
    expected = sample(in_memory, run.scheduler, sample_shape=(2, 8, 8), sampler=bundle.sampling.sampler, steps=4,
                      num_images=4, seed=5, class_labels=labels, decode=Decoder(run.vae), progress=False).images
    images = bundle.pipeline()(batch_size=4, num_inference_steps=4, seed=5, class_labels=labels, output_type="pt",
                               progress=False).images
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    assert torch.equal(images, expected)
    grid = run.sample_grid("tdc", bundle.router)
    from PIL import Image

    assert Image.open(grid).size == Image.open(run.sample_grid("base", run.base_model())).size

    # A bundle is untrusted: its VAE must be an allowlisted VAE class, even with consistent hashes.
    import json
    import shutil

    from tdcdiff.bundle import BundleError
    from tdcdiff.content_hash import sha256_file

    tampered = shutil.copytree(run.dir / "bundle", tmp_path / "tampered")
    architecture = tampered / "vae" / "architecture.json"
    architecture.write_text(architecture.read_text().replace('"diffusers.AutoencoderKL"', '"diffusers.UNet2DModel"'))
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["files"]["vae/architecture.json"] = {"bytes": architecture.stat().st_size,
                                                  "sha256": sha256_file(architecture)}
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"names class 'diffusers.UNet2DModel'; a bundle's VAE must be one of "
                                          r"diffusers.AutoencoderKL"):
        load_bundle(tampered)
