"""A bundle cannot switch off its own checks, and a small bundle cannot exhaust memory (issue 21, items 3-7).

Every scheduler setting the samplers read is checked against what sampling can use and against the schedule
each expert's training record names; each record binds its expert's weights to its group and sample shape;
every file is opened only as a regular file inside the bundle, with a size cap, before it is read; sizes
are capped before anything is allocated for them; values a message shows are cut short."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel
from typer.testing import CliRunner

from tdcdiff.bundle import BundleError, load_bundle, save_bundle
from tdcdiff.cli import app
from tdcdiff.flops import count_flops
from tdcdiff.grouping import make_groups
from tdcdiff.manifest import MAX_MANIFEST_BYTES
from tdcdiff.models import build_unet
from tdcdiff.pipeline import sample
from tdcdiff.schedule import make_scheduler
from tdcdiff.serialization import MAX_ARCHITECTURE_BYTES, load_model, save_model
from test_bundle_security import SHAPE, edit_architecture, edit_manifest, edit_weights, entry, manifest_of, write_bundle

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A bundle of two tiny UNets; each test edits its own copy."""
    torch.manual_seed(0)
    return write_bundle(tmp_path_factory.mktemp("good") / "bundle", [build_unet("digits-8").eval() for _ in range(2)])


@pytest.fixture()
def bundle(good, tmp_path):
    return Path(shutil.copytree(good, tmp_path / "bundle"))


def refused(bundle, message):
    with pytest.raises(BundleError, match=message) as caught:
        load_bundle(bundle)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 1000
    return str(caught.value)


def used(key, value):
    """Set a scheduler setting and take it out of `_use_default_values`, so that diffusers really uses it."""
    def change(m):
        m["scheduler"][key] = value
        m["scheduler"]["_use_default_values"] = [k for k in m["scheduler"]["_use_default_values"] if k != key]
    return change


# -- 3. the scheduler: within what sampling can use, and the schedule the experts were trained with ---------------
@pytest.mark.parametrize("changes, message", [
    ([used("clip_sample_range", 0.0)], r"'scheduler.clip_sample_range' must be in \[1, inf\) \(images span \[-1, 1\]: "
                                       r"a smaller range greys out every image\), got 0.0"),
    ([used("clip_sample_range", -1.0)], r"'scheduler.clip_sample_range' must be in \[1, inf\) .*got -1.0"),
    ([used("clip_sample_range", float("nan"))], r"'scheduler.clip_sample_range' must be in \[1, inf\) .*got nan"),
    ([used("thresholding", True), used("sample_max_value", 0.0)],
     r"'scheduler.sample_max_value' must be in \[1, inf\) \(thresholding divides by it: below 1 every image is NaN\)"),
    ([used("dynamic_thresholding_ratio", 0.0)], r"'scheduler.dynamic_thresholding_ratio' must be in \(0, 1\]"),
    ([used("dynamic_thresholding_ratio", 1.5)], r"'scheduler.dynamic_thresholding_ratio' must be in \(0, 1\]"),
    ([used("steps_offset", 1000)], r"'scheduler.steps_offset' must be an integer from 0 to T-1=999, got 1000"),
    ([used("beta_end", 0.03)],
     r"'scheduler.beta_end' is 0.03 but expert 0 was trained with 0.02 \('expert_training'\); set 'scheduler.beta_end' "
     r"to 0.02"),
    ([used("beta_start", 0.001)], r"'scheduler.beta_start' is 0.001 but expert 0 was trained with 0.0001"),
    ([used("beta_schedule", "scaled_linear")], r"'scheduler.beta_schedule' is 'scaled_linear' but expert 0 was trained "
                                               r"with 'linear'"),
    ([lambda m: m["expert_training"][0].update(rescale_betas_zero_snr=True)],
     r"'scheduler.rescale_betas_zero_snr' is False but expert 0 was trained with True"),
    ([used("trained_betas", [0.01] * 1000)], r"'scheduler.trained_betas' are not the betas expert 0 was trained with"),
    ([lambda m: m["scheduler"].update(_class_name="DDIMScheduler")],
     r"'scheduler._class_name' is 'DDIMScheduler'; a bundle's scheduler is the DDPMScheduler its experts were trained"),
    ([lambda m: m["expert_training"][1].update(beta_schedule="squaredcos_cap_v2")],
     r"'scheduler.beta_schedule' is 'linear' but expert 1 was trained with 'squaredcos_cap_v2'"),
    ([used("variance_type", "fixed_large_log")],  # diffusers' DDPM takes sqrt(log beta): NaN at every step
     r"'scheduler': the noise schedule's variance_type is 'fixed_large_log', which tdcdiff's samplers cannot use "
     r"\(diffusers' DDPMScheduler.step takes the square root .*\); set variance_type to 'fixed_large' .*re-export"),
    ([used("rescale_betas_zero_snr", True),
      lambda m: [r.update(rescale_betas_zero_snr=True) for r in m["expert_training"]]],
     r"'scheduler': the noise schedule has zero terminal SNR .* predicts epsilon.*re-export the bundle"),
    # attack 2026-12-07e rows 329, 337 and their siblings: the real problem, and the fix
    ([used("beta_start", float("nan"))], r"'scheduler.beta_start' holds nan, which is not a finite number; re-export"),
    ([used("trained_betas", [float("nan")] * 1000)], r"'scheduler.trained_betas' holds nan, which is not a finite "),
    ([used("num_train_timesteps", 500)], r"scheduler T=500 but groups cover T=1000 \('scheduler.num_train_timesteps' "
                                         r"and 'grouping' must name one T\): the bundle was edited; re-export the"),
    ([lambda m: m["scheduler"].update(_class_name="os.system")],
     r"names 'diffusers.os.system', which is not a diffusers scheduler class .*; re-export the bundle"),
    ([used("beta_start", "x")], r"argument 'beta_start' must be a number \(its default is 0.0001\), got 'x'"),
])
def test_scheduler_settings_that_ruin_images_are_refused_whatever_use_default_values_says(bundle, changes, message):
    for change in changes:
        edit_manifest(bundle, change)
    refused(bundle, message)


