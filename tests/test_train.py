import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tdcdiff.train import TrainConfig, train

FAST = dict(batch_size=32, lr=2e-3, warmup_steps=2, log_every=5, checkpoint_every=5)


@pytest.mark.slow
def test_a_few_steps_lower_the_loss(tmp_path, digits, scheduler, tiny_unet):
    result = train(tiny_unet, digits.images, scheduler, TrainConfig(steps=60, ema_decay=None, **FAST), tmp_path,
                   progress=False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.6 * log[0]["loss"]
    assert len(log[0]["loss_by_t_bucket"]) == 10
    assert result.train_flops == result.flops_per_step * 60 > 0
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, digits, scheduler):
    from tdcdiff.models import build_unet

    config = TrainConfig(steps=12, ema_decay=0.9, **FAST)
    torch.manual_seed(0)
    straight = build_unet("digits-8")
    train(straight, digits.images, scheduler, config, tmp_path / "a", progress=False)

    torch.manual_seed(0)
    crashing = build_unet("digits-8")
    calls = []

    def crash_at_step_8(module, args):
        calls.append(1)
        if len(calls) > 8:  # the first call is the shape check, then one per step
            raise KeyboardInterrupt

    hook = crashing.register_forward_pre_hook(crash_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train(crashing, digits.images, scheduler, config, tmp_path / "b", progress=False)
    hook.remove()
    assert not (tmp_path / "b" / "final").exists()
    torch.manual_seed(123)  # a fresh process would start with other weights: resume must not depend on them
    resumed = build_unet("digits-8")
    result = train(resumed, digits.images, scheduler, config, tmp_path / "b", progress=False)
    assert result.resumed_from == 5
    a, b = (load_file(tmp_path / "a" / "final" / "model.safetensors"),
            load_file(tmp_path / "b" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    steps_logged = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps_logged == [5, 10, 12]


def test_timestep_subset_and_changed_settings(tmp_path, digits, scheduler, tiny_unet):
    subset = torch.arange(0, 100)
    train(tiny_unet, digits.images, scheduler, TrainConfig(steps=5, **FAST), tmp_path, timesteps=subset, progress=False)
    log = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert log["loss_by_t_bucket"][0] is not None and all(v is None for v in log["loss_by_t_bucket"][1:])
    with pytest.raises(ValueError, match="different training settings"):
        train(tiny_unet, digits.images, scheduler, TrainConfig(steps=10, **{**FAST, "lr": 1e-3}), tmp_path,
              timesteps=subset, progress=False)


def test_a_warmup_as_long_as_the_training_is_warned_about(tmp_path, digits, scheduler, tiny_unet):
    config = TrainConfig(steps=4, **{**FAST, "warmup_steps": 8})
    with pytest.warns(UserWarning, match=r"warmup_steps 8 is not below its 4 steps, so the learning rate rises for the "
                                         r"whole run and never reaches lr 0.002 \(it ends at 0.001\)"):
        train(tiny_unet, digits.images, scheduler, config, tmp_path, progress=False)
    # attack 2026-12-07f row 657: at warmup_steps = steps the line said "never reaches lr 0.002 (it ends at 0.002)"
    config = TrainConfig(steps=4, **{**FAST, "warmup_steps": 4})
    assert config.lr_at(3) == config.lr
    with pytest.warns(UserWarning, match=r"warmup_steps 4 is not below its 4 steps, so the learning rate rises for the "
                                         r"whole run and reaches lr 0.002 only at its last step; lower warmup_steps"):
        train(tiny_unet, digits.images, scheduler, config, tmp_path / "equal", progress=False)


def test_nan_images_are_named_before_training(tmp_path, digits, scheduler, tiny_unet):
    images = digits.images.clone()
    images[:3] = float("nan")
    with pytest.raises(ValueError, match="3 of the 1797 training images hold NaN/inf"):
        train(tiny_unet, images, scheduler, TrainConfig(steps=5, **FAST), tmp_path, progress=False)


@pytest.mark.parametrize(
    "change, message",
    [({"steps": 0}, "steps"), ({"lr": 5.0}, "learning rate"), ({"lr": 0}, "learning rate"),
     ({"ema_decay": 1.5}, "ema_decay"), ({"mix_fraction": 2}, "mix_fraction"),
     ({"mixed_precision": "fp8"}, "mixed_precision")],
)
def test_bad_settings_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**change).validate()


TWO_PROCESS_SCRIPT = """
import sys, torch
from tdcdiff.data import load_dataset
from tdcdiff.models import build_unet
from tdcdiff.schedule import make_scheduler
from tdcdiff.train import TrainConfig, train
torch.manual_seed(0)
result = train(build_unet("digits-8"), load_dataset("digits").images, make_scheduler(1000),
               TrainConfig(steps=4, batch_size=16, warmup_steps=1, checkpoint_every=2, log_every=2), sys.argv[1], \
progress=False)
"""


@pytest.mark.slow
def test_two_process_accelerate_run(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # torchrun's --master_port 0 hangs: pick a free port ourselves
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), str(script), str(tmp_path / "run")],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "train.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("given", ["images", "labels", "timesteps"])
def test_training_inputs_on_the_meta_device_are_one_error_before_any_write(given, tmp_path, scheduler):
    # attack 2026-12-07f row 596: images on the meta device gave torch's "Tensor.item() cannot be called on meta
    # tensors" (RuntimeError)
    from diffusers import UNet2DModel

    from tdcdiff.models import build_unet

    config = {k: v for k, v in build_unet("digits-8").config.items() if not k.startswith("_")}
    model = UNet2DModel.from_config({**config, "num_class_embeds": 3} if given == "labels" else config)
    inputs = {"images": torch.zeros(4, 1, 8, 8), "labels": torch.zeros(4, dtype=torch.long) if given == "labels"
              else None, "timesteps": torch.arange(10)}
    inputs[given] = inputs[given].to("meta")
    name = "training images" if given == "images" else given
    with pytest.raises(ValueError, match=rf"^{name} are on device 'meta', which holds no data: give them on the CPU "
                                         r"or the training device \(each batch is moved there\)$"):
        train(model, inputs["images"], scheduler, TrainConfig(steps=1, batch_size=2), tmp_path / "t",
              labels=inputs["labels"], timesteps=inputs["timesteps"], progress=False)
    assert not (tmp_path / "t").exists()


def test_images_of_another_size_than_the_model_name_both_sizes_and_the_fix(tmp_path, scheduler, tiny_unet):
    # attack 2026-12-07f row 593: a training call was told to "sample at (1, 8, 8)"
    with pytest.raises(ValueError, match=r"^the training images are 16x16 but the model was built for 8x8 inputs "
                                         r"\(its config's sample_size\); resize the images to 8x8, or build the model "
                                         r"with sample_size=16$"):
        train(tiny_unet, torch.zeros(4, 1, 16, 16), scheduler, TrainConfig(steps=1, batch_size=2), tmp_path / "t",
              progress=False)
    assert not (tmp_path / "t").exists()


def test_an_out_dir_that_is_empty_or_not_a_folder_is_one_error_before_any_write(tmp_path, monkeypatch, scheduler,
                                                                                  tiny_unet):
    # attack 2026-12-07f rows 599 (out_dir "" trained into the current folder) and 598 (a file: FileExistsError)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    monkeypatch.chdir(tmp_path)
    for out_dir, message in [
        ("", "^out_dir is empty; give a folder$"), (" ", "^out_dir is empty; give a folder$"),
        (tmp_path / "afile", f"^out_dir {tmp_path}/afile is a file, not a folder; choose another out_dir$"),
        (tmp_path / "afile" / "sub", f"^out_dir {tmp_path}/afile/sub cannot be created: {tmp_path}/afile is a file; "
                                     "choose another out_dir$"),
        (tmp_path / "dangling", rf"^out_dir {tmp_path}/dangling is a symlink to {tmp_path}/nowhere, which does not "
                                r"exist: nothing can be written through it; fix or remove the link, or choose another "
                                r"out_dir$"),
    ]:
        with pytest.raises(ValueError, match=message):
            train(tiny_unet, torch.zeros(4, 1, 8, 8), scheduler, TrainConfig(steps=1, batch_size=2), out_dir,
                  progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "dangling"]


def test_conditions_an_unconditional_model_cannot_take_are_refused(tmp_path, scheduler, tiny_unet):
    # attack 2026-12-07f row 597: labels for an unconditional model were ignored with no word (sample() refuses them)
    for given, message in [
        ({"labels": torch.zeros(4, dtype=torch.long)}, r"^labels were given but the model has no class embedding "
                                                       r"\(nor cross-attention\), so it would train without them; drop "
                                                       r"them, or train a class-conditional model"),
        ({"null_text": torch.zeros(77, 8)}, r"^null_text was given but the model is not text-conditional \(it has no "
                                            r"cross-attention\); drop it$"),
    ]:
        with pytest.raises(ValueError, match=message):
            train(tiny_unet, torch.zeros(4, 1, 8, 8), scheduler, TrainConfig(steps=1, batch_size=2), tmp_path / "t",
                  progress=False, **given)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("images, data_range, message", [
    (torch.rand(4, 1, 8, 8) * 2 - 1, (0.0, 1.0), r"^training images must be in \[0, 1\], got values .*; scale to "
                                                 r"\[0, 1\]: x / 255 for pixels 0..255, or pass data_range=None"),
    (torch.full((4, 1, 8, 8), 200.0), (0, 1), r"^training images must be in \[0, 1\], got values 200..200; scale to "
                                              r"\[0, 1\]: x / 255 \(pixels 0..255\), or pass data_range=None"),
    (torch.zeros(4, 1, 8, 8, dtype=torch.uint8), (0, 1), r"^training images must be floating point in \[0, 1\], got "
                                                         r"torch.uint8; scale to \[0, 1\]: x / 255$"),
    (torch.full((4, 1, 8, 8), 200.0), (-2, 2), r"scale to \[-2, 2\]: x / 63.75 - 2 \(pixels 0..255\)"),
])
def test_the_scaling_a_range_error_gives_maps_pixels_onto_that_range(images, data_range, message, tmp_path, scheduler,
                                                                      tiny_unet):
    # attack 2026-12-07f row 594: data_range=(0, 1) was told "scale to [0, 1]: x / 127.5 - 1", which gives [-1, 1]
    with pytest.raises(ValueError, match=message):
        train(tiny_unet, images, scheduler, TrainConfig(steps=1, batch_size=2), tmp_path / "t", data_range=data_range,
              progress=False)


@pytest.mark.parametrize("top, data_range", [(255, (-1, 1)), (255, (0, 1)), (1, (-1, 1)), (255, (-2, 2)), (1, (0, 1)),
                                             (255, (0.5, 3))])
def test_the_scaling_formula_maps_its_input_range_onto_the_data_range(top, data_range):
    from tdcdiff.train.loop import _scaling

    formula = _scaling(top, *data_range)
    assert [eval(formula, {"x": x}) for x in (0, top)] == pytest.approx(list(data_range))
