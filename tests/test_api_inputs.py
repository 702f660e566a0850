"""The Python API's arguments checked at the door (docs/attack-2026-12-07b.md rows 91-124): counts, sizes, fractions,
timesteps and devices get one ValueError naming the problem and the fix before any work; numpy scalars are taken
wherever a Python number is, as torch and diffusers take them; the caller's model comes back as it was given."""

import json
import re

import numpy as np
import pytest
import torch

from tdcdiff.budget import make_plan
from tdcdiff.bundle import load_bundle
from tdcdiff.flops import count_flops
from tdcdiff.grouping import make_groups
from tdcdiff.models import build_unet, torch_device
from tdcdiff.pipeline import TDCPipeline, sample
from tdcdiff.router import Router
from tdcdiff.schedule import make_scheduler
from tdcdiff.settings import as_integer, as_real
from tdcdiff.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(batch_size=8, lr=1e-3, warmup_steps=1, log_every=1, checkpoint_every=2, ema_decay=None)


def test_shared_number_helpers_take_numpy_scalars_and_refuse_the_rest():
    assert as_integer("n", np.int64(3)) == 3 and type(as_integer("n", np.int64(3))) is int
    assert type(as_integer("n", torch.tensor(3))) is int  # what operator.index takes
    assert as_real("k", np.float32(0.5)) == 0.5 and type(as_real("k", np.float32(0.5))) is float
    for value in (True, 2.0, "2", None):
        with pytest.raises(ValueError, match=r"^n must be an integer, got "):
            as_integer("n", value)
    with pytest.raises(ValueError, match=r"^n \(a count\) must be >= 1, got 0$"):
        as_integer("n", 0, 1, note="a count")
    for value in (float("nan"), float("inf"), torch.tensor([0.5]), True, "0.5"):  # a 0-d tensor is taken (row 167)
        with pytest.raises(ValueError, match=r"^k must be a finite number \(a Python or numpy int or float\), got "):
            as_real("k", value)


def test_settings_take_numpy_scalars_as_plain_numbers(tmp_path):
    """Row 116: RunConfig(groups=np.int64(2)) and overrides of numpy scalars were refused as not integers."""
    from tdcdiff.run import Run, RunConfig

    run = Run(tmp_path / "r", RunConfig(groups=np.int64(2), k=np.float32(0.5)),
              overrides={"finetune.steps": np.int64(5)})
    assert (run.config.groups, run.config.finetune.steps) == (2, 5)
    assert json.loads(json.dumps(RunConfig(groups=np.int64(2)).to_dict()))["groups"] == 2  # saved as plain JSON
    with pytest.raises(ValueError, match=r"setting 'groups' must be an integer, got True"):
        RunConfig(groups=True).validate()


@pytest.mark.parametrize("call, message", [
    (lambda s: make_groups("snr", 2.0, s), r"^number of groups N must be an integer, got 2.0$"),  # row 91
    (lambda s: make_groups("snr", True, s), r"^number of groups N must be an integer, got True$"),  # row 92
    (lambda s: make_groups("uniform", 3, s, min_size=0),  # row 94
     r"^min_size \(the fewest timesteps a group may have\) must be >= 1, got 0$"),
    (lambda s: make_groups("loss", 2, s, loss_per_t=np.full(1000, np.nan)),  # row 95
     r"^loss_per_t holds NaN/inf at 1000 timestep\(s\) \(first: t=0\); measure the base model's per-timestep loss"),
    (lambda s: make_groups("loss", 2, s, loss_per_t=np.r_[np.ones(999), np.inf]), r"NaN/inf at 1 timestep\(s\) "
                                                                                   r"\(first: t=999\)"),
])
def test_make_groups_refuses(scheduler, call, message):
    with pytest.raises(ValueError, match=message):
        call(scheduler)