def test_scheduler_settings_sampling_can_use_still_load_and_sample(bundle):
    edit_manifest(bundle, used("clip_sample_range", 1.5))
    edit_manifest(bundle, used("thresholding", True))
    edit_manifest(bundle, used("sample_max_value", 1.5))
    loaded = load_bundle(bundle)
    assert loaded.scheduler.config.clip_sample_range == 1.5 and loaded.scheduler.config.thresholding
    images = sample(loaded.router, loaded.scheduler, sample_shape=loaded.sample_shape, steps=3, num_images=2,
                    progress=False).images
    assert torch.isfinite(images).all() and images.std() > 0


@pytest.mark.parametrize("scheduler, message", [
    (DDPMScheduler(variance_type="fixed_large_log"), r"variance_type is 'fixed_large_log', which tdcdiff's samplers "
                                                     r"cannot use .*set variance_type to 'fixed_large'"),
    (DDPMScheduler(rescale_betas_zero_snr=True), r"zero terminal SNR .* predicts epsilon"),
])
def test_a_schedule_no_sampler_can_use_is_refused_by_save_bundle_and_sample(scheduler, message, tmp_path):
    """Refused when the bundle is written (nothing left), and by sample() for a user's scheduler, before any step
    (the samplers' own check, made earlier: rows 349, 421, 423 of docs/attack-2026-12-07e.md)."""
    experts = [build_unet("digits-8").eval() for _ in range(2)]
    with pytest.raises(BundleError, match=message):
        write_bundle(tmp_path / "b", experts, scheduler)
    assert not (tmp_path / "b").exists()
    for sampler in ("ddpm", "ddim"):
        with pytest.raises(ValueError, match=message):
            sample(experts[0], scheduler, sample_shape=SHAPE, sampler=sampler, steps=2, num_images=1, progress=False)


def test_the_cli_refuses_a_ruinous_scheduler_before_sampling(bundle, tmp_path):
    edit_manifest(bundle, used("thresholding", True))
    edit_manifest(bundle, used("sample_max_value", 0.0))
    result = CliRunner().invoke(app, ["sample", "--bundle", str(bundle), "--num", "2", "--steps", "2", "--quiet",
                                      "--output", str(tmp_path / "s.png")])
    assert result.exit_code == 2 and result.output.startswith("error: ") and len(result.output.splitlines()) == 1
    assert "'scheduler.sample_max_value' must be in [1, inf)" in result.output and not (tmp_path / "s.png").exists()


