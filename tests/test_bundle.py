import json

import pytest
import torch

from tdcdiff.bundle import BundleError, load_bundle, save_bundle
from tdcdiff.flops import count_flops
from tdcdiff.grouping import make_groups
from tdcdiff.models import build_unet
from tdcdiff.pipeline import sample
from tdcdiff.prune.fit import fit_to_budget
from tdcdiff.prune.units import prunable_units, uniform_decision
from tdcdiff.sampling_setting import SamplingSetting
from tdcdiff.schedule import make_scheduler


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    torch.manual_seed(0)
    base = build_unet("digits-8")
    full = count_flops(base, (1, 8, 8))
    small = fit_to_budget(base, uniform_decision(prunable_units(base), 0.3), int(0.6 * full), (1, 8, 8)).model
    scheduler = make_scheduler(1000)
    grouping = make_groups("uniform", 2, scheduler)
    experts = [small, base]
    path = tmp_path_factory.mktemp("b") / "bundle"
    save_bundle(path, experts, grouping, scheduler, sample_shape=(1, 8, 8),
                expert_flops=[count_flops(e, (1, 8, 8)) for e in experts], base_flops=full, provenance={"data": "test"})
    return path, experts, scheduler


def test_provenance_keeps_nan_and_infinities_as_text_and_refuses_what_json_cannot_write(bundle_dir, tmp_path):
    # attack 2026-12-07f row 681: a NaN literal was written into manifest.json, which is then not valid JSON; a
    # diffusers scheduler config holds -inf (DPM-Solver's lambda_min_clipped), so such numbers are kept as text
    _, experts, scheduler = bundle_dir
    grouping = make_groups("uniform", 2, scheduler)
    flops = [count_flops(e, (1, 8, 8)) for e in experts]
    given = {"x": float("nan"), "scheduler": {"lambda_min_clipped": float("-inf"), "steps": [1, float("inf")]}}
    path = save_bundle(tmp_path / "b", experts, grouping, scheduler, sample_shape=(1, 8, 8), expert_flops=flops,
                       base_flops=max(flops), provenance=given)
    json.loads((path / "manifest.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN literal
    assert load_bundle(path).manifest["provenance"] == {
        "x": "NaN", "scheduler": {"lambda_min_clipped": "-Infinity", "steps": [1, "Infinity"]}}
    refused = (r"^provenance must be plain JSON \(text, numbers, lists, mappings\): Object of type object is not JSON "
               r"serializable; convert or drop that value$")
    with pytest.raises(ValueError, match=refused):
        save_bundle(tmp_path / "c", experts, grouping, scheduler, sample_shape=(1, 8, 8), expert_flops=flops,
                    base_flops=max(flops), provenance={"when": object()})
    assert not (tmp_path / "c").exists()


def test_save_load_sample_gives_identical_images(bundle_dir):
    from tdcdiff.router import Router

    path, experts, scheduler = bundle_dir
    bundle = load_bundle(path)
    original = Router(experts, bundle.router.grouping)
    a = sample(original, scheduler, sample_shape=(1, 8, 8), steps=6, num_images=4, seed=3, progress=False)
    b = sample(bundle.router, bundle.scheduler, sample_shape=bundle.sample_shape, steps=6, num_images=4, seed=3,
               progress=False)
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-5)
    assert bundle.manifest["expert_flops"][0] < bundle.manifest["base_flops"]
    images = bundle.pipeline()(batch_size=2, num_inference_steps=3, output_type="np", progress=False).images
    assert images.shape == (2, 8, 8, 1)


def copy_bundle(path, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(path, target)
    return target


def test_truncated_weights_are_named(bundle_dir, tmp_path):
    target = copy_bundle(bundle_dir[0], tmp_path)
    weights = target / "expert_0" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(BundleError,
                       match=r"expert_0/model.safetensors is truncated or corrupted: expected \d+ bytes, found 100"):
        load_bundle(target)


def test_flipped_byte_is_detected(bundle_dir, tmp_path):
    target = copy_bundle(bundle_dir[0], tmp_path)
    weights = target / "expert_1" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="cannot load expert 1.*sha256 does not match"):
        load_bundle(target)


def test_missing_manifest_and_missing_file(bundle_dir, tmp_path):
    target = copy_bundle(bundle_dir[0], tmp_path)
    (target / "expert_1" / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="is missing; copy the whole bundle"):
        load_bundle(target)
    (target / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(target)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_a_diffusers_folder_given_as_a_bundle_says_what_it_is_and_how_to_use_it(tmp_path):
    """A DDPMPipeline's save_pretrained folder, or its unet/, read as "not a complete bundle" (attack 2026-12-07e
    row 418); the line says it is diffusers' and points at --base. The CLI prints the same line."""
    from diffusers import DDPMPipeline, DDPMScheduler
    from typer.testing import CliRunner

    from tdcdiff.cli import app

    DDPMPipeline(unet=build_unet("digits-8"), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "p")
    for folder, what in ((tmp_path / "p", r"a diffusers pipeline \(model_index.json\)"),
                         (tmp_path / "p" / "unet", r"a diffusers model \(config.json and diffusion_pytorch_model")):
        with pytest.raises(BundleError, match=f"manifest.json is missing: {folder} is not a complete tdcdiff bundle: "
                                              f"it is {what}.*, `tdcdiff run --base {folder}` \\(or Run"):
            load_bundle(folder)
    shown = CliRunner().invoke(app, ["sample", "--bundle", str(tmp_path / "p"), "--num", "1"])
    assert shown.exit_code == 2 and len(shown.output.splitlines()) == 1 and "a diffusers pipeline" in shown.output


def test_wrong_format_version(bundle_dir, tmp_path):
    target = copy_bundle(bundle_dir[0], tmp_path)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["format"] = "tdcdiff-bundle/99"
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format 'tdcdiff-bundle/99', this tdcdiff reads 'tdcdiff-bundle/2'"):
        load_bundle(target)


def test_shape_mismatch_is_reported(bundle_dir, tmp_path):
    """Weights of another architecture in place of an expert's (checksums updated) fail by name."""
    import hashlib

    target = copy_bundle(bundle_dir[0], tmp_path)
    arch = json.loads((target / "expert_1" / "architecture.json").read_text())
    arch["config"]["layers_per_block"] = 2
    (target / "expert_1" / "architecture.json").write_text(json.dumps(arch))
    manifest = json.loads((target / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (target / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="cannot load expert 1"):
        load_bundle(target)


def test_a_bundle_samples_with_its_recorded_setting_unless_told_otherwise(bundle_dir, tmp_path):
    from typer.testing import CliRunner

    from tdcdiff.cli import app
    from tdcdiff.sampling_setting import SamplingSetting

    path, experts, scheduler = bundle_dir
    assert load_bundle(path).sampling == SamplingSetting("ddim", 50)  # a bundle without one: DDIM, min(50, T)
    chosen = SamplingSetting.parse("dpm-solver++:7:c2")
    grouping = load_bundle(path).router.grouping
    save_bundle(tmp_path / "b", experts, grouping, scheduler, sample_shape=(1, 8, 8), sampling=chosen,
                expert_flops=[count_flops(e, (1, 8, 8)) for e in experts],
                base_flops=count_flops(experts[1], (1, 8, 8)))
    bundle = load_bundle(tmp_path / "b")
    assert bundle.sampling == chosen and bundle.pipeline().defaults == chosen
    shown = CliRunner().invoke(app, ["sample", "--bundle", str(tmp_path / "b"), "--num", "2", "-q",
                                     "--output", str(tmp_path / "g.png")])
    assert shown.exit_code == 0 and "dpm-solver++ 7 steps" in shown.output \
        and "a full pass every 2 steps" in shown.output
    told = CliRunner().invoke(app, ["sample", "--bundle", str(tmp_path / "b"), "--num", "2", "-q", "--steps", "3",
                                    "--sampler", "ddim", "--cache-interval", "1", "--output", str(tmp_path / "g.png")])
    assert told.exit_code == 0 and "ddim 3 steps" in told.output and "feature cache" not in told.output


@pytest.mark.parametrize("sampling, message", [
    ({"sampler": "heun", "steps": 5}, r"'sampling': unknown sampler 'heun'"),
    ({"sampler": "ddim", "steps": 5000}, r"ddim:5000 takes 5000 steps, more than the schedule's T=1000"),
    ({"sampler": "ddim", "steps": 5, "cache_interval": 0}, r"'sampling.cache_interval' must be an integer >= 1, got 0"),
    ({"sampler": "ddim", "steps": True}, r"'sampling.steps' must be an integer >= 1, got True"),
    ({"sampler": "ddim", "steps": 5, "cache_interval": 2, "cache_depth": -3},
     r"'sampling.cache_depth' must be an integer >= 1, got -3"),
    ({"sampler": "ddim", "steps": 5, "cache_depth": 2},
     r"'sampling.cache_depth' is 2 but 'sampling.cache_interval' is 1"),
    ({"sampler": "ddim", "steps": 5, "cache_interval": 2, "cache_depth": 3},
     r"manifest.json: 'sampling.cache_depth' is 3 but expert 0 is a UNet of 2 levels \(down blocks\); set it to 1..2"),
    ({"sampler": "ddim", "steps": 5, "eta": 1}, r"'sampling' must be \{\"sampler\", \"steps\""),
    ("ddim:5", r"'sampling' must be"),
])
def test_a_recorded_setting_sampling_cannot_use_is_refused_on_load(bundle_dir, tmp_path, sampling, message):
    target = copy_bundle(bundle_dir[0], tmp_path)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["sampling"] = sampling
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        load_bundle(target)


@pytest.mark.parametrize("sampling", [SamplingSetting("unipc", 61), "unipc:61", {"sampler": "unipc", "steps": 61}])
def test_save_bundle_takes_a_setting_its_text_or_its_manifest_dict(bundle_dir, tmp_path, sampling):
    """save_bundle(sampling=...) as a SamplingSetting, "sampler:steps" or the manifest's dict (attack 2026-12-07e
    row 420: a dict gave AttributeError: 'dict' object has no attribute 'to_dict')."""
    path, experts, scheduler = bundle_dir
    save_bundle(tmp_path / "b", experts, load_bundle(path).router.grouping, scheduler, sample_shape=(1, 8, 8),
                sampling=sampling, expert_flops=[count_flops(e, (1, 8, 8)) for e in experts],
                base_flops=count_flops(experts[1], (1, 8, 8)))
    assert load_bundle(tmp_path / "b").sampling == SamplingSetting("unipc", 61)


@pytest.mark.parametrize("sampling, message", [
    (("unipc", 61), r"^sampling must be a SamplingSetting, its text \(sampler:steps\[:cN\[:dD\]\], e.g. 'ddim:50'\) or "
                    r"a dict \{\"sampler\", \"steps\"\[, \"cache_interval\", \"cache_depth\"\]\}, got a tuple"),
    ({"cache_depth": 5}, r"^'sampling' must be \{\"sampler\", \"steps\""),
    ("unipc", r"^sampling 'unipc': takes sampler:steps"),
    ("ddim:5000", r"^ddim:5000 takes 5000 steps, more than the schedule's T=1000"),
    (SamplingSetting("ddim", 5, 2, 5),  # the experts are 2-level UNets: refused on save, as load would
     r"'sampling.cache_depth' is 5 but expert 0 is a UNet of 2 levels \(down blocks\); set it to 1..2"),
])
def test_save_bundle_refuses_any_other_sampling_with_one_value_error(bundle_dir, tmp_path, sampling, message):
    path, experts, scheduler = bundle_dir
    with pytest.raises(ValueError, match=message):
        save_bundle(tmp_path / "b", experts, load_bundle(path).router.grouping, scheduler, sample_shape=(1, 8, 8),
                    sampling=sampling, expert_flops=[count_flops(e, (1, 8, 8)) for e in experts],
                    base_flops=count_flops(experts[1], (1, 8, 8)))
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("sampling, message", [
    # attack f row 663: "re-export the bundle" told a save_bundle caller to redo what it was doing
    (SamplingSetting("ddim", 2000), "ddim:2000 takes 2000 steps, more than the schedule's T=1000; give sampling "
                                    "1..1000 steps"),
    # row 664: a depth past the experts' levels was written, and refused only by load_bundle
    (SamplingSetting("ddim", 4, cache_interval=2, cache_depth=9),
     "save_bundle(sampling=ddim:4:c2:d9): 'sampling.cache_depth' is 9 but expert 0 is a UNet of 2 levels (down "
     "blocks); set it to 1..2 (1 caches the most)"),
])
def test_save_bundle_names_its_sampling_argument_and_what_it_may_be(bundle_dir, tmp_path, sampling, message):
    path, experts, scheduler = bundle_dir
    with pytest.raises(ValueError) as refused:
        save_bundle(tmp_path / "b", experts, load_bundle(path).router.grouping, scheduler, sample_shape=(1, 8, 8),
                    sampling=sampling, expert_flops=[count_flops(e, (1, 8, 8)) for e in experts],
                    base_flops=count_flops(experts[1], (1, 8, 8)))
    assert str(refused.value) == message
    assert not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == []  # before anything is written


def test_save_bundle_names_another_scheduler_class_and_the_conversion(bundle_dir, tmp_path):
    # fix-20j's note: a DDIMScheduler holding the training betas was refused as a manifest to "re-export"
    from diffusers import DDIMScheduler

    path, experts, scheduler = bundle_dir
    with pytest.raises(ValueError) as refused:
        save_bundle(tmp_path / "b", experts, load_bundle(path).router.grouping,
                    DDIMScheduler.from_config(scheduler.config), sample_shape=(1, 8, 8),
                    expert_flops=[count_flops(e, (1, 8, 8)) for e in experts],
                    base_flops=count_flops(experts[1], (1, 8, 8)))
    assert str(refused.value) == (
        "scheduler must be the training schedule as a diffusers DDPMScheduler (every sampler is built from its "
        "config), got a DDIMScheduler; give DDPMScheduler.from_config(scheduler.config), which keeps its betas and "
        "prediction type")
    assert list(tmp_path.iterdir()) == []


def test_a_budget_past_a_floats_range_is_an_integer_not_a_traceback(bundle_dir, tmp_path):
    # A sibling of attack f row 510: 'budgets' were checked with math.isfinite, which raised OverflowError on an
    # integer of 401 digits, in save_bundle and in load_bundle (a manifest is untrusted).
    path, experts, scheduler = bundle_dir
    save_bundle(tmp_path / "b", experts, load_bundle(path).router.grouping, scheduler, sample_shape=(1, 8, 8),
                expert_flops=[count_flops(e, (1, 8, 8)) for e in experts],
                base_flops=count_flops(experts[1], (1, 8, 8)), budgets=[10**400, 1])
    assert load_bundle(tmp_path / "b").manifest["budgets"] == [10**400, 1]


def test_a_run_or_tune_directory_given_as_a_bundle_names_where_its_bundle_is(bundle_dir, tmp_path, monkeypatch):
    """A run directory R read as "R/manifest.json is missing: R is not a complete tdcdiff bundle" (attack 2026-12-07g
    row 770); so did a stage folder, a tune directory, a tune's base/ and a candidate. The line says where the
    bundle is, and the path it names loads. The CLI prints the same line."""
    import shutil

    from typer.testing import CliRunner

    from tdcdiff.cli import app

    run, tune = tmp_path / "r", tmp_path / "t"
    for folder in (run / "base", run / "prune", tune / "base" / "base", tune / "candidates" / "00-single"):
        folder.mkdir(parents=True)
    for config in (run / "config.json", tune / "base" / "config.json"):
        config.write_text("{}")
    (tune / "tune.json").write_text("{}")
    missing = " is not a complete tdcdiff bundle: "
    expect = {
        run: f"it is a tdcdiff run directory, which has made no bundle yet \\({run / 'bundle'}: `tdcdiff run --out "
             f"{run}` finishes the run\\)$",
        tune: f"it is a tdcdiff tune directory, which has shipped no bundle \\({tune / 'chosen'} does not exist: "
              f"`tdcdiff tune --out {tune}` ships one\\); each candidate's bundle is {tune / 'candidates'}/<name>/"
              "bundle$",
    }
    for folder, message in expect.items():
        with pytest.raises(BundleError, match=f"^{folder / 'manifest.json'} is missing: {folder}{missing}{message}"):
            load_bundle(folder)
    shutil.copytree(bundle_dir[0], run / "bundle")
    shutil.copytree(bundle_dir[0], tune / "chosen")
    shutil.copytree(bundle_dir[0], tune / "candidates" / "00-single" / "bundle")
    for folder, message, bundle in [
        (run, "it is a tdcdiff run directory, whose bundle is {}: give that$", run / "bundle"),
        (run / "prune", f"it is the prune/ folder of the tdcdiff run directory {run}, whose bundle is {{}}: give "
                        "that$", run / "bundle"),
        (tune, "it is a tdcdiff tune directory, whose chosen bundle is {}: give that$", tune / "chosen"),
        (tune / "base", f"it is the base/ folder of the tdcdiff tune directory {tune}, whose chosen bundle is {{}}: "
                        "give that$", tune / "chosen"),
        (tune / "candidates" / "00-single", "the bundle is the folder inside it, {}: give that$",
         tune / "candidates" / "00-single" / "bundle"),
    ]:
        with pytest.raises(BundleError, match=f"^{folder / 'manifest.json'} is missing: {folder}{missing}"
                                              + message.format(bundle)):
            load_bundle(folder)
        assert load_bundle(bundle).manifest["provenance"]["data"] == "test"
    monkeypatch.chdir(run / "prune")  # "." has the stage folder's name
    with pytest.raises(BundleError, match=f"it is the prune/ folder of the tdcdiff run directory {run}, whose"):
        load_bundle(".")
    shown = CliRunner().invoke(app, ["sample", "--bundle", str(run), "--num", "1"])
    assert shown.exit_code == 2 and len(shown.output.splitlines()) == 1 and f"whose bundle is {run / 'bundle'}: give " \
                                                                             "that" in shown.output
    (run / "bundle" / "manifest.json").unlink()  # a run's own bundle/, damaged: no other folder to point at
    with pytest.raises(BundleError, match=r"^\.\./bundle/manifest.json is missing: \.\./bundle is not a complete "
                                          r"tdcdiff bundle$"):
        load_bundle("../bundle")
