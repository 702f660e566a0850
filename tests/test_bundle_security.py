"""Bundles are untrusted input: tampered, inconsistent or hostile bundles are refused with one line, nothing
named in a file is ever imported or run, and a good bundle round-trips exactly (every sampler, every dtype)."""

import hashlib
import json
import os
import re
import shutil

import pytest
import torch
from diffusers import UNet2DModel
from typer.testing import CliRunner

from tdcdiff import serialization
from tdcdiff.bundle import BundleError, load_bundle, save_bundle
from tdcdiff.cli import app
from tdcdiff.flops import count_flops
from tdcdiff.grouping import make_groups
from tdcdiff.models import as_denoiser, build_unet
from tdcdiff.pipeline import SAMPLERS, sample
from tdcdiff.router import Router
from tdcdiff.schedule import make_scheduler
from test_surgery import TinyTimeNet

SHAPE = (1, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture()
def registry(monkeypatch):
    """An empty class registry for one test (registrations do not leak into other tests)."""
    monkeypatch.setattr(serialization, "_REGISTERED", {})


def write_bundle(path, experts, scheduler=None, flops=None, **kwargs):
    scheduler = scheduler or make_scheduler(1000)
    grouping = make_groups("uniform", len(experts), scheduler)
    flops = flops or [count_flops(as_denoiser(e), SHAPE) for e in experts]  # load_bundle counts them again
    return save_bundle(path, experts, grouping, scheduler, sample_shape=SHAPE, expert_flops=flops,
                       base_flops=max(flops), **kwargs)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A bundle of two tiny UNets; each test edits its own copy."""
    torch.manual_seed(0)
    experts = [build_unet("digits-8").eval(), build_unet("digits-8").eval()]
    path = write_bundle(tmp_path_factory.mktemp("good") / "bundle", experts)
    return path, experts


@pytest.fixture()
def bundle(good, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(good[0], target)
    return target


def manifest_of(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def edit_manifest(bundle, change):
    manifest = manifest_of(bundle)
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def edit_file(bundle, name, data: bytes):
    """Replace a bundle file and make the manifest match it, as a deliberate tamperer would."""
    (bundle / name).write_bytes(data)
    edit_manifest(bundle, lambda m: m["files"].__setitem__(name, entry(data)))


def entry(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def edit_architecture(bundle, i, change):
    name = f"expert_{i}/architecture.json"
    architecture = json.loads((bundle / name).read_text())
    change(architecture)
    edit_file(bundle, name, json.dumps(architecture).encode())


# -- nothing named in a file is ever imported or called -------------------------------------------------------
def hostile(marker):
    """Architectures naming callables that would create `marker` if they were ever called."""
    return {
        "subprocess.Popen": {"args": ["touch", str(marker)]},
        "os.system": {"command": f"touch {marker}"},
        "builtins.exec": {"source": f"open({str(marker)!r}, 'w')"},
        "diffusers.utils.export_to_video": {"video_frames": [], "output_video_path": str(marker)},
        "diffusers.DiffusionPipeline": {},  # exported by diffusers, but not a model class
        "diffusers.__class__": {},
    }


@pytest.mark.parametrize("name", list(hostile("m")))
def test_a_class_named_in_architecture_json_is_never_imported_or_called(bundle, tmp_path, name):
    marker = tmp_path / "marker"
    edit_architecture(bundle, 1,
                      lambda a: (a.pop("config"), a.update({"class": name, "kwargs": hostile(marker)[name]})))
    short = name.rpartition(".")[2]
    with pytest.raises(BundleError,
                       match=rf"cannot load expert 1 of bundle .*names class {re.escape(repr(name))}, which "
                                          rf"tdcdiff does not rebuild.*register_model_class\({re.escape(short)}\)"):
        load_bundle(bundle)
    assert not marker.exists()


def test_the_cli_refuses_a_hostile_bundle_without_running_it(bundle, tmp_path):
    marker = tmp_path / "marker"
    edit_architecture(bundle, 0,
                      lambda a: a.update({"class": "subprocess.Popen", "kwargs": {"args": ["touch", str(marker)]}}))
    result = CliRunner().invoke(app, ["sample", "--bundle", str(bundle), "--output", str(tmp_path / "s.png")])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "'subprocess.Popen', which tdcdiff does not rebuild" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not marker.exists()


def test_a_scheduler_class_outside_diffusers_is_refused(bundle):
    edit_manifest(bundle, lambda m: m["scheduler"].update({"_class_name": "os.system"}))
    with pytest.raises(BundleError, match=r"'scheduler._class_name' names 'diffusers.os.system', which is not a "
                                          r"diffusers scheduler"):
        load_bundle(bundle)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(bogus=1), r"UNet2DModel takes no argument\(s\) \['bogus'\]"),
    (lambda c: c.update(_private=1), r"takes no argument\(s\) \['_private'\]"),
    (lambda c: c.update(block_out_channels="wide"), r"cannot build UNet2DModel from its saved 'config'"),
])
def test_model_arguments_are_checked_against_the_class_signature(bundle, change, message):
    edit_architecture(bundle, 0, lambda a: change(a["config"]))
    with pytest.raises(BundleError, match=f"cannot load expert 0 .*{message}"):
        load_bundle(bundle)


# -- every file stays inside the bundle and is hashed ---------------------------------------------------------
def test_absolute_and_parent_paths_are_refused(bundle, tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    for name in (str(outside), "../outside.bin", "expert_0/../../outside.bin", "expert_0\\..\\x", ""):
        target = tmp_path / f"case_{abs(hash(name))}"
        shutil.copytree(bundle, target)
        edit_manifest(target, lambda m: m["files"].__setitem__(name, entry(b"secret")))
        with pytest.raises(BundleError,
                           match=rf"'files' names {re.escape(repr(name))}, which is not a plain relative path"):
            load_bundle(target)


def test_a_symlink_leading_out_of_the_bundle_is_refused(bundle, tmp_path):
    weights = bundle / "expert_0" / "model.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(weights, outside)
    weights.symlink_to(outside)  # same bytes, same hash: only the location is wrong
    with pytest.raises(BundleError, match=r"'files' names 'expert_0/model.safetensors', which leads outside"):
        load_bundle(bundle)


def test_architecture_naming_weights_outside_its_directory_is_refused(bundle):
    edit_architecture(bundle, 0, lambda a: a["weights"].update(file="../expert_1/model.safetensors"))
    with pytest.raises(BundleError, match=r"names weights '../expert_1/model.safetensors' that the manifest's 'files' "
                                          r"does not list"):
        load_bundle(bundle)


def test_a_fifo_in_place_of_a_file_is_refused(bundle):
    weights = bundle / "expert_1" / "model.safetensors"
    weights.unlink()
    os.mkfifo(weights)  # reading it would block for ever
    with pytest.raises(BundleError, match="expert_1/model.safetensors is not a regular file"):
        load_bundle(bundle)


def test_changed_weights_of_the_same_size_fail_the_manifest_hash(bundle):
    """architecture.json updated to the new weights' hash (and listed so), the manifest's weights entry not."""
    weights = bundle / "expert_0" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    edit_architecture(bundle, 0, lambda a: a["weights"].update(sha256=hashlib.sha256(data).hexdigest()))
    with pytest.raises(BundleError, match=r"names weights 'model.safetensors' that the manifest's 'files' does not "
                                          r"list with the same sha256"):
        load_bundle(bundle)


def test_any_other_listed_file_is_hashed(bundle):
    (bundle / "notes.txt").write_text("hello")
    edit_manifest(bundle, lambda m: m["files"].__setitem__("notes.txt", entry(b"hellO")))
    with pytest.raises(BundleError,
                       match=r"bundle file .*notes.txt is corrupted: its sha256 does not match the manifest"):
        load_bundle(bundle)


# -- the manifest is validated before anything is built ---------------------------------------------------------
def set_groups(edges):
    def change(m):
        m["grouping"]["boundaries"] = edges
        m["grouping"]["groups"] = [dict(index=i, start=s, end=e, snr_db_start=0.0, snr_db_end=0.0, size=e - s)
                                   for i, (s, e) in enumerate(zip(edges, edges[1:]))]
    return change


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("files"), "key 'files' is missing"),
    (lambda m: m.update(files=["expert_0/model.safetensors"]),
     r"'files' must map each file's path to \{bytes, sha256\}, got list"),
    (lambda m: m["files"].update({"expert_0/model.safetensors": {"bytes": "1"}}),
     r"'files' entry 'expert_0/model.safetensors' must be"),
    (lambda m: m["grouping"].update(boundaries=[1000, 500, 0]),
     r"'grouping.boundaries' must be integers rising strictly from 0 to T=1000"),
    (set_groups([1000, 500, 0]), "'grouping.boundaries' must be integers rising strictly"),
    (set_groups([0, 200, 400, 600, 800, 1000]),
     r"'grouping' has 5 groups but 'files' lists the expert directories \['expert_0', 'expert_1'\]"),
    (lambda m: m.update(expert_flops=[10]),
     r"'expert_flops' must hold one FLOPs count .* per group, 2 in all, got \[10\]"),
    (lambda m: m.update(expert_flops=[10, -1]), "'expert_flops' must hold one FLOPs count"),
    (lambda m: m.update(budgets=[1]), "'budgets' must be null or one finite number >= 0 per group"),
    (lambda m: m.update(budgets=[float("nan"), 1.0]),
     r"'budgets' must be null or one finite number >= 0 per group, 2 in all, got \[nan"),
    (lambda m: m.update(sample_shape=[1, 8]),
     r"'sample_shape' must be \[channels, height, width\], 3 positive integers"),
    (lambda m: m.update(sample_shape=[1, 8, 0]), "'sample_shape' must be"),
    (lambda m: m.update(sample_shape=[1, 16, 16]),
     r"'sample_shape' is \[1, 16, 16\] but expert 0 was built for 8x8 inputs .*set 'sample_shape' to \[1, 8, 8\]"),
    (lambda m: m.update(sample_shape=[3, 8, 8]), r"expert 0 takes 1-channel input .*set 'sample_shape' to \[1, 8, 8\]"),
    (lambda m: m["scheduler"].update(prediction_type="v_prediction"),
     r"'scheduler.prediction_type' is 'v_prediction' but expert 0 was trained to predict 'epsilon'"),
    (lambda m: m["expert_training"][1].update(prediction_type="sample"), "expert 1 was trained to predict 'sample'"),
    (lambda m: m.update(expert_training=[]), "'expert_training' must hold one record per group, 2 in all"),
    (lambda m: m["scheduler"].update(bogus=3), r"DDPMScheduler takes no argument\(s\) \['bogus'\]"),
    (lambda m: m["scheduler"].update(clip_sample="yes"),
     r"argument 'clip_sample' must be of type bool \(its default is True\), got 'yes'"),
    (lambda m: m["scheduler"].update(num_train_timesteps=1000.5), "argument 'num_train_timesteps' must be of type int"),
    (lambda m: m["scheduler"].update(variance_type="garbage"), r"'scheduler.variance_type' must be one of \("),
    (lambda m: m["scheduler"].update(timestep_spacing="zz"), r"'scheduler.timestep_spacing' must be one of"),
    (lambda m: m["scheduler"].update(beta_schedule="x"), r"'scheduler' cannot be built \(NotImplementedError"),
    (lambda m: m["scheduler"].update(beta_end=2.0, _use_default_values=[]),
     r"'scheduler': the noise schedule's betas give noise levels alpha_bar that are not finite and falling"),
    (lambda m: m["scheduler"].update(beta_schedule="squaredcos_cap_v2", _use_default_values=["beta_schedule"]),
     r"'scheduler' settings \['beta_schedule'\] do not survive rebuilding DDPMScheduler"),
    (lambda m: m["scheduler"].update(num_train_timesteps=500), "scheduler T=500 but groups cover T=1000"),
    (lambda m: m.update(format="tdcdiff-bundle/1"),
     "has format 'tdcdiff-bundle/1', this tdcdiff reads 'tdcdiff-bundle/2'; re-export"),
    (lambda m: m["scheduler"].update(trained_betas=[0.01] * 10, _use_default_values=[]),
     r"'scheduler': the noise schedule has 10 betas for num_train_timesteps=1000; give one beta per training timestep"),
    (lambda m: m.update(expert_flops=[1, m["expert_flops"][1]]),
     r"'expert_flops'\[0\] is 1 but expert 0 costs \d+ FLOPs per forward pass \(counted on load\)"),
    (lambda m: m.update(conditioning=[1, 2]),
     r"'conditioning' is \[1, 2\] but the experts have no class embedding; set it to null"),
    (lambda m: m.update(conditioning={"null_class": 5, "num_classes": 3}),
     "'conditioning' is .* but the experts have no class"),
])
def test_an_inconsistent_manifest_is_refused_naming_the_key(bundle, change, message):
    edit_manifest(bundle, change)
    with pytest.raises(BundleError, match=message) as caught:
        load_bundle(bundle)
    assert "\n" not in str(caught.value)


def test_a_manifest_that_is_not_an_object_is_refused(bundle):
    (bundle / "manifest.json").write_text("[" * 100000)
    with pytest.raises(BundleError, match="manifest.json is not valid JSON"):
        load_bundle(bundle)
    (bundle / "manifest.json").write_text("[]")
    with pytest.raises(BundleError, match="manifest.json: must hold a JSON object, got list"):
        load_bundle(bundle)


def test_save_refuses_pieces_that_do_not_fit(good, tmp_path):
    experts = good[1]
    scheduler = make_scheduler(1000)
    grouping = make_groups("uniform", 2, scheduler)
    common = dict(sample_shape=SHAPE, base_flops=1)
    with pytest.raises(BundleError, match="'expert_flops' must hold one FLOPs count"):
        save_bundle(tmp_path / "b", experts, grouping, scheduler, expert_flops=[1], **common)
    with pytest.raises(BundleError, match="'grouping' has 2 groups but 'files' lists the expert directories"):
        save_bundle(tmp_path / "b", experts[:1], grouping, scheduler, expert_flops=[1, 1], **common)
    with pytest.raises(BundleError, match="expert 0 was trained to predict 'sample'"):
        save_bundle(tmp_path / "b", experts, grouping, scheduler, expert_flops=[1, 1], **common,
                    expert_training=[{"prediction_type": "sample"}] * 2)
    with pytest.raises(BundleError, match=r"'sample_shape' is \[1, 16, 16\] but expert 0 was built for 8x8"):
        save_bundle(tmp_path / "b", experts, grouping, scheduler, expert_flops=[1, 1], sample_shape=(1, 16, 16),
                    base_flops=1)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


# -- a good bundle round-trips exactly ---------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_saved_and_loaded_bundle_samples_identically(good, sampler):
    """The full scheduler config is stored: DPM-Solver++ spaced its timesteps differently after a reload."""
    path, experts = good
    loaded = load_bundle(path)
    scheduler = make_scheduler(1000)
    original = Router(experts, make_groups("uniform", 2, scheduler))
    assert dict(loaded.scheduler.config) == dict(scheduler.config)
    a = sample(original, scheduler, sample_shape=SHAPE, sampler=sampler, steps=5, num_images=3, seed=7, progress=False)
    b = sample(loaded.router, loaded.scheduler, sample_shape=loaded.sample_shape, sampler=sampler, steps=5,
               num_images=3, seed=7, progress=False)
    assert a.timesteps == b.timesteps
    assert torch.equal(a.images, b.images)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_bundles_load_in_their_dtype(good, tmp_path, dtype):
    experts = [build_unet("digits-8").to(dtype).eval() for _ in range(2)]
    loaded = load_bundle(write_bundle(tmp_path / "bundle", experts))
    for expert, original in zip(loaded.router.experts, experts):
        state = expert.model.state_dict()
        assert {t.dtype for t in state.values()} == {dtype}
        assert all(torch.equal(state[k], v) for k, v in original.state_dict().items())


def test_mixed_precision_weights_keep_each_dtype(tmp_path):
    torch.manual_seed(0)
    expert = build_unet("digits-8").eval()
    flops = [count_flops(expert, SHAPE)]  # a mixed-dtype model runs only under autocast
    expert.conv_out.to(torch.float16)
    loaded = load_bundle(write_bundle(tmp_path / "bundle", [expert], flops=flops)).router.experts[0].model
    assert loaded.conv_out.weight.dtype == torch.float16 and loaded.conv_in.weight.dtype == torch.float32
    assert torch.equal(loaded.conv_out.weight, expert.conv_out.weight)


# -- user classes: saved by import path, loaded only when registered ---------------------------------------------
class SubclassedUNet(UNet2DModel):
    """A user's subclass of a diffusers model: saved under this module, not as diffusers.UNet2DModel."""


def test_registered_user_class_round_trip_and_unregistered_refused(tmp_path, registry):
    torch.manual_seed(0)
    experts = [TinyTimeNet().eval(), SubclassedUNet.from_config(build_unet("digits-8").config).eval()]
    path = write_bundle(tmp_path / "bundle", experts)
    classes = [json.loads((path / f"expert_{i}" / "architecture.json").read_text())["class"] for i in range(2)]
    assert classes == ["test_surgery.TinyTimeNet", "test_bundle_security.SubclassedUNet"]
    with pytest.raises(BundleError,
                       match=r"cannot load expert 0 .*names class 'test_surgery.TinyTimeNet', which tdcdiff "
                                          r"does not rebuild.*call `tdcdiff.register_model_class\(TinyTimeNet\)`"):
        load_bundle(path)
    import tdcdiff

    tdcdiff.register_model_class(TinyTimeNet)
    with pytest.raises(BundleError,
                       match=r"expert 1 .*'test_bundle_security.SubclassedUNet'.*"
                             r"register_model_class\(SubclassedUNet\)"):
        load_bundle(path)
    tdcdiff.register_model_class(SubclassedUNet)
    loaded = load_bundle(path)
    assert [type(e.model) for e in loaded.router.experts] == [TinyTimeNet, SubclassedUNet]
    for expert, original in zip(loaded.router.experts, experts):
        assert all(torch.equal(expert.model.state_dict()[k], v) for k, v in original.state_dict().items())
    with pytest.raises(TypeError, match="register_model_class takes a torch.nn.Module subclass, got 'x'"):
        tdcdiff.register_model_class("x")


def test_registered_class_arguments_are_checked(tmp_path, registry):
    serialization.register_model_class(TinyTimeNet)
    path = write_bundle(tmp_path / "bundle", [TinyTimeNet().eval()])
    edit_architecture(path, 0, lambda a: a["kwargs"].update(depth=3))
    with pytest.raises(BundleError, match=r"TinyTimeNet takes no argument\(s\) \['depth'\]; its arguments are "
                                          r"\['channels', 'width'\]"):
        load_bundle(path)
    edit_architecture(path, 0, lambda a: a.update(kwargs=[1, 16]))
    with pytest.raises(BundleError,
                       match="'kwargs' must be a mapping of TinyTimeNet's constructor arguments, got list"):
        load_bundle(path)


def test_classes_that_cannot_be_imported_are_refused_at_save_time(tmp_path):
    main_class = type("ScriptNet", (TinyTimeNet,), {"__module__": "__main__"})
    with pytest.raises(ValueError, match=r"cannot save a ScriptNet defined in the script being run \(__main__\).*"
                                         r"Move the class into a module .*register_model_class\(ScriptNet\)"):
        write_bundle(tmp_path / "bundle", [main_class().eval()])

    class LocalNet(TinyTimeNet):
        pass

    with pytest.raises(ValueError, match=r"cannot save a test_bundle_security.*LocalNet: it cannot be imported by "
                                         r"that name; define the class at the top level of module "
                                         r"test_bundle_security"):
        write_bundle(tmp_path / "bundle", [LocalNet().eval()])
    assert not (tmp_path / "bundle").exists()


# -- an architecture that does not fit its weights fails on load, not in the middle of sampling -------------------
def edit_weights(bundle, i, change):
    from safetensors.torch import load_file, save_file

    name = f"expert_{i}/model.safetensors"
    state = load_file(str(bundle / name))
    change(state)
    save_file(state, str(bundle / name))
    data = (bundle / name).read_bytes()
    edit_architecture(bundle, i, lambda a: a["weights"].update(entry(data)))
    edit_manifest(bundle, lambda m: (m["files"].__setitem__(name, entry(data)),
                                     m["expert_training"][i].update(weights_sha256=entry(data)["sha256"])))


@pytest.mark.parametrize("change, message", [
    # a config 32x wider than its weights: every tensor resized to the weights', but the time embedding is not
    (lambda b: edit_architecture(b, 0, lambda a: a["config"].update(block_out_channels=[64, 128])),
     r"cannot load expert 0 of bundle .*: it fails on a \[1, 8, 8\] input at t=0 \(RuntimeError: mat1 and mat2 .*"
     r"its architecture.json and weights do not fit together"),
    (lambda b: edit_weights(b, 1, lambda s: s.__setitem__("conv_in.weight", torch.zeros(32, 1, 3, 30))),
     r"cannot load expert 1 of bundle .*: it fails on a \[1, 8, 8\] input at t=500 \(RuntimeError"),
    (lambda b: edit_weights(b, 0, lambda s: s["conv_in.bias"].fill_(float("nan"))),
     r"cannot load expert 0 of bundle .*: its weights hold NaN/inf \(in model.conv_in.bias\)"),
    (lambda b: edit_weights(b, 0, lambda s: s.__setitem__("conv_in.bias", s["conv_in.bias"].double())),
     r"cannot load expert 0 of bundle .*: its weights hold float64 tensors \(in model.conv_in.bias\)"),
    (lambda b: edit_architecture(b, 0, lambda a: a["config"].update(sample_size="8")),
     r"expert 0's config has sample_size '8'; it must be a positive integer or \[height, width\]"),
])
def test_an_architecture_that_does_not_fit_its_weights_fails_on_load(bundle, tmp_path, change, message):
    change(bundle)
    with pytest.raises(BundleError, match=message) as caught:
        load_bundle(bundle)
    assert "\n" not in str(caught.value)
    result = CliRunner().invoke(app, ["sample", "--bundle", str(bundle), "--num", "2", "--steps", "2", "--quiet",
                                      "--output", str(tmp_path / "s.png")])
    assert result.exit_code == 2 and "error: " in result.output and not (tmp_path / "s.png").exists()


def test_conditioning_of_a_conditional_bundle_is_checked(tmp_path):
    torch.manual_seed(0)
    config = {k: v for k, v in build_unet("digits-8").config.items() if not k.startswith("_")}
    expert = UNet2DModel.from_config({**config, "num_class_embeds": 11}).eval()
    good = {"num_class_embeds": 11, "num_classes": 10, "null_class": 10}
    assert load_bundle(write_bundle(tmp_path / "ok", [expert], conditioning=good)).null_class == 10
    path = write_bundle(tmp_path / "bad", [expert], conditioning=good)
    edit_manifest(path, lambda m: m["conditioning"].update(null_class="x"))
    with pytest.raises(BundleError,
                       match=r"'conditioning' must be null or \{\"num_class_embeds\": 11, \"num_classes\": null "
                                          r"or 1..11, \"null_class\": null or 0..10\} .*got .*'null_class': 'x'"):
        load_bundle(path)


def test_sampling_more_images_than_memory_holds_is_one_line(good, tmp_path):
    """Refused by the grid's stated maximum before the bundle is read (pipeline.sample also checks memory)."""
    result = CliRunner().invoke(app, ["sample", "--bundle", str(good[0]), "--num", str(10**12), "--quiet",
                                      "--output", str(tmp_path / "s.png")])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: --num must be at most 10000, got {10**12} (a stated maximum: a sample "
                                    "grid is one PNG to look at") and result.output.count("\n") == 1


def test_weights_missing_a_tensor_the_config_adds_is_one_line(bundle):
    edit_architecture(bundle, 0, lambda a: a["config"].update(num_class_embeds=10))
    with pytest.raises(BundleError, match=r"model.safetensors does not fit the architecture in .*architecture.json: "
                                          r"Error\(s\) in loading state_dict for UNet2DModel: Missing key\(s\) in "
                                          r"state_dict: \"class_embedding.weight\"") as caught:
        load_bundle(bundle)
    assert "\n" not in str(caught.value)


def test_a_config_naming_huge_widths_costs_no_memory_before_it_is_refused(bundle):
    """The unpruned size an architecture.json names is built on the meta device: widths of 32768/65536
    channels (tens of GB as real tensors) are refused by the probe, not by running out of memory."""
    edit_architecture(bundle, 0, lambda a: a["config"].update(block_out_channels=[32768, 65536]))
    with pytest.raises(BundleError, match=r"it fails on a \[1, 8, 8\] input at t=0 .*do not fit together: re-export"):
        load_bundle(bundle)


# -- unclear messages of the second attack (docs/attack-2026-12-07b.md rows 7, 12-13, 16) ------------------------
def test_an_upper_case_sha256_is_refused_saying_lower_case(bundle):
    name = "expert_0/model.safetensors"
    edit_manifest(bundle, lambda m: m["files"][name].update(sha256=m["files"][name]["sha256"].upper()))
    with pytest.raises(BundleError, match=r"'files' entry 'expert_0/model.safetensors' must be \{\"bytes\": <integer>, "
                                          r"\"sha256\": <64 lower-case hex digits>\}"):
        load_bundle(bundle)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_integer_or_bool_weights_are_blamed_on_the_weights_file(bundle, dtype):
    edit_weights(bundle, 1, lambda s: s.__setitem__("conv_in.bias", s["conv_in.bias"].to(dtype)))
    with pytest.raises(BundleError, match=rf"cannot load expert 1 .*expert_1/model.safetensors holds tensor "
                                          rf"'conv_in.bias' as {dtype}, where the model built from .*expert_1/"
                                          r"architecture.json has torch.float32: the weights file was edited or "
                                          r"corrupted; re-run the stage that wrote it"):
        load_bundle(bundle)


def test_a_diffusers_class_under_its_full_module_path_is_the_same_class(bundle):
    full = f"{UNet2DModel.__module__}.{UNet2DModel.__qualname__}"
    assert full == "diffusers.models.unets.unet_2d.UNet2DModel"
    edit_architecture(bundle, 0, lambda a: a.update({"class": full}))
    assert isinstance(load_bundle(bundle).router.experts[0].model, UNet2DModel)
    edit_architecture(bundle, 1, lambda a: a.update({"class": "diffusers.models.unets.unet_1d.UNet2DModel"}))
    with pytest.raises(BundleError, match=r"names class 'diffusers.models.unets.unet_1d.UNet2DModel', which tdcdiff "
                                          r"does not rebuild: .*diffusers model classes \(named 'diffusers.<Name>', "
                                          r"e.g. 'diffusers.UNet2DModel', or by the class's own module path\)"):
        load_bundle(bundle)