# -- 4. each expert is the one its record says was trained on its group; the probe runs on every expert -----------
def swap_expert_directories(bundle):
    (bundle / "expert_0").rename(bundle / "swap")
    (bundle / "expert_1").rename(bundle / "expert_0")
    (bundle / "swap").rename(bundle / "expert_1")

    def change(m):
        m["files"] = {name.replace("expert_0/", "x/").replace("expert_1/", "expert_0/").replace("x/", "expert_1/"): e
                      for name, e in m["files"].items()}
        m["expert_flops"].reverse()
    edit_manifest(bundle, change)


def test_swapped_experts_are_refused(bundle):
    swap_expert_directories(bundle)
    refused(bundle, r"expert 0's weights are not the ones 'expert_training'\[0\] records as trained on group 0 "
                    r"\(timesteps \[0, 500\], .*\): the experts were swapped or replaced")


def test_swapped_experts_with_their_records_are_refused(bundle):
    swap_expert_directories(bundle)
    edit_manifest(bundle, lambda m: m["expert_training"].reverse())
    refused(bundle, r"'expert_training'\[0\] says expert 0 was trained on timesteps \[500, 1000\] but group 0 is "
                    r"\[0, 500\]: the experts were swapped or the groups edited")


@pytest.mark.parametrize("key", ["weights_sha256", "sample_shape", "beta_end", "timesteps"])
def test_a_record_without_a_key_is_an_older_bundle_and_refused(bundle, key):
    edit_manifest(bundle, lambda m: m["expert_training"][1].pop(key))
    refused(bundle, rf"'expert_training'\[1\] lacks \['{key}'\]: the bundle was written by an older tdcdiff or edited; "
                    r"re-export the bundle")


def test_mixed_dtype_experts_are_probed_and_their_flops_checked(bundle):
    edit_weights(bundle, 0, lambda s: s.__setitem__("conv_out.bias", s["conv_out.bias"].half()))
    edit_manifest(bundle, lambda m: m["expert_flops"].__setitem__(0, 1))
    refused(bundle, r"'expert_flops'\[0\] is 1 but expert 0 costs 30007296 FLOPs per forward pass")


def test_save_refuses_a_record_of_another_group_or_schedule(good, tmp_path):
    experts = list(load_bundle(good).router.experts)
    scheduler = make_scheduler(1000)
    grouping = make_groups("uniform", 2, scheduler)
    common = dict(sample_shape=SHAPE, expert_flops=[count_flops(e, SHAPE) for e in experts], base_flops=1)
    with pytest.raises(BundleError, match=r"'expert_training'\[0\] says expert 0 was trained on timesteps \[500, "):
        save_bundle(tmp_path / "b", experts, grouping, scheduler, **common,
                    expert_training=[{"timesteps": [500, 1000]}, {"timesteps": [0, 500]}])
    with pytest.raises(BundleError, match=r"'scheduler.beta_schedule' is 'linear' but expert 1 was trained with 'cos"):
        save_bundle(tmp_path / "b", experts, grouping, scheduler, **common,
                    expert_training=[{}, {"beta_schedule": "cosine"}])
    assert list(tmp_path.iterdir()) == []


# -- 5. the sample shape is the one the experts were trained on ---------------------------------------------------
def test_a_sample_shape_the_experts_were_not_trained_on_is_refused(bundle):
    for i in range(2):
        edit_architecture(bundle, i, lambda a: a["config"].update(sample_size=256))
    edit_manifest(bundle, lambda m: m.update(sample_shape=[1, 256, 256]))
    refused(bundle, r"'sample_shape' is \[1, 256, 256\] but expert 0 was trained on \[1, 8, 8\] samples "
                    r"\('expert_training'\); set 'sample_shape' to \[1, 8, 8\]")


# -- 6. only regular files inside the bundle, of a capped size, are opened, before anything is read ---------------
def test_a_fifo_manifest_is_refused_without_blocking(bundle):
    (bundle / "manifest.json").unlink()
    os.mkfifo(bundle / "manifest.json")
    refused(bundle, r"manifest.json is not a regular file; the bundle is corrupted")


@pytest.mark.parametrize("target", ["/dev/zero", "outside"])
def test_a_manifest_symlinked_out_of_the_bundle_is_refused_before_it_is_read(bundle, tmp_path, target):
    outside = tmp_path / "outside.json"
    outside.write_bytes((bundle / "manifest.json").read_bytes())  # a valid manifest: only its place is wrong
    (bundle / "manifest.json").unlink()
    (bundle / "manifest.json").symlink_to(outside if target == "outside" else target)
    shown = outside if target == "outside" else target
    refused(bundle, rf"names 'manifest.json', which leads outside .* \(to {shown}\)")


