"""bench/benchmark.py --quick: the three arms at equal training compute, end to end in a subprocess."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# Forward time counted from FLOPs (tdcdiff.latency's counted clock): time budgets and time ratios are the same on
# any machine, however busy.
COUNTED_TIME = {"TDCDIFF_CLOCK": "flops"}


def bench(*args, cache: Path) -> subprocess.CompletedProcess:
    # No timeout: on a loaded machine --quick can take many minutes, and a slow machine is not a failure.
    env = {**os.environ, "TDCDIFF_CACHE": str(cache), **COUNTED_TIME}
    return subprocess.run([sys.executable, str(REPO / "bench" / "benchmark.py"), "--data", "digits", "--quick",
                           "--quiet", "--seeds", "0", *map(str, args)],
                          capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    out = root / "bench"
    done = bench("--out", out, "--set", "k=0.6", cache=root / "cache")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done, root / "cache"


@pytest.mark.slow
def test_quick_benchmark_on_digits(quick_bench):
    out, done, _ = quick_bench
    results = json.loads((out / "results.json").read_text())
    assert results["bench"]["run_settings"]["k"] == 0.6
    names = [m["name"] for m in results["models"]]
    assert names == ["single model", "uniform-pruned", "TDC"]
    compute = {m["name"]: m["train_flops"] for m in results["models"]}
    for name in names:
        assert compute[name] == pytest.approx(compute["TDC"], rel=0.03), compute
    flops = {m["name"]: m["sampling_flops"]["ratio"] for m in results["models"]}
    assert flops["TDC"] < 1 and flops["uniform-pruned"] < 1
    assert "matched on FLOPs to TDC's timestep-weighted mean" in results["models"][1]["notes"]
    assert (out / "report.html").exists() and (out / "seed_0" / "tdc" / "bundle" / "manifest.json").exists()
    assert "single model" in done.stdout and "TDC vs single model" in done.stdout
    assert "held-out denoising loss" in done.stdout and "held-out bits/dim bound" in done.stdout
    for model in results["models"]:
        assert list(model["held_out_loss"]) == ["all", "group 0", "group 1"]
        assert list(model["held_out_bpd"]["groups"]) == ["group 0", "group 1"]


@pytest.mark.slow
def test_ablation_reuses_the_stage1_base(quick_bench, tmp_path):
    source, _, cache = quick_bench
    out = tmp_path / "ablation"
    # Also the speed arms: time budgets scaled to a mean of 0.8, the uniform arm matched on measured time.
    done = bench("--out", out, "--set", "k=0.9", "--base-from", source, "--swap-experts", "--budget-unit", "time",
                 "--mean-budget", "0.8", cache=cache)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    base = "seed_0/tdc/base/final/model.safetensors"
    assert (out / base).read_bytes() == (source / base).read_bytes()
    # Not retrained: the copied log is the source's, byte for byte.
    assert (out / "seed_0/tdc/base/log.jsonl").read_bytes() == (source / "seed_0/tdc/base/log.jsonl").read_bytes()
    plans = [json.loads((d / "seed_0/tdc/plan/plan.json").read_text()) for d in (source, out)]
    assert plans[0]["fractions"] != plans[1]["fractions"]
    results = json.loads((out / "results.json").read_text())
    assert results["bench"]["base_from"] == str(source)
    assert plans[1]["mean_budget"] == 0.8 and plans[1]["mean_fraction"] == pytest.approx(0.8)
    summaries = [json.loads((out / f"seed_0/tdc/prune/summary_{g}.json").read_text()) for g in (0, 1)]
    assert all(s["budget_unit"] == "time" and s["time_corrections"] for s in summaries)
    uniform = next(m for m in results["models"] if m["name"] == "uniform-pruned")
    assert "matched on measured forward time at batch 8 to TDC's sampling-step-weighted mean" in uniform["notes"]
    # --swap-experts: TDC with one group's expert replaced by the single model, per group
    models = {m["name"]: m for m in results["models"]}
    assert list(models)[3:] == ["TDC, single model at group 0", "TDC, single model at group 1"]
    swapped = [models[f"TDC, single model at group {g}"]["sampling_flops"]["ratio"] for g in (0, 1)]
    tdc = models["TDC"]["sampling_flops"]["ratio"]
    assert all(tdc <= f <= 1.0 for f in swapped) and max(swapped) > tdc  # the hardest group is full-size already


@pytest.mark.slow
def test_a_seed_evaluated_before_is_read_back_even_from_a_moved_folder(quick_bench, tmp_path):
    source, _, cache = quick_bench
    out = tmp_path / "moved"
    shutil.copytree(source, out)
    done = bench("--out", out, "--set", "k=0.6", cache=cache)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "evaluated before with these settings and weights" in done.stdout and "evaluating" not in done.stdout
    before, after = (json.loads((d / "results.json").read_text()) for d in (source, out))
    assert [m["fid"] for m in after["models"]] == [m["fid"] for m in before["models"]]
    assert all((out / m["sample_grid"]).is_file() for m in after["models"])


def test_an_earlier_evaluation_counts_only_for_the_same_settings_weights_and_arms(tmp_path, monkeypatch):
    benchmark = load_benchmark(monkeypatch)
    from tdcdiff.evaluate import FORMAT, ModelEntry

    seed_dir = Path("seed_0")  # relative, as a relative --out gives
    monkeypatch.chdir(tmp_path)
    (seed_dir / "grids").mkdir(parents=True)
    evaluation = {"format": FORMAT, "models": [{"name": "TDC", "notes": "4 groups", "train_flops": 10, "fid": 1.5,
                                                "sample_grid": str(seed_dir / "grids" / "samples_tdc.png")}]}
    entries = [ModelEntry("TDC", None, 10, notes="4 groups")]
    settings, weights = benchmark.call_settings(["--data", "digits", "--seeds", "0"], ("out", "seeds")), {"tdc": "a"}
    benchmark.save_evaluation(seed_dir, settings, weights, evaluation)

    moved = tmp_path / "elsewhere" / "seed_0"
    shutil.move(seed_dir, moved)
    read = benchmark.earlier_evaluation(moved, settings, weights, entries)
    assert read["models"][0]["fid"] == 1.5 and read["models"][0]["sample_grid"] == str(moved / "grids/samples_tdc.png")
    other = benchmark.call_settings(["--data", "digits", "--seeds", "0", "--fid-samples", "64"], ("out", "seeds"))
    assert benchmark.earlier_evaluation(moved, other, weights, entries) is None
    assert benchmark.earlier_evaluation(moved, settings, {"tdc": "b"}, entries) is None  # an arm trained again
    renamed = [ModelEntry("TDC (paper form)", None, 10, notes="4 groups")]  # the benchmark's code changed
    assert benchmark.earlier_evaluation(moved, settings, weights, renamed) is None
    saved = (moved / benchmark.EVALUATION).read_text()
    edited = [saved.replace('"grids/samples_tdc.png"', '"../../outside.png"'), "[]", '{"format": null}',
              saved.replace('"models"', '"other"'), '{"format": "tdcdiff-bench-seed/1", "settin']  # the last: a crash
    for text in edited:
        (moved / benchmark.EVALUATION).write_text(text)
        assert benchmark.earlier_evaluation(moved, settings, weights, entries) is None, text


@pytest.mark.slow
def test_base_from_refuses_other_stage1_settings_or_missing_seeds_before_any_work(quick_bench, tmp_path):
    source, _, cache = quick_bench
    for args, problem in ((["--set", "base.steps=31"], "other stage-1 settings (base:"),
                          (["--seeds", "0", "1"], "no finished stage-1 base at")):
        out = tmp_path / "ablation"
        done = bench("--out", out, "--base-from", source, *args, cache=cache)
        assert done.returncode != 0
        assert "--base-from" in done.stderr and problem in done.stderr and "Traceback" not in done.stderr
        assert not (out / "seed_0").exists()  # seed 1's problem stopped the run before seed 0 started


def load_benchmark(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark", REPO / "bench" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "benchmark", benchmark)  # dataclasses look their module up there
    spec.loader.exec_module(benchmark)
    return benchmark


def test_base_from_names_an_unreadable_config(tmp_path, monkeypatch):
    benchmark = load_benchmark(monkeypatch)
    from tdcdiff.run import RunConfig
    from tdcdiff.train import FINAL_DIR

    source = tmp_path / "seed_0" / "tdc"
    (source / "base" / FINAL_DIR).mkdir(parents=True)
    (source / "config.json").write_text("{not json")
    problem = benchmark.base_source_problem(source, RunConfig())
    assert "config.json is unreadable (JSONDecodeError" in problem


def test_tdc_time_is_its_experts_measured_time_weighted_by_the_sampling_steps_they_take(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from tdcdiff.budget import make_plan
    from tdcdiff.grouping import make_groups
    from tdcdiff.run import RunConfig
    from tdcdiff.schedule import make_scheduler

    benchmark = load_benchmark(monkeypatch)
    scheduler = make_scheduler(1000)
    plan = make_plan(make_groups("uniform", 2, scheduler), k=0.5, ordering="snr-low-hard", base_flops=1,
                     sample_shape=(1, 8, 8))
    (tmp_path / "prune").mkdir()
    for g, ratio in enumerate((0.4, 0.8)):
        (tmp_path / "prune" / f"summary_{g}.json").write_text(json.dumps({"time_ratio": ratio}))
    # DDIM-3 ("trailing") visits t = 999, 666, 332: one step in group 0 (t < 500), two in group 1.
    run = SimpleNamespace(config=RunConfig(sampler="ddim", sample_steps=3), scheduler=scheduler, dir=tmp_path)
    assert benchmark.tdc_time_ratio(run, plan) == pytest.approx((0.4 + 2 * 0.8) / 3)
    run.config.sample_steps = 4  # 999, 749, 499, 249: two steps each
    assert benchmark.tdc_time_ratio(run, plan) == pytest.approx(0.6)


@pytest.mark.slow
@pytest.mark.parametrize("flag, value, message",
                         [("--mean-budget", "2", "mean_budget (--mean-budget) must be in (0, 1]"),
                                                  ("--latency-batch", "-1", "latency_batch must be >= 1, got -1")])
def test_bad_settings_are_one_line_before_any_work(tmp_path, flag, value, message):
    done = bench("--out", tmp_path / "b", flag, value, cache=tmp_path / "cache")
    assert done.returncode == 2 and done.stderr.startswith("error: ") and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


@pytest.mark.parametrize("script", ["benchmark.py", "recipes.py"])
def test_set_settings_are_read_as_a_config_file_reads_them(script, capsys, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", REPO / "bench" / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    args = module.parse_args(["--set", "k=0.6", "--set", "base.steps=31", "--set", "sampler=ddpm", "--set", "k=0.7"])
    assert args.overrides == {"k": 0.7, "base.steps": 31, "sampler": "ddpm"}  # YAML scalars; the later k wins
    for item in ("k", "=0.5"):
        with pytest.raises(SystemExit):
            module.parse_args(["--set", item])
        assert f"--set takes KEY=VALUE, got {item!r}" in capsys.readouterr().err

@pytest.mark.slow
def test_agreement_orders_each_pair_of_a_run_like_its_fid(quick_bench, tmp_path):
    out, _, _ = quick_bench
    done = subprocess.run([sys.executable, str(REPO / "bench" / "agreement.py"), str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    models = json.loads((out / "results.json").read_text())["per_run"][0]["models"]
    fid = [m["fid"]["per_seed"][0]["fid"] for m in models]
    loss = [m["held_out_loss"]["all"] for m in models]
    pairs = [(0, 1), (0, 2), (1, 2)]
    agree = sum((loss[a] < loss[b]) == (fid[a] < fid[b]) for a, b in pairs)
    assert "within-run pairs (same base), ordered like FID: 3 pairs" in done.stdout
    assert f"held-out loss  {agree} of 3" in done.stdout
    for m, f in zip(models, fid):
        assert f"{m['name']:<22} {f:>8.3f}" in done.stdout

    missing = subprocess.run([sys.executable, str(REPO / "bench" / "agreement.py"), str(tmp_path)],
                             capture_output=True, text=True)
    assert missing.returncode == 2
    assert "results.json not found" in missing.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_frontier_runs_each_budget_once_and_pairs_every_gap_over_the_seeds(quick_bench, tmp_path):
    source, _, cache = quick_bench
    out = tmp_path / "frontier"
    command = [sys.executable, str(REPO / "bench" / "frontier.py"), "--quick", "--seeds", "0", "--budgets", "0.8",
               "--base-from", str(source), "--out", str(out), "--", "--quiet"]
    env = {**os.environ, "TDCDIFF_CACHE": str(cache), **COUNTED_TIME}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "frontier.json").read_text())
    assert [r["arm"] for r in summary["rows"]] == ["uniform-pruned", "TDC"]
    assert (out / "frontier.png").stat().st_size > 0 and "(one seed)" in done.stdout
    again = subprocess.run(command, capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "== time budget" not in again.stdout  # finished budgets are read, not rerun

    # Paired over seeds: three seeds made from the measured one, TDC's FID 1.0 above the single model's in each
    # (the margin given: the one measured at this size depends on the few real images it has).
    sys.path.insert(0, str(REPO / "bench"))
    import frontier

    results = json.loads((out / "time-0.8" / "results.json").read_text())
    runs = []
    for shift in (0.0, 0.3, 0.7):
        run = json.loads(json.dumps(results["per_run"][0]))
        models = {m["name"]: m for m in run["models"]}
        models["single model"]["fid"]["per_seed"][0]["fid"] = 5 + shift
        models["TDC"]["fid"]["per_seed"][0]["fid"] = 6 + shift
        runs.append(run)
    rows = frontier.summarise({**results, "per_run": runs}, 0.8, margin=0.5)  # a gap of 1.0 every seed: beyond it
    tdc = next(r for r in rows if r["arm"] == "TDC")
    assert tdc["vs_single"]["FID"]["mean"] == pytest.approx(1.0) and tdc["vs_single"]["FID"]["verdict"] == "inferior"
    assert tdc["vs_single"]["held-out loss"]["sd"] == pytest.approx(0.0, abs=1e-12)
    assert "vs_uniform" in tdc and "vs_uniform" not in rows[0]


def test_frontier_refuses_a_budget_outside_zero_one_before_any_work(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "frontier.py"), "--budgets", "0.6", "1.5",
                           "--out", str(tmp_path / "f")], capture_output=True, text=True)
    assert done.returncode == 2 and not (tmp_path / "f").exists()
    assert "--budgets 1.5 is not in (0, 1]" in done.stderr.strip().splitlines()[-1]


def load_script(name: str, monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(REPO / "bench"))  # frontier imports benchmark beside it
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def tune_results(fids: dict, *, old: bool = False, data: str = "digits") -> dict:
    """A tune results.json: per model (FID per seed, loss, bits/dim); old: before --screening (bits/dim ranked)."""
    if old:
        measure = {"name": "held-out bits/dim bound", "second": {"name": "held-out denoising loss"}}
        rows = [{"name": n, "fid": f, "screening": bpd, "held_out_loss": loss} for n, (f, loss, bpd) in fids.items()]
    else:
        measure = {"key": "loss", "name": "held-out denoising loss", "second": {"key": "bpd"}}
        rows = [{"name": n, "fid": f, "screening": loss, "second": bpd} for n, (f, loss, bpd) in fids.items()]
    # /1 both before and just after --screening (the rows tell them apart), /2 since
    return {"format": f"tdcdiff-tune/{1 if old else 2}", "screening_measure": measure,
            "fid_protocol": {"reference": {"name": data}},
            "rows": rows}


def write_output(folder: Path, results) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(results if isinstance(results, str) else json.dumps(results))
    return folder


MODELS = {"base": ([1.0, 1.2], 0.05, 4.0), "a": ([2.0, 2.2], 0.06, 4.4), "b": ([3.0, 3.2], 0.07, 4.2)}


def test_agreement_reads_a_tune_directory_from_before_screening_by_the_loss(tmp_path, monkeypatch, capsys):
    agreement = load_script("agreement", monkeypatch)
    old = write_output(tmp_path / "old", tune_results(MODELS, old=True))
    assert agreement.main([str(old)]) == 0
    out = capsys.readouterr().out
    assert "held-out loss:  rho +1.00" in out and "bits/dim:       rho +0.50" in out  # loss and bits/dim not swapped
    assert "held-out loss  3 of 3" in out and "bits/dim       2 of 3" in out


def test_agreement_counts_a_model_in_two_outputs_once_and_ranks_one_kind_of_loss(tmp_path, monkeypatch, capsys):
    agreement = load_script("agreement", monkeypatch)
    # The same three models rescreened (tune's per-image loss differs from the old all-t loss), plus one new one.
    old = write_output(tmp_path / "old", tune_results(MODELS, old=True))
    rescreened = {n: (f, loss * 1.03, bpd) for n, (f, loss, bpd) in MODELS.items()}
    new = write_output(tmp_path / "new", tune_results({**rescreened, "c": ([0.5, 0.7], 0.04, 3.9)}))
    assert agreement.main([str(old), str(new)]) == 0
    out = capsys.readouterr().out
    assert "(3 models found in more than one output, counted once)" in out
    assert "bits/dim:       rho +0.80  (p 0.2, 4 models)" in out
    # the old directory's loss is kept for its models; the new one's loss is another kind: not ranked together
    assert "held-out loss (mean over all t): rho +1.00" in out
    assert "held-out loss (per-image mean over the measured t): 1 models, too few" in out
    assert "within-run pairs (same base), ordered like FID: 6 pairs" in out  # 3 pairs + c with each, once


@pytest.mark.parametrize("text, message", [
    ("", "is not complete JSON (Expecting value"),
    ('{"format": "tdcdiff-tune/1", "rows": [', "is not complete JSON"),
    ('{"format": "tdcdiff-frontier/1"}', "is neither a bench/benchmark.py nor a tdcdiff tune results.json"),
    ('{"format": "tdcdiff-tune/1", "rows": []}', "lacks 'screening_measure' (written by another version?)"),
])
def test_agreement_names_a_results_file_it_cannot_read(tmp_path, monkeypatch, capsys, text, message):
    agreement = load_script("agreement", monkeypatch)
    folder = write_output(tmp_path / "out", text)
    with pytest.raises(SystemExit) as stop:
        agreement.main([str(folder)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and str(folder / "results.json") in err and message in err, err


def test_agreement_refuses_an_output_given_twice_and_says_when_a_data_set_has_too_few_models(tmp_path, monkeypatch,
                                                                                              capsys):
    agreement = load_script("agreement", monkeypatch)
    digits = write_output(tmp_path / "digits", tune_results(MODELS))
    with pytest.raises(SystemExit):
        agreement.main([str(digits), str(tmp_path / "." / "digits")])
    assert "digits is given twice" in capsys.readouterr().err
    mnist = write_output(tmp_path / "mnist", tune_results({"base": ([1.0, 2.0], 0.1, 2.0)}, data="mnist"))
    assert agreement.main([str(digits), str(mnist)]) == 0
    out = capsys.readouterr().out
    assert "rank correlation with FID, mnist:\n  held-out loss: 1 models, too few" in out and "nan" not in out


def frontier_results(call: list[str], tdc_fids: list[float], *, tdc_name: str = "TDC", arms=None) -> dict:
    """A benchmark results.json as `call` would leave it: per seed the single model at FID 5 + i, uniform at
    5.5 + i, TDC at tdc_fids[i]; losses and bits/dim rise with FID."""
    names = arms or ["single model", "uniform-pruned", tdc_name]
    base = {"single model": 5.0, "uniform-pruned": 5.5}
    per_run = []
    for i, tdc in enumerate(tdc_fids):
        fids = {n: base.get(n, tdc) + (i if n in base else 0) for n in names}
        per_run.append({"label": f"seed {i}", "models": [
            {"name": n, "fid": {"per_seed": [{"fid": f}]}, "held_out_loss": {"all": f / 100},
             "held_out_bpd": {"total": {"mean": f / 2}}} for n, f in fids.items()]})
    ratio = {"single model": 1.0, "uniform-pruned": 0.6, tdc_name: 0.55}
    models = [{"name": n, "time": {"batch_1": {"ratio": ratio[n]}, "batch_8": {"ratio": ratio[n]}},
               "sampling_flops": {"ratio": ratio[n]}} for n in names]
    return {"format": "tdcdiff-evaluation/1", "per_run": per_run, "models": models,
            "bench": {"command": " ".join(["python", "bench/benchmark.py", *call])}}


def frontier_call(out: Path, budget: float, *passed: str) -> list[str]:
    return ["--data", "digits", "--seeds", "0", "1", "2", "--budget-unit", "time", "--mean-budget", str(budget),
            "--latency-batch", "8", "--out", str(out / f"time-{budget:g}"), *passed]


def test_frontier_reads_finished_budgets_and_pairs_tdc_one_stage_too(tmp_path, monkeypatch, capsys):
    frontier = load_script("frontier", monkeypatch)
    out = tmp_path / "f"
    write_output(out / "time-0.6", frontier_results(frontier_call(out, 0.6, "--one-stage"), [6.0, 7.1, 8.2],
                                                    tdc_name="TDC (one-stage)"))
    write_output(out / "time-0.4", frontier_results(frontier_call(out, 0.4, "--one-stage"), [6.0, 7.1, 8.2],
                                                    tdc_name="TDC (one-stage)"))
    monkeypatch.setattr(frontier.benchmark, "main", lambda argv: pytest.fail(f"reran a finished budget: {argv}"))
    assert frontier.main(["--seeds", "0", "1", "2", "--budgets", "0.6", "0.4", "--latency-batch", "8",
                          "--out", str(out), "--", "--one-stage"]) == 0
    printed = capsys.readouterr().out
    assert "time b1/b8" in printed and "held-out loss: at 0.4, 0.6" in printed
    rows = json.loads((out / "frontier.json").read_text())["rows"]
    tdc = next(r for r in rows if r["budget"] == 0.6 and r["arm"] == "TDC")
    assert tdc["vs_single"]["FID"]["mean"] == pytest.approx(1.1) and tdc["vs_single"]["FID"]["verdict"] == "inferior"
    assert tdc["vs_uniform"]["FID"]["diffs"] == pytest.approx([0.5, 0.6, 0.7])  # TDC - uniform, seed by seed


def test_frontier_runs_a_budget_again_when_its_results_came_from_another_command(tmp_path, monkeypatch):
    frontier = load_script("frontier", monkeypatch)
    out = tmp_path / "f"
    write_output(out / "time-0.6", frontier_results(frontier_call(out, 0.6, "--fid-samples", "64"), [6.0, 7.0, 8.0]))
    calls = []

    def run(argv):
        calls.append(argv)
        (out / "time-0.6" / "results.json").write_text(json.dumps(frontier_results(argv, [6.0, 7.0, 8.0])))
        return 0

    monkeypatch.setattr(frontier.benchmark, "main", run)
    command = ["--seeds", "0", "1", "2", "--budgets", "0.6", "--latency-batch", "8", "--out", str(out)]
    assert frontier.main(command) == 0 and calls == [frontier_call(out, 0.6)]
    assert frontier.main(command) == 0 and len(calls) == 1  # now finished: read, not rerun


@pytest.mark.parametrize("argv, message", [
    (["--budgets", "0.6", "0.6"], "--budgets 0.6 is given twice: list each budget once"),
    (["--seeds", "0", "0"], "--seeds 0 is given twice: each seed is one independent run, list it once"),
    (["--latency-batch", "0"], "--latency-batch must be >= 1 (a batch size), got 0"),
    (["--", "--mean-budget", "0.3"], "--mean-budget (give the budgets as --budgets) after `--` would override"),
    (["--", "--mean", "0.3"], "--mean-budget (give the budgets as --budgets) after `--` would override"),
    (["--data", "mnist", "--", "--data", "digits", "--budget-unit", "flops"],
     "--data (give it before `--`), --budget-unit (leave it out, the budgets are of time) after `--` would override"),
    (["--", "--out", "elsewhere"], "--out (give it before `--`) after `--` would override"),
])
def test_frontier_refuses_conflicting_or_repeated_options_before_any_work(tmp_path, monkeypatch, capsys, argv,
                                                                         message):
    frontier = load_script("frontier", monkeypatch)
    monkeypatch.setattr(frontier.benchmark, "main", lambda argv: pytest.fail("ran a benchmark"))
    own, passed = (argv[: argv.index("--")], argv[argv.index("--"):]) if "--" in argv else (argv, [])
    with pytest.raises(SystemExit) as stop:
        frontier.main([*own, "--out", str(tmp_path / "f"), *passed])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and message in err, err
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("results, message", [
    ('{"bench": {"command": ', "results.json: not complete JSON (Expecting value"),
    (None, "results.json: no 'uniform-pruned' model in seed 0 (it has ['single model', 'TDC']): delete it"),
])
def test_frontier_names_a_budget_results_file_it_cannot_read(tmp_path, monkeypatch, capsys, results, message):
    frontier = load_script("frontier", monkeypatch)
    out = tmp_path / "f"
    if results is None:
        results = frontier_results(frontier_call(out, 0.6), [6.0, 7.0, 8.0], arms=["single model", "TDC"])
    write_output(out / "time-0.6", results)
    monkeypatch.setattr(frontier.benchmark, "main", lambda argv: pytest.fail("ran a benchmark"))
    with pytest.raises(SystemExit) as stop:
        frontier.main(["--seeds", "0", "1", "2", "--budgets", "0.6", "--latency-batch", "8", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and str(out / "time-0.6") in err and message in err, err


def test_frontier_refuses_a_bad_margin_before_any_work(tmp_path, monkeypatch, capsys):
    frontier = load_script("frontier", monkeypatch)
    monkeypatch.setattr(frontier.benchmark, "main", lambda argv: pytest.fail("ran a benchmark"))
    with pytest.raises(SystemExit) as stop:
        frontier.main(["--margin", "-1", "--out", str(tmp_path / "f")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and "--margin must be a finite number >= 0 (the largest FID loss that counts as " \
                                    "none), got -1.0" in err
    assert not (tmp_path / "f").exists()


def test_frontier_judges_fid_against_the_margin_its_evaluation_states(tmp_path, monkeypatch):
    frontier = load_script("frontier", monkeypatch)
    results = frontier_results(frontier_call(tmp_path, 0.6), [6.0, 7.1, 8.2])  # TDC worse by 1.0-1.2 per seed
    assert frontier.summarise(results, 0.6)[1]["vs_single"]["FID"]["margin"] == 0  # no margin stated: against 0
    results["protocol"] = {"judge": {"margin": 2.0}}
    tdc = frontier.summarise(results, 0.6)[1]
    assert tdc["vs_single"]["FID"]["verdict"] == "non-inferior" and tdc["vs_single"]["FID"]["margin"] == 2.0
    assert tdc["vs_single"]["held-out loss"]["margin"] == 0  # the held-out measures: a difference test
    assert frontier.summarise(results, 0.6, margin=0.5)[1]["vs_single"]["FID"]["verdict"] == "inferior"
    assert frontier.verdict(tdc["vs_single"]["FID"]).startswith("non-inferior +1.1 [") and " m 2 h " in \
        frontier.verdict(tdc["vs_single"]["FID"])


def test_second_judge_needs_a_tune_output_and_judges_every_pair_by_both_networks(tmp_path, monkeypatch, capsys):
    agreement = load_script("agreement", monkeypatch)
    from second_judge import judge_pairs, summary

    digits = write_output(tmp_path / "digits", tune_results(MODELS))  # no tune.json: nothing to sample again
    with pytest.raises(SystemExit) as stop:
        agreement.main([str(digits), "--second-judge", "classifier-96-k5"])
    assert stop.value.code == 2 and "--second-judge samples the models of tdcdiff tune outputs again" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        agreement.main([str(digits), "--second-judge", "classifier-128"])  # the default network judges already
    assert "invalid choice: 'classifier-128'" in capsys.readouterr().err
    default = {"base": [1.0, 1.2, 1.1], "a": [1.05, 1.2, 1.15], "b": [2.0, 2.3, 2.1]}
    second = {"base": [3.0, 3.5, 3.2], "a": [3.1, 3.5, 3.2], "b": [3.2, 3.9, 3.5]}  # another FID unit
    pairs = judge_pairs(default, second, {"default": 0.3, "second": 0.9})
    assert [(p["b"], p["a"]) for p in pairs] == [("a", "base"), ("b", "base"), ("b", "a")]
    verdicts = {(p["b"], p["a"]): (p["default"]["margin"]["verdict"], p["second"]["margin"]["verdict"]) for p in pairs}
    assert verdicts[("a", "base")] == ("non-inferior", "non-inferior")
    assert verdicts[("b", "base")] == ("inferior", "non-inferior")  # the second judge's margin is wider
    lines = summary(pairs)
    assert "verdicts agree, non-inferiority (each judge's margin): 1 of 3 pairs" in lines
    assert any(line.startswith("second judge's power: median half-width") for line in lines)


def test_agreement_pairs_two_arms_only_over_the_seeds_both_have(monkeypatch):
    agreement = load_script("agreement", monkeypatch)

    def model(name, fid):
        return {"name": name, "fid": {"per_seed": [{"fid": fid}]}, "held_out_loss": {"all": fid / 100},
                "held_out_bpd": {"total": {"mean": fid}}}

    results = {"protocol": {"reference": {"name": "digits"}}, "per_run": [
        {"label": "seed 0", "models": [model("A", 1.0), model("C", 9.0)]},
        {"label": "seed 1", "models": [model("A", 2.0), model("B", 3.0), model("C", 9.5)]},
        {"label": "seed 2", "models": [model("B", 4.0), model("C", 10.5)]}]}
    _, arms = agreement.benchmark_points(results, "out")
    pairs = agreement.resolved_pairs(arms, "out")
    # A and B share one seed: no pair (pairing A's seeds 0, 1 with B's 1, 2 would call B worse by 2, "resolved")
    assert {(p["better"], p["worse"]) for p in pairs} == {("A", "C"), ("B", "C")}
    assert next(p for p in pairs if p["better"] == "A")["fid_gap"] == pytest.approx(7.75)  # seeds 0 and 1 only


def test_frontier_reads_a_budget_run_with_quiet_or_another_spelling_of_its_paths(tmp_path, monkeypatch):
    frontier = load_script("frontier", monkeypatch)
    out = tmp_path / "f"
    call = frontier_call(out, 0.6)
    call[call.index("--out") + 1] = str(out / "." / "time-0.6") + "/"
    write_output(out / "time-0.6", frontier_results([*call, "--quiet"], [6.0, 7.1, 8.2]))
    monkeypatch.setattr(frontier.benchmark, "main", lambda argv: pytest.fail(f"reran a finished budget: {argv}"))
    assert frontier.main(["--seeds", "0", "1", "2", "--budgets", "0.6", "--latency-batch", "8", "--out", str(out)]) == 0


def test_agreement_counts_a_resolved_pair_of_a_copied_benchmark_once(tmp_path, monkeypatch, capsys):
    agreement = load_script("agreement", monkeypatch)
    results = frontier_results(["--seeds", "0", "1", "2"], [6.0, 7.1, 8.2])
    results["protocol"] = {"reference": {"name": "digits"}}
    first, copy = (write_output(tmp_path / name, results) for name in ("a", "b"))
    assert agreement.main([str(first), str(copy)]) == 0
    out = capsys.readouterr().out
    assert "(9 models found in more than one output, counted once)" in out
    # single < uniform and single < TDC are resolved (gaps 0.5 and 1.1, 1.0-1.2); uniform < TDC too (0.5-0.7)
    assert "pairs of arms whose FID gap is real (paired rule over seeds, 95%): 3" in out
    assert "within-run pairs (same base), ordered like FID: 9 pairs" in out


def tune_point(name, model, setting, time_ratio, time_1_ratio, verdict=None, mean=0.1):
    gap = None if verdict is None else {"mean": mean, "interval": [mean - 0.3, mean + 0.3], "verdict": verdict}
    return {"name": name, "model": model, "setting": setting, "time_ratio": time_ratio, "time_1_ratio": time_1_ratio,
            "fid_gap": gap}


def test_tune_seeds_splits_each_tune_into_free_and_model_and_pools_the_factors(tmp_path, monkeypatch, capsys):
    tune_seeds = load_script("tune_seeds", monkeypatch)
    outputs = []
    for seed, (prune_64, prune_1) in enumerate([(0.10, 0.18), (0.16, 0.20)]):
        rows = [tune_point("base", "base", "ddim:50", 1.0, 1.0),
                tune_point("base @ dpm:10", "base", "dpm:10", 0.2, 0.25, "non-inferior"),
                tune_point("base @ dpm:6", "base", "dpm:6", 0.12, 0.15, "inferior"),
                tune_point("u", "u", "ddim:50", 0.6, 0.8, "non-inferior"),
                tune_point("u @ dpm:10", "u", "dpm:10", prune_64, prune_1, "non-inferior"),
                tune_point("tdc", "tdc", "ddim:50", 0.5, 0.7, "inferior"),
                tune_point("depth", "depth", "ddim:50", 0.5, 0.7)]
        headline = {"chosen": "u @ dpm:10", "best_free": "base @ dpm:10", "by_batch": {
            b: {"free": 1 / free, "model": free / pruned, "total": 1 / pruned}
            for b, free, pruned in (("1", 0.25, prune_1), ("64", 0.2, prune_64))}}
        outputs.append(write_output(tmp_path / f"t{seed}", {"rows": rows, "headline": headline,
                                                              "choice": {"reason": "the fastest non-inferior"}}))
    assert tune_seeds.main([str(o) for o in outputs]) == 0
    out = capsys.readouterr().out
    assert "batch  64: 10.00x the reference = 5.00x free x 2.00x model" in out
    assert "u                        fastest non-inferior: dpm:10" in out
    assert "over the free setting 2.00x at batch 64, 1.39x at batch 1" in out
    assert "tdc                      no non-inferior point" in out and "depth                    -: no FID" in out
    assert "model  at batch  64: median 1.62x (range 1.25-2.00x, n=2)" in out
    assert "u                        over the free setting at batch 64: median 1.62x" in out
    assert "non-inferior in 2 of 2, >= 1.5x in 1" in out and "tdc                      over the free setting at " \
        "batch 64: never non-inferior; non-inferior in 0 of 2" in out
    unfinished = write_output(tmp_path / "unfinished", {"rows": []})
    with pytest.raises(SystemExit, match="has no headline: finish the tune"):
        tune_seeds.main([str(unfinished)])
