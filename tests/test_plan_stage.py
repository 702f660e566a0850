"""Run.plan on a given (untrained) base: budgets no pruning reaches, given fractions, the recorded unit."""

import json

import pytest

from conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def base_dir(tmp_path, tiny_unet):
    tiny_unet.save_pretrained(tmp_path / "unet")
    return tmp_path / "unet"


@pytest.mark.slow
def test_a_mean_budget_below_what_pruning_reaches_is_refused_before_measuring(tmp_path, base_dir, monkeypatch):
    from tdcdiff.prune.fit import smallest_fraction
    from tdcdiff.run import stages as run_module

    monkeypatch.setattr(run_module, "measure_sensitivity", lambda *a, **k: pytest.fail("measured a doomed plan"))
    run_module.Stages(tmp_path / "run", tiny_config(), progress=False, base=str(base_dir)).train_base()
    # The budget lowered after stage 1: the plan checks it again.
    run = run_module.Stages(tmp_path / "run", tiny_config(mean_budget=1e-9), progress=False, base=str(base_dir))
    with pytest.raises(ValueError, match=r"the mean budget \(the smallest group's is at most it\), 1e-09 of the "
                                         r"base's FLOPs, is about 0.03 FLOPs of its 30,007,296: no pruning reaches it; "
                                         r"raise --mean-budget$"):
        run.plan()
    smallest = smallest_fraction(run.base_model(), run.sample_shape)
    assert 0 < smallest < 0.2
    low = run_module.Stages(tmp_path / "run", tiny_config(mean_budget=smallest / 2), progress=False, base=str(base_dir))
    with pytest.raises(ValueError,
                       match=r"the mean budget .* is below the smallest that pruning reaches \(0\.\d+: every "
                                         r"layer at its largest pruning ratio\); raise --mean-budget$"):
        low.plan()
    assert not (tmp_path / "run" / "plan" / "plan.json").exists()


def test_given_fractions_skip_the_trial_pruning_and_the_unit_is_a_plan_setting(tmp_path, base_dir, monkeypatch):
    from tdcdiff.run import stages as run_module

    monkeypatch.setattr(run_module, "measure_sensitivity", lambda *a, **k: pytest.fail("trial pruning ran"))
    run = run_module.Stages(tmp_path / "run", tiny_config(plan_fractions=[0.6, 1.0]), progress=False,
                            base=str(base_dir))
    run.train_base()
    plan = run.plan()
    saved = json.loads((tmp_path / "run" / "plan" / "plan.json").read_text())
    assert saved["fractions"] == [0.6, 1.0] and saved["k"] is None and saved["ordering"] is None
    assert saved["provenance"]["fractions"] == "plan_fractions" and saved["budget_unit"] == "flops"
    assert plan.ranks == [1, 2]
    with pytest.raises(ValueError, match=r"setting 'budget_unit' differs .*\('flops' -> 'time'\) and stage 'plan' "
                                         r"has already run; .*delete .*plan"):
        run_module.Stages(tmp_path / "run", overrides={"budget_unit": "time"}, progress=False)


@pytest.mark.parametrize("unit, header, absent", [("time", r"rank +time +ms @b2$", "MFLOPs"),
                                                  ("flops", r"rank +FLOPs +MFLOPs$", "ms @b")])