def test_a_manifest_over_the_size_cap_is_refused_before_it_is_read(bundle):
    with open(bundle / "manifest.json", "r+b") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: no disk used, and reading it would be the only cost
    refused(bundle, rf"manifest.json is {MAX_MANIFEST_BYTES + 1} bytes, more than the {MAX_MANIFEST_BYTES} such a file "
                    r"may have")


@pytest.mark.parametrize("kind", ["fifo", "symlink out", "over the cap"])
def test_a_saved_models_architecture_is_opened_only_as_a_small_regular_file_inside(tmp_path, kind):
    save_model(build_unet("digits-8"), tmp_path / "m")
    architecture = tmp_path / "m" / "architecture.json"
    if kind == "over the cap":
        with open(architecture, "r+b") as f:
            f.truncate(MAX_ARCHITECTURE_BYTES + 1)
    else:
        architecture.unlink()
        os.mkfifo(architecture) if kind == "fifo" else architecture.symlink_to("/dev/zero")
    message = {"fifo": "architecture.json is not a regular file",
               "symlink out": r"names 'architecture.json', which leads outside .* \(to /dev/zero\)",
               "over the cap": rf"architecture.json is {MAX_ARCHITECTURE_BYTES + 1} bytes, more than the "
                               rf"{MAX_ARCHITECTURE_BYTES}"}[kind]
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path / "m")