def test_make_groups_and_scheduler_store_plain_ints(scheduler):
    """Rows 96, 98: a numpy or torch integer T or N is stored as a Python int (a tensor T leaked into boundaries)."""
    for t in (np.int64(100), torch.tensor(100)):
        made = make_scheduler(t, "squaredcos_cap_v2")
        assert type(made.config.num_train_timesteps) is int
        grouping = make_groups("snr", np.int64(2), made)
        assert all(type(b) is int for b in grouping.boundaries) and grouping.boundaries[-1] == 100
    with pytest.raises(ValueError, match=r"^num_train_timesteps \(T\) must be an integer, got 100.0$"):  # row 97
        make_scheduler(100.0, "squaredcos_cap_v2")


def test_build_unet_sizes():
    """Rows 99-101: numpy sizes taken; 0 and negatives refused (0 was read as "not given")."""
    assert build_unet(sample_size=np.int64(8)).config.sample_size == 8
    assert build_unet(in_channels=np.int64(3)).config.in_channels == 3
    for changes, message in [({"sample_size": 0}, r"^sample_size must be >= 1, got 0$"),
                             ({"sample_size": -8}, r"^sample_size must be >= 1, got -8$"),
                             ({"in_channels": 0}, r"^in_channels must be >= 1, got 0$"),
                             ({"sample_size": (8, 0)}, r"^sample_size must be an integer >= 1 or \(height, width\)"),
                             ({"sample_size": 8.0}, r"^sample_size must be an integer >= 1 or \(height, width\)")]:
        with pytest.raises(ValueError, match=message):
            build_unet(**changes)


def test_count_flops_checks_the_shape_and_takes_half_precision(tiny_unet):
    """Rows 102-103: a 2-element or wrong-size shape failed inside torch; a float16 model failed on float32 input."""
    full = count_flops(tiny_unet, (1, 8, 8))
    assert count_flops(build_unet().half(), np.array([1, 8, 8]).tolist()) == full
    with pytest.raises(ValueError, match=r"^sample_shape must be \(channels, height, width\), 3 positive integers"):
        count_flops(tiny_unet, (8, 8))
    with pytest.raises(ValueError, match=r"^sample_shape \(1, 7, 7\) is not the 8x8 input the model was built for"):
        count_flops(tiny_unet, (1, 7, 7))


def _plan(scheduler, **changes):
    grouping = make_groups("uniform", 2, scheduler)
    arguments = {"k": 0.5, "ordering": "snr-low-hard", "base_flops": 10**6, "sample_shape": (1, 8, 8), **changes}
    return make_plan(grouping, **arguments)


