"""Feature distillation in stage 2 (TrainConfig.feature_distill_weight): projections, skipping, compute."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tdcdiff.train import FeatureDistiller, TrainConfig, step_flops, train

FAST = dict(batch_size=32, lr=2e-3, warmup_steps=2, log_every=10, checkpoint_every=20, ema_decay=None)


def narrow_unet():
    """The digits-8 UNet at half the width: what a width-pruned expert looks like (same blocks, fewer channels)."""
    from diffusers import UNet2DModel

    torch.manual_seed(1)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=8,
                       add_attention=False)


@pytest.mark.slow
def test_feature_distillation_learns_and_keeps_the_projections_out_of_the_expert(tmp_path, digits, scheduler,
                                                                                 tiny_unet):
    from tdcdiff.serialization import load_model

    student = narrow_unet()
    shapes = {k: v.shape for k, v in student.state_dict().items()}
    config = TrainConfig(steps=60, feature_distill_weight=0.5, **FAST)
    result = train(student, digits.images, scheduler, config, tmp_path, teacher=tiny_unet, progress=False)

    points = ["down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1", "mid_block"]
    assert result.extra["feature_points"] == points and result.extra["feature_points_skipped"] == []
    assert json.loads((tmp_path / "train.json").read_text())["feature_points"] == points
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["feature_loss"] < 0.7 * log[0]["feature_loss"]
    # The saved expert is the narrow architecture, nothing more; the projections live in the checkpoint only.
    saved = load_file(tmp_path / "final" / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == shapes
    assert {k: v.shape for k, v in load_model(tmp_path / "final").state_dict().items()} == shapes
    projections = load_file(tmp_path / "checkpoint" / "projections.safetensors")
    assert projections["projections.0.weight"].shape == (32, 16, 1, 1)
    assert not any("projection" in name for name, _ in student.named_modules())
    # Compute: the teacher's forward and the projections are counted, on top of the student's 3 x forward.
    plain = step_flops(student, (1, 8, 8), TrainConfig(batch_size=32))
    output_only = step_flops(student, (1, 8, 8), TrainConfig(batch_size=32, distill_weight=0.5), tiny_unet)
    assert result.flops_per_step == step_flops(student, (1, 8, 8), config, tiny_unet) > output_only > plain
    assert result.train_flops == 60 * result.flops_per_step


@pytest.mark.slow
def test_feature_distillation_resumes_with_its_projections(tmp_path, digits, scheduler, tiny_unet):
    config = TrainConfig(steps=30, feature_distill_weight=0.5, **{**FAST, "checkpoint_every": 10})
    straight = train(narrow_unet(), digits.images, scheduler, config, tmp_path / "a", teacher=tiny_unet, progress=False)
    calls = []
    student = narrow_unet()

    def crash(module, args):
        calls.append(1)
        if len(calls) > 16:  # check_finite (2), the probe, the FLOPs count, then one per step
            raise KeyboardInterrupt

    hook = student.register_forward_pre_hook(crash)
    with pytest.raises(KeyboardInterrupt):
        train(student, digits.images, scheduler, config, tmp_path / "b", teacher=tiny_unet, progress=False)
    hook.remove()
    resumed = train(narrow_unet(), digits.images, scheduler, config, tmp_path / "b", teacher=tiny_unet, progress=False)
    assert resumed.resumed_from == 10
    a, b = (load_file(tmp_path / d / "final" / "model.safetensors") for d in "ab")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert resumed.final_loss == straight.final_loss


def test_points_without_matching_positions_are_skipped_without_error(tmp_path, digits, scheduler):
    from models_zoo import TinyDiT

    torch.manual_seed(0)
    teacher = TinyDiT(patch=2, dim=32)  # 16 tokens
    student = TinyDiT(patch=4, dim=16)  # 4 tokens: no block output lines up with the teacher's
    distiller = FeatureDistiller(student, teacher, (1, 8, 8))
    assert distiller.points == [] and distiller.skipped == ["blocks.0", "blocks.1"]
    same_tokens = FeatureDistiller(TinyDiT(patch=2, dim=16), teacher, (1, 8, 8))
    assert same_tokens.points == ["blocks.0", "blocks.1"] and same_tokens.projections[0].weight.shape == (32, 16)

    config = TrainConfig(steps=3, feature_distill_weight=0.5, **FAST)
    result = train(student, digits.images, scheduler, config, tmp_path, labels=digits.labels, teacher=teacher,
                   progress=False)
    assert result.extra["feature_points_skipped"] == ["blocks.0", "blocks.1"]
    # Nothing to match: the teacher never runs, and its forward is not charged.
    assert result.flops_per_step == step_flops(student, (1, 8, 8), TrainConfig(batch_size=32))


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_out_of_range_weight_is_named(weight):
    with pytest.raises(ValueError, match=rf"feature_distill_weight must be in \[0, 1\], got {weight}"):
        TrainConfig(feature_distill_weight=weight).validate()


def test_feature_distillation_needs_a_teacher(tmp_path, digits, scheduler, tiny_unet):
    with pytest.raises(ValueError, match="need a teacher model"):
        train(tiny_unet, digits.images, scheduler, TrainConfig(steps=1, feature_distill_weight=0.5), tmp_path,
              progress=False)


def test_run_settings_take_the_weight_from_text():
    from tdcdiff.run import RunConfig, apply_overrides

    config = apply_overrides(RunConfig(), {"finetune.feature_distill_weight": "0.5"})  # as --set / YAML give it
    assert config.finetune.feature_distill_weight == 0.5 and config.finetune.uses_teacher
    with pytest.raises(ValueError, match="feature_distill_weight must be in"):
        apply_overrides(RunConfig(), {"finetune.feature_distill_weight": 2}).validate()


def test_adm_and_diffusers_dit_blocks_are_points():
    from models_zoo import AdmUNet, diffusers_dit

    adm = FeatureDistiller(AdmUNet(width=16), AdmUNet(width=32), (1, 8, 8))
    assert adm.points == [f"input_blocks.{i}" for i in range(4)] + ["middle_block"] \
        + [f"output_blocks.{i}" for i in range(4)]
    assert adm.projections[0].weight.shape == (32, 16, 1, 1)
    assert FeatureDistiller(diffusers_dit(), diffusers_dit(), (1, 8, 8)).points == ["transformer_blocks.0",
                                                                                    "transformer_blocks.1"]


TWO_PROCESS_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from test_feature_distill import narrow_unet
from tdcdiff.data import load_dataset
from tdcdiff.models import build_unet
from tdcdiff.schedule import make_scheduler
from tdcdiff.train import TrainConfig, train
torch.manual_seed(0)
train(narrow_unet(), load_dataset("digits").images, make_scheduler(1000),
      TrainConfig(steps=4, batch_size=16, warmup_steps=1, checkpoint_every=2, log_every=2, feature_distill_weight=0.5),
      sys.argv[1], teacher=build_unet("digits-8"), progress=False)
"""


@pytest.mark.slow
def test_two_process_run_trains_the_projections_through_ddp(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    with socket.socket() as s:  # torchrun's --master_port 0 hangs: pick a free port ourselves
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), str(script), str(tmp_path / "run"), str(Path(__file__).parent)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "train.json").read_text())
    assert summary["processes"] == 2 and len(summary["feature_points"]) == 5
    assert "feature_loss" in (tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1]
    assert (tmp_path / "run" / "checkpoint" / "projections.safetensors").exists()