def test_saved_weights_that_are_a_fifo_are_refused(tmp_path):
    save_model(build_unet("digits-8"), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    os.mkfifo(tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors is not a regular file; re-run the stage that wrote it"):
        load_model(tmp_path / "m")


# -- 7. sizes capped before anything is allocated; printed values cut ---------------------------------------------
def huge_t(m):
    m["scheduler"]["num_train_timesteps"] = 10**8
    m["grouping"].update(num_train_timesteps=10**8, boundaries=[0, 5 * 10**7, 10**8])
    for g, (s, e) in zip(m["grouping"]["groups"], [(0, 5 * 10**7), (5 * 10**7, 10**8)]):
        g.update(start=s, end=e, size=e - s)


@pytest.mark.parametrize("change, message", [
    (huge_t, r"'grouping.num_train_timesteps' is 100000000, more than the 1000000 timesteps tdcdiff handles"),
    (lambda m: m["scheduler"].update(num_train_timesteps=10**8),
     r"'scheduler.num_train_timesteps' is 100000000, more than the 1000000 timesteps"),
    (lambda m: m["grouping"].update(boundaries=list(range(1002))),
     r"'grouping.boundaries' gives 1001 groups, more than the 1000 experts a bundle may have"),
    (lambda m: m.update(sample_shape=[1, 8, 100000]),
     r"'sample_shape' is \[1, 8, 100000\], beyond the 64 channels and 1024x1024 pixels a bundle may have"),
    (lambda m: m.update(sample_shape=[1000, 8, 8]), r"'sample_shape' is \[1000, 8, 8\], beyond the 64 channels"),
    (lambda m: m["expert_training"][0].update(sample_shape=[1, 8, 10**9]),
     r"'expert_training'\[0\].sample_shape is \[1, 8, 1000000000\], beyond"),
])
def test_sizes_are_capped_before_anything_is_allocated(bundle, change, message):
    edit_manifest(bundle, change)
    refused(bundle, message)


@pytest.mark.parametrize("change", [
    lambda m: m["files"].__setitem__("x" * 10**6, {"bytes": 1}),
    lambda m: m.update(format="y" * 10**6),
    lambda m: m.update(budgets=[1.0] * 10**5),
    lambda m: m.update(expert_flops=[1] * 10**5),
    lambda m: m.update(conditioning={"num_classes": list(range(10**5))}),
    lambda m: m["scheduler"].update(variance_type="z" * 10**6),
    lambda m: m["expert_training"][0].update(weights_sha256="w" * 10**6),
    lambda m: m["expert_training"][0].update(beta_schedule="s" * 10**6),
])
def test_values_shown_in_a_message_are_cut_short(bundle, change):
    edit_manifest(bundle, change)
    message = refused(bundle, r"re-export the bundle|but the experts have no class embedding")
    assert "characters)" in message


def test_repeated_keys_and_deep_nesting_are_invalid_json(bundle, tmp_path):
    text = (bundle / "manifest.json").read_text()
    (bundle / "manifest.json").write_text(text.replace('"format":', '"budgets": null, "format":', 1))
    refused(bundle, r"manifest.json is not valid JSON \(key\(s\) \['budgets'\] appear more than once in one object\)")
    save_model(build_unet("digits-8"), tmp_path / "m")
    (tmp_path / "m" / "architecture.json").write_text("[" * 100000)
    with pytest.raises(ValueError, match=r"architecture.json is not valid JSON \(nested too deep\); re-run the stage"):
        load_model(tmp_path / "m")


# -- tracebacks and silent results -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64])
def test_weights_of_a_dtype_models_are_not_computed_in_are_refused(bundle, dtype):
    edit_weights(bundle, 0, lambda s: s.__setitem__("conv_in.weight", s["conv_in.weight"].to(dtype)))
    name = str(dtype).removeprefix("torch.")
    refused(bundle, rf"cannot load expert 0 .*model.safetensors holds {name} tensors \(in conv_in.weight\), which "
                    r"models are not computed in; saved weights are float32, float16 or bfloat16")


def conditional_unet(classes: int) -> UNet2DModel:
    config = {k: v for k, v in build_unet("digits-8").config.items() if not k.startswith("_")}
    return UNet2DModel.from_config({**config, "num_class_embeds": classes}).eval()


def test_experts_of_different_class_ids_are_refused_on_save_and_load(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(BundleError, match=r"expert 1 embeds 5 class ids but expert 0 embeds 11 class ids; every expert "
                                          r"of a bundle takes the same class ids"):
        write_bundle(tmp_path / "mixed", [conditional_unet(11), conditional_unet(5)])
    assert not (tmp_path / "mixed").exists()
    path = write_bundle(tmp_path / "b", [conditional_unet(11), conditional_unet(11)])
    other = write_bundle(tmp_path / "other", [conditional_unet(5), conditional_unet(5)])
    shutil.rmtree(path / "expert_1")
    shutil.copytree(other / "expert_1", path / "expert_1")  # a deliberate tamperer: every hash and record updated

    def change(m):
        theirs = manifest_of(other)
        m["files"].update({k: v for k, v in theirs["files"].items() if k.startswith("expert_1/")})
        m["expert_training"][1]["weights_sha256"] = theirs["expert_training"][1]["weights_sha256"]
        m["expert_flops"][1] = theirs["expert_flops"][1]
    edit_manifest(path, change)
    refused(path, r"manifest.json: expert 1 embeds 5 class ids but expert 0 embeds 11 class ids")


SAVE = """
import sys, torch
from tdcdiff.bundle import save_bundle
from tdcdiff.grouping import make_groups
from tdcdiff.models import build_unet
from tdcdiff.schedule import make_scheduler
torch.manual_seed(0)
scheduler = make_scheduler(1000)
save_bundle(sys.argv[1], [build_unet("digits-8").eval()], make_groups("uniform", 1, scheduler), scheduler,
            sample_shape=(1, 8, 8), expert_flops=[1], base_flops=1)
"""


def test_the_same_bundle_is_the_same_bytes(tmp_path):
    """diffusers keeps `_use_default_values` as a set: its order changed with the process's hash seed."""
    manifests = []
    for seed in ("1", "2"):
        path = tmp_path / f"bundle_{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", SAVE, str(path)], check=True, env=env)
        manifests.append((path / "manifest.json").read_bytes())
    assert manifests[0] == manifests[1]
    assert json.loads(manifests[0])["scheduler"]["_use_default_values"] == sorted(
        json.loads(manifests[0])["scheduler"]["_use_default_values"])


# -- a latent bundle's VAE: its scale is the experts', and it decodes to finite images -----------------------------
@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8,), latent_channels=2, layers_per_block=1,
                        norm_num_groups=4, sample_size=8, scaling_factor=0.5).eval()
    experts = [build_unet("digits-8", in_channels=2).eval() for _ in range(2)]
    scheduler = make_scheduler(1000)
    flops = [count_flops(e, (2, 8, 8)) for e in experts]
    return save_bundle(tmp_path_factory.mktemp("latent") / "bundle", experts, make_groups("uniform", 2, scheduler),
                       scheduler, sample_shape=(2, 8, 8), expert_flops=flops, base_flops=max(flops), vae=vae)