def test_make_plan_arguments(scheduler, tmp_path):
    """Rows 104-106."""
    plan = _plan(scheduler, k=np.float32(0.5), base_flops=np.int64(10**6), mean_budget=np.float64(0.8))
    plan.save(tmp_path / "plan.json")  # failed only here with np.float32 k
    assert type(plan.k) is float and type(plan.base_flops) is int
    for changes, message in [
        ({"base_flops": 0}, r"^base_flops \(the base model's FLOPs per forward pass, flops.count_flops\) must be "
                            r">= 1, got 0$"),
        ({"base_flops": -100}, r"^base_flops .* must be >= 1, got -100$"),
        ({"k": torch.tensor([0.5])}, r"^k \(the easiest group's budget fraction\) must be a finite number"),
        ({"ordering": "measured", "sensitivity": [float("nan"), 1.0]},
         r"^sensitivity\[0\] \(group 0's relative loss .*\) must be a finite number .*, got nan$"),
        ({"mean_budget": float("nan")}, r"^mean_budget \(--mean-budget\) must be in \(0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            _plan(scheduler, **changes)


def test_router_trajectory_flops_refuses_timesteps_outside_the_schedule(scheduler):
    """Row 124: t=1000 and t=-1 were counted as the last and first group's."""
    router = Router([build_unet(), build_unet()], make_groups("uniform", 2, scheduler), expert_flops=[1, 2])
    assert router.trajectory_flops([999, 500, 499, 0]) == 6
    assert router.trajectory_flops(torch.tensor([999, 0])) == 3
    for timesteps in ([1000], [-1]):
        with pytest.raises(ValueError, match=r"^timestep -?\d+ is outside the router's 0..999: give the training "
                                             r"timesteps the sampler visits"):
            router.trajectory_flops(timesteps)
    with pytest.raises(ValueError, match=r"timestep 5.5 is not an integer"):
        router.trajectory_flops([5.5])


def test_sample_restores_the_callers_training_flags(scheduler):
    """Row 111: a preview inside a training loop turned dropout off for the rest of training."""
    model = build_unet()
    model.train()
    model.mid_block.eval()  # a module the caller keeps in eval stays so
    arguments = dict(sample_shape=(1, 8, 8), steps=2, num_images=1, progress=False)
    sample(model, scheduler, **arguments)
    assert model.training and not model.mid_block.training
    assert all(m.training for m in model.down_blocks.modules())

    def decode(latents):  # an error raised inside the sampling loop
        raise RuntimeError("decoder failed")

    with pytest.raises(RuntimeError, match="decoder failed"):
        sample(model, scheduler, **arguments, decode=decode)
    assert model.training and not model.mid_block.training
    pipe = TDCPipeline(model, scheduler, (1, 8, 8))  # building one, and calling it
    pipe(num_inference_steps=2, progress=False)
    assert model.training and not model.mid_block.training


def test_sample_takes_numpy_guidance_scale_and_names_bad_devices(scheduler, tiny_unet):
    """Rows 112-114."""
    arguments = dict(sample_shape=(1, 8, 8), steps=2, num_images=1, progress=False)
    assert sample(tiny_unet, scheduler, **arguments, guidance_scale=np.float32(1.0)).images.shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"^device 'CPU' is not a torch device \(.*\); give e.g. 'cpu' or 'cuda:0'$"):
        sample(tiny_unet, scheduler, **arguments, device="CPU")
    if not torch.cuda.is_available():  # rows 113, 170: not "move the model there", which cannot work here
        for device in ("cuda", torch.device("cuda:0")):
            with pytest.raises(ValueError, match=r"^device 'cuda(:0)?' is not visible here: torch sees 0 CUDA device"):
                sample(tiny_unet, scheduler, **arguments, device=device)


def test_torch_device_and_load_bundle_refuse_unusable_devices(tmp_path):
    """Row 113: load_bundle(device="cuda") without CUDA gave torch's AssertionError after reading the whole bundle,
    device="meta" a RuntimeError; now one ValueError before any read (the path here does not even exist)."""
    assert torch_device("cpu") == torch.device("cpu")
    missing = tmp_path / "no-bundle"
    with pytest.raises(ValueError, match=r"^device 'meta' holds no data: give 'cpu' or 'cuda'$"):
        load_bundle(missing, device="meta")
    with pytest.raises(ValueError, match=r"^device 'CPU' is not a torch device"):
        load_bundle(missing, device="CPU")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=rf"^device 'cuda:{count}' is not visible here: torch sees {count} CUDA "
                                         r"device\(s\) .*; use 'cpu', or install a CUDA build of torch"):
        load_bundle(missing, device=f"cuda:{count}")


@pytest.mark.parametrize("images, message", [
    (lambda d: ((d + 1) * 127.5).round().to(torch.uint8),  # row 118
     r"^training images must be floating point in \[-1, 1\], got torch.uint8; scale to \[-1, 1\]: x / 127.5 - 1$"),
    (lambda d: (d + 1) * 127.5,
     r"^training images must be in \[-1, 1\], got values 0..255; scale to \[-1, 1\]: x / 127.5 - 1"),
    (lambda d: d[0], r"^training images must be a non-empty NCHW tensor, got \(1, 8, 8\)$"),
])
def test_train_refuses_images_not_in_minus_one_to_one(tmp_path, scheduler, tiny_unet, digits, images, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_unet, images(digits.images[:16]), scheduler, TrainConfig(steps=2, **FAST), tmp_path / "t",
              progress=False)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("timesteps, message", [
    (torch.tensor([5.5, 6.0]), r"^timesteps must be integers 0..999 \(an integer tensor or a list of ints\), got "
                               r"torch.float32 values \[5.5, 6.0\]"),  # row 119
    ([5.0, 6.0], r"got torch.float32 values"),
    (torch.tensor([True]), r"got torch.bool values"),
    ([5000, 6000], r"^timesteps must be a non-empty subset of 0..999$"),
])
def test_train_refuses_fractional_or_outside_timesteps(tmp_path, scheduler, tiny_unet, digits, timesteps, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_unet, digits.images[:16], scheduler, TrainConfig(steps=2, **FAST), tmp_path / "t",
              timesteps=timesteps, progress=False)
    assert not (tmp_path / "t").exists()