def test_the_plan_table_shows_a_time_plan_in_time_only(tmp_path, base_dir, unit, header, absent, counted_time,
                                                       monkeypatch):
    import re

    from typer.testing import CliRunner

    from tdcdiff.cli import app
    from tdcdiff.run import Run

    monkeypatch.setenv("TDCDIFF_CACHE", str(tmp_path / "cache"))  # the latency table is not the user's
    Run(tmp_path / "run", tiny_config(ordering="snr-low-hard"), progress=False, base=str(base_dir)).train_base()
    result = CliRunner().invoke(app, ["plan", "--out", str(tmp_path / "run"), "--budget-unit", unit,
                                      "--latency-batch", "2", "-q"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert re.search(header, lines[0]) and absent not in result.output, result.output
    assert len(lines[1].split()) == 6  # group, timesteps, SNR, rank, the fraction and its one unit


def test_plan_fractions_no_pruning_reaches_are_refused_before_training(tmp_path, base_dir):
    from tdcdiff.run import Run

    message = (r"the smallest plan_fractions, 0.0100 of the base's FLOPs, is below the smallest that pruning reaches "
               r"\(0.0311: every layer at its largest pruning ratio\); raise it")
    with pytest.raises(ValueError, match=message):  # a preset: its architecture is built before stage 1
        Run(tmp_path / "run", tiny_config(plan_fractions=[0.01, 1.0]), progress=False).train_base()
    assert not (tmp_path / "run" / "base").exists() and not (tmp_path / "run" / "config.json").exists()
    # A given model: checked before it is imported or trained further (base_model_steps).
    given = Run(tmp_path / "given", tiny_config(plan_fractions=[0.01, 1.0], base_model_steps=3), progress=False,
                base=str(base_dir))
    with pytest.raises(ValueError, match=message):
        given.train_base()
    assert not (tmp_path / "given" / "base").exists() and not (tmp_path / "given" / "config.json").exists()
    # depth pruning can remove whole layers, below the widths' floor: only a budget of no FLOPs is refused there
    deep = tiny_config(plan_fractions=[0.01, 1.0])
    deep.search.depth = True
    deep_run = Run(tmp_path / "deep", deep, progress=False, base=str(base_dir))
    deep_run.train_base()
    assert deep_run.plan().fractions == [0.01, 1.0]


def _edit_boundaries(path, boundaries, snr_end_0=None):
    """Edit plan.json's grouping boundaries by hand, each group's start, end and size made consistent."""
    saved = json.loads(path.read_text())
    grouping = saved["grouping"]
    grouping["boundaries"] = boundaries
    for group, start, end in zip(grouping["groups"], boundaries, boundaries[1:]):
        group.update(start=start, end=end, size=end - start)
    if snr_end_0 is not None:
        grouping["groups"][0]["snr_db_end"] = snr_end_0
    path.write_text(json.dumps(saved))


@pytest.mark.parametrize("strategy", ["snr", "uniform", "loss"])
def test_a_plan_whose_grouping_boundaries_were_edited_is_refused_by_every_stage(tmp_path, base_dir, strategy):
    """Attack 2026-12-07g row 743: boundaries [0, 500, 1000] with the groups made consistent passed, and the run's
    experts were fine-tuned and bundled on the edited split. The run's grouping is made again and compared."""
    from tdcdiff.run import stages as run_module

    config = tiny_config(plan_fractions=[0.6, 1.0], grouping=strategy)
    run = run_module.Stages(tmp_path / "run", config, progress=False, base=str(base_dir))
    run.train_base()
    made = run.plan().grouping
    path = tmp_path / "run" / "plan" / "plan.json"
    original = path.read_text()
    fix = (f"(the plan was edited); delete {path.parent} and rerun `tdcdiff plan` (then redo the stages after it, "
           "which were made for the old plan)")
    edited = [0, made.boundaries[1] + 7, 1000]
    if strategy == "loss":  # from a measured loss, not measured again: held to the least size T // 4N and the SNR
        _edit_boundaries(path, [0, 100, 1000])
        message = (f"{path}: 'grouping.boundaries' [0, 100, 1000] give group 0 100 timesteps, fewer than the 125 "
                   f"(T // 4N) every loss grouping of the run has {fix}")
    else:
        _edit_boundaries(path, edited)
        message = (f"{path}: 'grouping.boundaries' are {edited} but the run's '{strategy}' grouping of T=1000 into 2 "
                   f"groups gives {made.boundaries} {fix}")
    for stage in ("prune", "finetune", "export_bundle"):  # each reads the plan first, before any work or write
        with pytest.raises(ValueError) as refused:
            getattr(run_module.Stages(tmp_path / "run", progress=False), stage)()
        assert str(refused.value) == message
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")) == \
        ["base", "config.json", "plan"]
    path.write_text(original)
    _edit_boundaries(path, made.boundaries, snr_end_0=12.5)  # the same split, its SNR range edited
    with pytest.raises(ValueError, match=rf"^{path}: group 0 of 'grouping.groups' spans SNR .*\.\.12\.5 dB but the "
                                         rf"run's schedule gives .*\.\.{made.groups[0].snr_db_end} dB at its timesteps "
                                         rf"0\.\.{made.boundaries[1] - 1} \(the plan was edited\)"):
        run_module.Stages(tmp_path / "run", progress=False).plan()
    path.write_text(original)
    assert run_module.Stages(tmp_path / "run", progress=False).plan().grouping == made