@pytest.mark.parametrize("scale, recorded, message", [
    (0.25, 0.5, r"its config's scaling_factor 0.25 and shift_factor None must be finite, the scale > 0 and equal to "
                r"the manifest's 'latent.scaling_factor' 0.5"),
    (1e-30, 1e-30, r"it decodes a latent to non-finite images"),
    (-0.5, -0.5, r"its config's scaling_factor -0.5 .* must be finite, the scale > 0"),
])
def test_a_vae_scale_other_than_the_experts_or_unusable_is_refused(latent, tmp_path, scale, recorded, message):
    bundle = Path(shutil.copytree(latent, tmp_path / "bundle"))
    name = "vae/architecture.json"
    architecture = json.loads((bundle / name).read_text())
    architecture["config"]["scaling_factor"] = scale
    data = json.dumps(architecture).encode()
    (bundle / name).write_bytes(data)
    edit_manifest(bundle, lambda m: (m["files"].__setitem__(name, entry(data)),
                                     m["latent"].update(scaling_factor=recorded)))
    refused(bundle, rf"cannot load the VAE of bundle [^:]*: {message}")
    assert load_bundle(latent).vae.config.scaling_factor == 0.5


# -- sampling a bundle: labels of the data's classes, the bundle's shape, mixed dtypes under autocast --------------
@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """Experts embedding 11 class ids for data of 10 classes, trained without label dropout (no null class)."""
    torch.manual_seed(0)
    conditioning = {"num_class_embeds": 11, "num_classes": 10, "null_class": None}
    return write_bundle(tmp_path_factory.mktemp("conditional") / "bundle", [conditional_unet(11)],
                        conditioning=conditioning)


@pytest.mark.parametrize("labels, message", [
    (2.7, r"class labels must be integer class ids, got float32 labels: 2.7"),
    ([True, False], r"class labels must be integer class ids, got bool labels: \[True, False\]"),
    (10, r"class labels must be classes of the data, 0..9 \(the model embeds 11 ids: no image was labelled with the "
         r"others\), got 10..10"),
])
def test_labels_that_are_no_class_of_the_data_are_refused(conditional, labels, message):
    pipe = load_bundle(conditional).pipeline()
    with pytest.raises(ValueError, match=message):
        pipe(batch_size=2, num_inference_steps=2, class_labels=labels, progress=False)
    assert pipe(batch_size=2, num_inference_steps=2, class_labels=9, output_type="pt", progress=False).images.shape \
        == (2, 1, 8, 8)


def test_the_null_class_is_no_class_to_sample(conditional, tmp_path):
    edit = Path(shutil.copytree(conditional, tmp_path / "bundle"))
    edit_manifest(edit, lambda m: m["conditioning"].update(null_class=10))
    result = CliRunner().invoke(app, ["sample", "--bundle", str(edit), "--class", "10", "--num", "2", "--steps", "2",
                                      "--quiet", "--output", str(tmp_path / "s.png")])
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert result.output.startswith("error: class labels must be classes of the data, 0..9 (the model embeds 11 ids, "
                                    "id 10 the null class for dropped labels") and not (tmp_path / "s.png").exists()


def test_sampling_at_another_shape_than_the_bundles_is_refused(good):
    loaded = load_bundle(good)
    with pytest.raises(ValueError, match=r"sample_shape \(1, 16, 16\) is not the 8x8 input the model was built for "
                                         r"\(its config's sample_size\); sample at \(1, 8, 8\)"):
        sample(loaded.router, loaded.scheduler, sample_shape=(1, 16, 16), steps=2, num_images=1, progress=False)


def test_mixed_dtype_experts_sample_under_autocast_and_are_refused_at_fp32(bundle):
    edit_weights(bundle, 0, lambda s: s.__setitem__("conv_out.bias", s["conv_out.bias"].half()))
    loaded = load_bundle(bundle)
    common = dict(sample_shape=SHAPE, steps=3, num_images=2, progress=False)
    with pytest.raises(ValueError, match=r"expert 0 holds weights of several dtypes \(float16, float32\), which run "
                                         r"only under autocast: sample with precision='bf16' \(--precision bf16\)"):
        sample(loaded.router, loaded.scheduler, **common)
    assert torch.isfinite(sample(loaded.router, loaded.scheduler, precision="bf16", **common).images).all()