@pytest.mark.parametrize("batch_size", [10**15, np.int64(10**15), 10**30])
def test_train_refuses_a_batch_that_cannot_fit_in_memory_before_writing(tmp_path, scheduler, tiny_unet, digits,
                                                                       batch_size):
    """Row 175 of attack 2026-12-07d: train() with batch_size 10**15 ended in torch's "DefaultCPUAllocator: can't
    allocate memory" after writing log.jsonl; the run's up-front estimate (capacity.check_training_memory) now
    names the batch size, the estimate and the fix first (10**30: beyond torch's sizes, the batch's own tensors)."""
    config = TrainConfig(steps=2, **{**FAST, "batch_size": batch_size})
    with pytest.raises(ValueError, match=rf"^training with batch_size {int(batch_size)} \(.* parameters: .*; one "
                                         rf"batch of {int(batch_size)} images of 1x8x8: about .* GiB of activations\) "
                                         r"needs about .* GiB, more than the .* of memory this machine has available "
                                         r"now; give a smaller batch_size \(TrainConfig.batch_size\)$"):
        train(tiny_unet, digits.images[:16], scheduler, config, tmp_path / "t", progress=False)
    assert not (tmp_path / "t").exists()

def test_train_refuses_half_precision_weights_and_takes_latent_like_data(tmp_path, scheduler, digits):
    """Row 120: a float16 model was reported as a diverged learning rate two steps in. Zero-centred data beyond
    [-1, 1] (a VAE's scaled latents) still trains, and so do numpy-integer timesteps."""
    for dtype in (torch.float16, torch.bfloat16):
        with pytest.raises(ValueError, match=rf"^the model's weights are {str(dtype)[6:]}: training needs float32 "
                                             r"weights; keep fp32 weights \(model.float\(\)\) and use mixed_precision"):
            train(build_unet().to(dtype), digits.images[:16], scheduler, TrainConfig(steps=2, **FAST),
                  tmp_path / "h", progress=False)
    assert not (tmp_path / "h").exists()
    for device, message in [("CPU", r"^device 'CPU' is not a torch device"), ("meta", r"^device 'meta' holds no data")]:
        with pytest.raises(ValueError, match=message):
            train(build_unet(), digits.images[:16], scheduler, TrainConfig(steps=2, **FAST), tmp_path / "d",
                  device=device, progress=False)
    assert not (tmp_path / "d").exists()
    result = train(build_unet(), digits.images[:16] * 3, scheduler, TrainConfig(steps=2, **FAST), tmp_path / "l",
                   timesteps=np.arange(10, 20), progress=False, data_range=None)  # latents: told so (row 188)
    assert result.steps == 2


