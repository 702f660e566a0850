"""The stages over a run directory, end to end on digits at toy sizes."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from tdcdiff.run import Run


@pytest.mark.slow
def test_run_all_produces_a_cheaper_bundle(finished_run):
    from tdcdiff.bundle import load_bundle

    run, result = finished_run
    bundle = load_bundle(result["bundle"])
    plan = result["plan"]
    timesteps = list(range(999, -1, -1))  # every training step: the timestep-weighted mean
    per_image = bundle.router.trajectory_flops(timesteps) / len(timesteps)
    assert per_image / plan.base_flops == pytest.approx(plan.mean_fraction, rel=0.03)
    assert plan.mean_fraction < 1
    for path in result["samples"]:
        assert path.exists()
    flops = run.training_flops()
    assert flops["stage1"] > 0 and len(flops["stage2_per_group"]) == 2


@pytest.mark.slow
def test_rerun_skips_finished_stages(finished_run):
    run, _ = finished_run
    outputs = [run.dir / "base/final/model.safetensors", run.dir / "plan/plan.json", run.dir / "bundle/manifest.json",
               *run.dir.glob("prune/group_*/model.safetensors"),
               *run.dir.glob("finetune/group_*/final/model.safetensors")]
    before = {path: path.stat().st_mtime_ns for path in outputs}
    again = Run(run.dir, tiny_config(), progress=False).run_all()
    assert {path: path.stat().st_mtime_ns for path in outputs} == before
    assert again["bundle"] == run.dir / "bundle"


@pytest.mark.slow
def test_changed_setting_of_a_finished_stage_is_refused(finished_run):
    run, _ = finished_run
    with pytest.raises(ValueError,
                       match=r"setting 'k' differs .* delete .*plan .*prune .*finetune .*bundle to redo it"):
        Run(run.dir, overrides={"k": 0.9})
    # a setting of a stage not run yet may change (sampling happens on demand)
    assert Run(run.dir, overrides={"num_samples": 4}).config.num_samples == 4


@pytest.mark.slow
def test_group_runs_are_independent(finished_run, tmp_path):
    """Fine-tuning groups one at a time in separate runs gives what the all-groups run gave."""
    import shutil

    run, _ = finished_run
    other = tmp_path / "split"
    shutil.copytree(run.dir, other, ignore=shutil.ignore_patterns("finetune", "bundle", "samples"))
    for group in (1, 0):
        Run(other, progress=False).finetune(group=group)
    for group in (0, 1):
        a = load_file(run.dir / "finetune" / f"group_{group}" / "final" / "model.safetensors")
        b = load_file(other / "finetune" / f"group_{group}" / "final" / "model.safetensors")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="--group must be between 0 and 1"):
        Run(other, progress=False).finetune(group=2)


@pytest.mark.slow
def test_sample_command_takes_the_values_given(finished_run, tmp_path):
    """--steps / --num / --seed are used as given (never replaced by defaults); unset, the base samples with the
    run's sampler and steps (tiny_config: ddim, 4)."""
    from typer.testing import CliRunner

    from tdcdiff.cli import app

    run, result = finished_run
    given = CliRunner().invoke(app, ["sample", "--bundle", str(result["bundle"]), "--steps", "3", "--num", "4",
                                     "--seed", "0", "--output", str(tmp_path / "tdc.png"), "-q"])
    assert given.exit_code == 0 and "(4 images, ddim 3 steps (trailing spacing), seed 0," in given.output, given.output
    default = CliRunner().invoke(app, ["sample", "--out", str(run.dir), "--num", "2", "--output",
                                       str(tmp_path / "base.png"), "-q"])
    assert default.exit_code == 0 and "(2 images, ddim 4 steps (trailing spacing), seed 0;" in default.output, \
        default.output
    assert (tmp_path / "tdc.png").is_file() and (tmp_path / "base.png").is_file()