# -- found attacking the fixes above: holes that read as gigabytes, configs that build for minutes ----------------
def test_a_sparse_weights_file_is_refused_before_it_is_read(bundle):
    name = "expert_1/model.safetensors"
    with open(bundle / name, "r+b") as f:
        f.truncate(1 << 30)  # a GiB that reads as zeros, a few MB on disk: it loaded at 2.5 GB peak for 2 GiB
    if os.stat(bundle / name).st_blocks * 512 * 8 >= 1 << 30:
        pytest.skip("this file system allocates the holes of a truncated file")
    claimed = {"bytes": 1 << 30, "sha256": "0" * 64}
    edit_architecture(bundle, 1, lambda a: a["weights"].update(claimed))
    edit_manifest(bundle, lambda m: (m["files"].__setitem__(name, claimed),
                                     m["expert_training"][1].update(weights_sha256=claimed["sha256"])))
    refused(bundle, r"expert_1/model.safetensors is a sparse file \(1073741824 bytes, \d+ of them on disk\): saved "
                    r"files are written in full")


def test_a_config_building_far_more_than_its_weights_is_stopped_early(bundle):
    """layers_per_block=20000 built (on the meta device) for 265 s and 3.3 GB before the weights were compared."""
    edit_architecture(bundle, 0, lambda a: a["config"].update(layers_per_block=20000))
    refused(bundle, r"cannot load expert 0 .*architecture.json describes a model of more than \d+ modules, far more "
                    r"than its weights file holds tensors for")


def test_a_model_built_for_real_stops_before_it_outgrows_its_weights(tmp_path):
    """A DiT has a non-persistent buffer, so it is built for real: 8192 channels took 5.9 GB for 40 kB of weights."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(sample_size=8, in_channels=1, out_channels=1, patch_size=2, num_layers=1,
                                num_attention_heads=2, attention_head_dim=8, num_embeds_ada_norm=10).eval()
    path = write_bundle(tmp_path / "dit", [dit])
    assert type(load_bundle(path).router.experts[0].model) is DiTTransformer2DModel
    edit_architecture(path, 0, lambda a: a["config"].update(num_attention_heads=64, attention_head_dim=128))
    refused(path, r"describes a model of more than \d+ parameter elements, far more than its weights file holds")


def test_every_class_id_a_config_claims_has_an_embedding_row(tmp_path):
    """A config claiming 10**9 class ids over an 11-row table loaded, and `--class 500` raised IndexError."""
    path = write_bundle(tmp_path / "b", [conditional_unet(11)])
    edit_architecture(path, 0, lambda a: a["config"].update(num_class_embeds=10**9))
    refused(path, r"it fails on a \[1, 8, 8\] input at t=0 \(IndexError: index out of range in self\); its "
                  r"architecture.json and weights do not fit together")


@pytest.mark.parametrize("change, message", [
    (lambda m: m["conditioning"].update(null_class=3), r"'conditioning.null_class' 3 is one of the data's classes "
                                                       r"0..9; the null class is the id for dropped labels"),
    (lambda m: m["grouping"]["groups"][0].update(snr_db_start=float("nan")),
     r"'grouping.groups' must hold finite snr_db_start and snr_db_end values"),
])
def test_conditioning_and_grouping_values_that_contradict_themselves_are_refused(conditional, tmp_path, change,
                                                                                 message):
    path = Path(shutil.copytree(conditional, tmp_path / "bundle"))
    edit_manifest(path, change)
    refused(path, message)


def test_a_huge_integer_is_invalid_json_not_advice_to_raise_a_limit(bundle):
    text = (bundle / "manifest.json").read_text()
    huge = '"base_flops": ' + "9" * 5000 + ', "x": '
    (bundle / "manifest.json").write_text(text.replace('"base_flops": ', huge, 1))
    message = refused(bundle, r"manifest.json is not valid JSON \(a number of more than 4300 digits\)")
    assert "set_int_max_str_digits" not in message


def test_one_file_listed_under_many_names_is_refused(bundle):
    """2000 symlinks to one weights file were each read and hashed (5 GB for a 5 MB bundle; a 1 GB expert and the
    manifest's 8 MiB of names would take days)."""
    (bundle / "links").mkdir()
    for i in range(3):
        (bundle / "links" / str(i)).symlink_to("../expert_0/model.safetensors")
    edit_manifest(bundle, lambda m: m["files"].update({f"links/{i}": m["files"]["expert_0/model.safetensors"]
                                                       for i in range(3)}))
    refused(bundle, r"bundle files .*expert_0/model.safetensors and 'links/0' are one file \(links\): a bundle lists "
                    r"each of its files once")