# -- third attack (docs/attack-2026-12-07c.md): numpy scalars and 0-d tensors wherever a Python number is taken --
def _as_plain(value):
    """True when value holds only Python numbers (nested lists/tuples/dicts): what JSON writes."""
    if isinstance(value, dict):
        return all(_as_plain(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_as_plain(v) for v in value)
    return value is None or type(value) in (int, float, str, bool)


def test_plain_number_rule_table():
    """The one rule (settings.plain_number): numpy scalars and 0-d arrays/tensors become Python numbers; anything
    else (a bool, a 1-element tensor, text) is left for the argument's own check to refuse."""
    from tdcdiff.models import check_sample_shape
    from tdcdiff.settings import plain_number, plain_values

    for given, plain in [(np.int64(3), 3), (np.float32(0.5), 0.5), (torch.tensor(2), 2), (torch.tensor(1.5), 1.5),
                         (np.array(4), 4), (3, 3), (2.5, 2.5)]:
        assert plain_number(given) == plain and type(plain_number(given)) is type(plain)
    for kept in (True, np.True_, torch.tensor(True), torch.tensor([1]), np.array([1, 2]), "3", None):
        assert plain_number(kept) is kept
    assert plain_values(np.array([5, 6])) == [5, 6] and plain_values((np.int64(1), [np.float64(2)])) == (1, [2.0])
    for shape in (np.array([1, 8, 8]), torch.Size([1, 8, 8]), (np.int64(1), 8, torch.tensor(8))):
        assert check_sample_shape(shape) == (1, 8, 8) and _as_plain(check_sample_shape(shape))
    with pytest.raises(ValueError, match=r"^sample_shape must be \(channels, height, width\), 3 positive integers"):
        check_sample_shape(np.array([1, 8]))


def test_make_plan_and_train_config_store_plain_numbers(scheduler, tmp_path):
    """Rows 163, 175: np.array sample_shape and numpy TrainConfig fields were taken, then failed writing JSON."""
    plan = _plan(scheduler, sample_shape=np.array([1, 8, 8]), k=torch.tensor(0.5), mean_budget=torch.tensor(0.8))
    assert plan.sample_shape == (1, 8, 8) and _as_plain(plan.sample_shape) and type(plan.k) is float
    assert type(plan.mean_budget) is float
    plan.save(tmp_path / "plan.json")
    config = TrainConfig(steps=np.int64(2), lr=np.float32(1e-3), batch_size=np.int64(8))
    assert _as_plain(config.to_dict()) and type(config.steps) is int and type(config.lr) is float
    json.dumps(config.to_dict())


def test_make_scheduler_caps_the_timesteps():
    """Row 182: make_scheduler(np.int64(10**12)) asked torch for 4 TB; any T over MAX_TIMESTEPS gets one line."""
    from tdcdiff.schedule import MAX_TIMESTEPS

    for steps in (np.int64(10**12), MAX_TIMESTEPS + 1):
        with pytest.raises(ValueError, match=rf"^num_train_timesteps must be at most {MAX_TIMESTEPS} \(T; typical: "
                                             rf"1000\), got {int(steps)}$"):
            make_scheduler(steps)
    assert make_scheduler(np.int64(50)).config.num_train_timesteps == 50


def test_sample_takes_numpy_and_0d_tensor_numbers(scheduler, tiny_unet):
    """Rows 165, 167, 168: np.int64(10**18) images skipped the memory check; a 0-d guidance tensor and numpy cache
    settings were refused."""
    arguments = dict(sample_shape=(1, 8, 8), progress=False)
    result = sample(tiny_unet, scheduler, **arguments, sampler="ddim", steps=torch.tensor(4),
                    num_images=np.int64(1), batch_size=np.int64(1), seed=np.int64(0),
                    guidance_scale=torch.tensor(1.0), cache_interval=np.int64(2), cache_depth=np.int64(1))
    assert result.images.shape == (1, 1, 8, 8) and type(result.steps) is int
    with pytest.raises(ValueError, match=r"GiB"):
        sample(tiny_unet, scheduler, **arguments, steps=2, num_images=np.int64(10**18))


def test_load_dataset_and_save_bundle_take_numpy_numbers(tmp_path, scheduler, tiny_unet):
    """Rows 184, 186 (and 172: load_bundle(device=None) is the default device, as sample's)."""
    from tdcdiff.bundle import save_bundle
    from tdcdiff.data import load_dataset

    assert tuple(load_dataset("digits", size=np.int64(8), limit=np.int64(4)).images.shape) == (4, 1, 8, 8)
    grouping = make_groups("uniform", 2, scheduler)
    flops = count_flops(tiny_unet, (1, 8, 8))
    save_bundle(tmp_path / "b", [tiny_unet, tiny_unet], grouping, scheduler, sample_shape=np.array([1, 8, 8]),
                expert_flops=[np.int64(flops)] * 2, base_flops=np.int64(flops), budgets=np.array([flops, flops]))
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["budgets"] == [flops, flops] and manifest["base_flops"] == flops
    assert next(load_bundle(tmp_path / "b", device=None).router.parameters()).device.type == "cpu"


@pytest.mark.parametrize("text, part", [("ddim:+5", "sampling steps"), ("ddim:５", "sampling steps"),
                                        ("ddim:٥", "sampling steps"), ("ddim:²", "sampling steps"),
                                        ("ddim:5:c+2", "the number after ':c'"),
                                        ("ddim:5:c²", "the number after ':c'")])
def test_sampling_setting_text_states_the_ascii_digit_rule(text, part):
    """Row 192: '+5' and other scripts' digits each read as an integer >= 1; the message states the rule."""
    from tdcdiff.sampling_setting import SamplingSetting

    with pytest.raises(ValueError, match=rf"{part} must be an integer >= 1, got .* \(ASCII digits 0-9 only: "
                                         r"no sign, no other digits\)"):
        SamplingSetting.parse(text, "--reference")


@pytest.mark.parametrize("key, value", [("grouping", "T500"), ("base_flops", 1), ("base_flops", 10**15),
                                        ("sample_shape", [3, 8, 8])])
def test_a_plan_that_contradicts_its_run_is_refused_before_prune(tmp_path, key, value):
    """Rows 158-160: a plan.json whose values pass their own checks but not the run (a grouping over T=500 in a
    T=1000 run was pruned and fine-tuned, then refused at bundle naming the manifest; base_flops 1e15 pruned
    nothing and the bundle claimed a 3e7x cheaper model) is refused naming plan.json, before prune writes."""
    from conftest import tiny_config
    from tdcdiff.run import Run

    config = tiny_config()
    config.base = TrainConfig(steps=2, **FAST)
    run = Run(tmp_path / "r", config, progress=False)
    run.train_base()
    plan = run.plan()
    path = run.dir / "plan" / "plan.json"
    data = json.loads(path.read_text())
    if value == "T500":
        value = make_groups("uniform", 2, make_scheduler(500)).to_dict()
        shown, what, key = 500, "the run's is 1000", "grouping.num_train_timesteps"
    else:
        shown, what = value, (f"the base model's counted FLOPs is {plan.base_flops}" if key == "base_flops"
                              else "the run's is [1, 8, 8]")
    path.write_text(json.dumps({**data, key.split(".")[0]: value}))
    with pytest.raises(ValueError, match=re.escape(
            f"{path}: '{key}' is {shown} but {what} (the plan was made for another run, or edited); delete "
            f"{path.parent} and rerun `tdcdiff plan`")):
        Run(run.dir, progress=False).prune()
    assert not (run.dir / "prune").exists()



def test_a_plan_whose_grouping_or_budget_settings_contradict_the_run_is_refused_before_prune(tmp_path):
    """Row 286 of attack 2026-12-07d: a plan.json with grouping.strategy 'uniform' in a grouping 'snr' run was
    pruned, fine-tuned and bundled, the manifest and report saying 'uniform'. Every plan field the run's settings
    also give (strategy, number of groups, k, ordering, mean_budget, budget_unit) is checked, naming plan.json."""
    from conftest import tiny_config
    from tdcdiff.run import Run

    config = tiny_config()
    config.base = TrainConfig(steps=2, **FAST)
    run = Run(tmp_path / "r", config, progress=False)
    run.train_base()
    run.plan()
    path = run.dir / "plan" / "plan.json"
    original = json.loads(path.read_text())
    three = make_groups("snr", 3, make_scheduler(1000)).to_dict()
    edits = [("'grouping.strategy'", {"grouping": {**original["grouping"], "strategy": "uniform"}}, "'uniform'",
              "'snr'"),
             ("the number of groups in 'grouping'", {"grouping": three, "fractions": [1.0, 0.7, 0.4],
                                                     "ranks": [1, 2, 3], "sensitivity": None}, 3, 2),
             ("'k'", {"k": 0.7}, 0.7, 0.4),
             ("'ordering'", {"ordering": "snr-low-hard"}, "'snr-low-hard'", "'measured'"),
             ("'mean_budget'", {"mean_budget": 0.5}, 0.5, None),
             ("'budget_unit'", {"budget_unit": "time"}, "'time'", "'flops'")]
    for key, edit, shown, runs in edits:
        path.write_text(json.dumps({**original, **edit}))
        with pytest.raises(ValueError) as refused:
            Run(run.dir, progress=False).prune()
        assert str(refused.value) == (
            f"{path}: {key} is {shown} but the run's is {runs} (the plan was made for another run, or edited); "
            f"delete {path.parent} and rerun `tdcdiff plan` (then redo the stages after it, which were made for "
            "the old plan)")
        assert not (run.dir / "prune").exists()
    path.write_text(json.dumps(original))  # the plan as made fits its run
    assert Run(run.dir, progress=False).plan().grouping.strategy == "snr"


@pytest.mark.parametrize("images, message", [
    (lambda d: torch.where(torch.arange(d.numel()).view_as(d) == 0, -0.5, (d + 1) * 127.5),  # row 188: one < 0
     r"^training images must be in \[-1, 1\], got values -0.5..255; scale to \[-1, 1\]: x / 127.5 - 1 for pixels "
     r"0..255, or pass data_range=None for a VAE's latents \(no fixed range\)$"),
    (lambda d: d * 3, r"^training images must be in \[-1, 1\], got values -3..3; .* or pass data_range=None"),
])
def test_train_refuses_images_outside_their_range_unless_told_latents(tmp_path, scheduler, tiny_unet, digits, images,
                                                                      message):
    with pytest.raises(ValueError, match=message):
        train(tiny_unet, images(digits.images[:16]), scheduler, TrainConfig(steps=2, **FAST), tmp_path / "t",
              progress=False)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("data_range", [(1, -1), (0, 0), (float("nan"), float("nan")), (float("nan"), 1.0),
                                        (-1, 0, 1), "ab", 5, (None, None), [], (True, 2)])
def test_train_refuses_a_data_range_it_cannot_check_against(tmp_path, scheduler, tiny_unet, digits, data_range):
    # attack 2026-12-07d rows 220-231: NaN trained unchecked, others gave Python's unpacking errors or blamed images
    with pytest.raises(ValueError, match=r"^data_range must be \(low, high\), two finite numbers with low < high "
                                         r"\(e.g. \(-1, 1\)\), or None for a VAE's latents, got "):
        train(tiny_unet, digits.images[:16], scheduler, TrainConfig(steps=2, **FAST), tmp_path / "t", progress=False,
              data_range=data_range)
    assert not (tmp_path / "t").exists()


def test_train_warns_about_images_in_zero_to_one(tmp_path, scheduler, digits):
    """Row 187: images in [0, 1] (torchvision's ToTensor) trained without a word."""
    with pytest.warns(UserWarning, match=r"training images are all >= 0 \(values 0..1\): they look like \[0, 1\] "
                                         r"\(torchvision's ToTensor\), not \[-1, 1\]; scale with x \* 2 - 1"):
        result = train(build_unet(), (digits.images[:16] + 1) / 2, scheduler, TrainConfig(steps=2, **FAST),
                       tmp_path / "t", progress=False)
    assert result.steps == 2


def test_user_warnings_point_at_the_callers_line(tmp_path, scheduler, tiny_unet, digits):
    """Row 291 of attack 2026-12-07d: a training warning was shown at tdcdiff's own line (train/loop.py:141,
    `self.setup()`); each user-facing warning now names the line that called the public function (here, this file)."""
    from diffusers import DDPMScheduler

    from tdcdiff.schedule import check_given_schedule

    config = TrainConfig(steps=2, **{**FAST, "warmup_steps": 2})
    with pytest.warns(UserWarning) as caught:
        train(tiny_unet, (digits.images[:16] + 1) / 2, scheduler, config, tmp_path / "t", progress=False)
    with pytest.warns(UserWarning) as caught_schedule:
        check_given_schedule(DDPMScheduler(num_train_timesteps=100), "a pipeline")
    warned = [(str(w.message).split(" (")[0].split(":")[0], w.filename) for w in [*caught, *caught_schedule]]
    assert warned == [("training images are all >= 0", __file__), (f"training {tmp_path / 't'}", __file__),
                      ("the noise schedule of a pipeline ends at alpha_bar = 0.364 at t=T-1", __file__)]
