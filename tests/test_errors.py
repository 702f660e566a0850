"""The bad-input catalogue (docs/errors.md): every entry fails fast with a message naming the problem."""

import errno
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from tdcdiff.cli import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"

CLI_CASES = [
    ("k zero", ["run", "--k", "0"], r"k must be in \(0, 1\]"),
    ("k above one", ["run", "--k", "1.5"], r"k must be in \(0, 1\]"),
    ("mean budget above one", ["run", "--mean-budget", "1.5"],
     r"mean_budget \(--mean-budget\) must be in \(0, 1\], .* got 1.5; e.g. 0.6, or leave it unset"),
    ("mean budget that rounds to no FLOPs", ["run", "--mean-budget", "1e-9"],
     r"the mean budget \(the smallest group's is at most it\), 1e-09 of the base's FLOPs, is about 0.03 FLOPs of "
     r"its 30,007,296: no pruning reaches it; raise --mean-budget$"),
    ("mean budget below the smallest pruning", ["run", "--mean-budget", "0.02"],
     r"the mean budget .*, 0.0200 of the base's FLOPs, is below the smallest that pruning reaches \(0.0311: every "
     r"layer at its largest pruning ratio\); raise --mean-budget$"),
    ("formula budget below the smallest pruning", ["run", "--groups", "50", "--k", "0.001"],
     r"the easiest group's budget \(1/N \+ \(N-1\)/N k\), 0.0210 of the base's FLOPs, is below the smallest"),
    ("no groups", ["run", "--groups", "0"], r"--groups must be >= 1 \(N, the number of timestep groups\), got 0"),
    ("tune names the flag too", ["tune", "--base-steps", "0"], r"error: --base-steps must be >= 1, got 0"),
    ("tune names a stage-2 flag", ["tune", "--finetune-lr", "5"],
     r"error: --finetune-lr \(the peak learning rate\) must"),
    ("unknown curve objective", ["tune", "--curves", "--curve-objective", "fid"],
     r"error: --curve-objective must be one or more of share, relative, each once, got \['fid'\]"),
    ("curve objective without curves", ["tune", "--curve-objective", "relative"],
     r"error: --curve-objective chooses how --curves candidates allocate: add --curves"),
    ("the default curve objective without curves", ["tune", "--curve-objective", "share"],
     r"error: --curve-objective chooses how --curves candidates allocate: add --curves"),
    ("more groups than timesteps", ["run", "--groups", "2000"], "N=2000 exceeds T=1000"),
    ("ten billion groups", ["run", "--groups", "10000000000"], "N=10000000000 exceeds T=1000"),
    ("ten billion timesteps", ["run", "--timesteps", "10000000000"],
     r"num_train_timesteps \(--timesteps\) must be at most 1000000, got 10000000000 \(typical: 1000\)"),
    ("zero sampling steps", ["run", "--steps", "0"], "sampling steps must be between 1 and T=1000"),
    ("learning rate too large", ["run", "--base-lr", "5"],
     r"error: --base-lr \(the peak learning rate\) must be in \(0, 1\)"),
    ("zero stage-1 steps", ["run", "--base-steps", "0"], "error: --base-steps must be >= 1, got 0"),
    ("zero stage-2 steps", ["finetune", "--finetune-steps", "0"], "error: --finetune-steps must be >= 1, got 0"),
    ("zero search rounds", ["prune", "--rounds", "0"], "error: --rounds must be >= 1, got 0"),
    ("zero candidates", ["run", "--candidates", "0"], "error: --candidates must be >= 1, got 0"),
    ("zero batch size", ["train-base", "--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
    ("too few timesteps", ["run", "--timesteps", "1"], "error: --timesteps must be at least 2, got 1"),
    ("too few timesteps for the linear betas", ["run", "--timesteps", "20"],
     r"error: num_train_timesteps \(--timesteps\) T=20 is too few for the linear schedule: its betas are scaled by "
     r"1000/T and the last, 1, would reach 1 \(no signal left\); use T >= 21 or the cosine schedule"),
    ("unknown sampler", ["run", "--sampler", "heun"], "unknown sampler 'heun'"),
    ("unknown device", ["run", "--device", "tpu"], "error: --device must be auto, cpu, cuda or cuda:N, got tpu"),
    ("unknown grouping", ["run", "--grouping", "equal"], "unknown grouping strategy 'equal'"),
    ("unknown proposer", ["run", "--proposer", "gpt"], "unknown proposer 'gpt'"),
    ("unknown ordering", ["run", "--ordering", "random"], "unknown difficulty ordering 'random'"),
    ("unknown schedule", ["run", "--schedule", "cosine"], "unknown beta_schedule 'cosine'"),
    ("unknown importance", ["run", "--importance", "random"], "unknown importance 'random'"),
    ("mix out of range", ["run", "--mix", "2"], r"error: --mix must be in \[0, 1\]"),
    ("feature distillation out of range", ["finetune", "--feature-distill", "1.5"],
     r"error: --feature-distill must be in \[0, 1\], got 1.5"),
    ("unknown budget unit", ["run", "--budget-unit", "seconds"], "unknown budget unit 'seconds'"),
    ("latency batch zero", ["run", "--latency-batch", "0"], "error: --latency-batch must be >= 1, got 0"),
    ("latency batch zero in the plan", ["plan", "--latency-batch", "0"], "error: --latency-batch must be >= 1, got 0"),
    ("missing data path", ["run", "--data", "/no/such/images"],
     r"/no/such/images. is neither a known dataset name .* nor an existing path"),
    ("missing config file", ["run", "--config", "/no/such.yaml"], "config file /no/such.yaml does not exist"),
    ("plan before training", ["plan"], "no trained base model at"),
    ("missing bundle", ["sample", "--bundle", "/no/such/bundle"], "no bundle at /no/such/bundle"),
    ("image size the UNet cannot halve", ["run", "--image-size", "7"],
     r"images of size 7 do not fit the UNet preset 'digits-8': its 2 levels need a size divisible by 2; resize them to "
     r"6 or 8"),
    ("one-pixel images", ["run", "--image-size", "1"], "resize them to 2 [(]--image-size"),
    ("size off a 3-level preset", ["run", "--image-size", "10"],
     "'gray-32': its 3 levels need a size divisible by 4; resize them to 8 or 12"),
    ("negative seed", ["run", "--seed", "-1"], r"seed must be between 0 and 4294967295 \(2\*\*32 - 1\), got -1"),
    ("huge seed", ["run", "--seed", str(2**32)], "seed must be between 0 and 4294967295"),
    ("too few images", ["run", "--limit", "1"],
     r"the data \(digits\) has 1 image, too few: 10% \(at least 1\) is held out .* give at least 2 images"),
    ("sampling steps above a small T",
     ["run", "--timesteps", "10", "--schedule", "squaredcos_cap_v2", "--steps", "50"],
     r"sampling steps must be between 1 and T=10, got 50 \(--steps, sample_steps; unset: min\(50, T\)\)"),
    ("zero steps when sampling", ["sample", "--bundle", "/no/such/bundle", "--steps", "0"],
     "--steps must be >= 1, got 0"),
    ("zero images when sampling", ["sample", "--bundle", "/no/such/bundle", "--num", "0"], "--num must be >= 1, got 0"),
    ("negative seed when sampling", ["sample", "--bundle", "/no/such/bundle", "--seed", "-1"],
     "--seed must be between 0 and"),
    ("sample output is a directory", ["sample", "--bundle", "/no/such/bundle", "--output", "/"],
     "--output / is a directory, not a file"),
    ("one image in the report", ["report", "--num", "1"], "--num must be >= 2, got 1"),
    ("more images in a grid than its stated maximum", ["run", "--num", str(10**12)],
     r"error: --num must be at most 10000, got 1000000000000 \(a stated maximum: a sample grid is one PNG to look at"),
    ("more grid images when sampling", ["sample", "--bundle", "/no/such/bundle", "--num", "10001"],
     r"error: --num must be at most 10000, got 10001 \(a stated maximum"),
    ("more FID images than the report's stated maximum", ["report", "--num", str(10**8)],
     r"error: --num must be at most 50000, got 100000000 \(a stated maximum: 50,000 images per seed is FID-50k"),
    ("a seed repeated in the report", ["report", "--seed", "0", "--seed", "0"],
     r"error: --seed 0 is given twice: each seed is one independent sample of the spread; give each once"),
    ("empty base model", ["run", "--base", ""], r"error: base_model \(--base\) is empty; name a trained model"),
    ("empty data spec", ["run", "--data", ""], r"error: the data spec is empty; give a data set name \(digits\)"),
    ("a latency batch larger than memory", ["run", "--latency-batch", str(10**9)],
     r"error: timing a batch of 1000000000 samples \(their inputs and outputs alone\) needs about 476.8 GiB, more "
     r"than the .* of memory this machine has available now; lower --latency-batch"),
    ("unknown sampler in a tune setting", ["tune", "--settings", "ddim:10 heun:5"],
     r"error: --settings 'heun:5': unknown sampler 'heun'"),
    ("tune setting given twice", ["tune", "--settings", "ddim:10,ddim:10"],
     r"error: --settings ddim:10 is given twice: each setting is one row per model; give it once"),
    ("tune setting beyond T", ["tune", "--settings", "ddim:5000"],
     r"error: --settings ddim:5000: ddim:5000 takes 5000 steps, more than the schedule's T=1000"),
    ("tune reference of zero steps", ["tune", "--reference", "ddim:0"],
     r"error: --reference 'ddim:0': sampling steps must be an integer >= 1"),
    ("too few screen samples", ["tune", "--screen-samples", "1"], r"error: --screen-samples must be between 2 and"),
    ("sample output not a PNG", ["sample", "--output", "samples.jpg"],
     r"--output samples.jpg: sample grids are written as PNG; give a path ending in .png"),
    ("empty bundle path", ["sample", "--bundle", ""],  # was Path("."): "manifest.json is missing: . is not a ..."
     r"^error: --bundle is empty; give the bundle's directory, e.g. --bundle runs/digits/bundle\n$"),
    ("bundle path naming a file", ["sample", "--bundle", str(DOC)],  # was "the directory does not exist"
     r"error: no bundle at .*errors.md: it is a file, not the bundle's directory \(the one holding manifest.json\)"),
]


@pytest.mark.parametrize("name, args, message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_rejects_bad_input_with_a_clear_message(name, args, message, tmp_path):
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")] if args[0] != "sample" else args)
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "base" / "final").exists()


CONFIG_CASES = [
    ("unknown config key", "bogus: 1\n", ".yaml", r"unknown config keys \['bogus'\]"),
    ("unknown section key", "base:\n  nonsense: 3\n", ".yaml", "unknown keys .* in config section 'base'"),
    ("unknown section", "bogus:\n  x: 3\n", ".yaml", r"unknown config keys \['bogus'\]"),
    ("config file type", "k = 0.3\n", ".ini", r"must end in \.yaml, \.yml, \.toml or \.json"),
    ("non-numeric setting", "base:\n  lr: fast\n", ".yaml", "setting 'base.lr' must be a number, got 'fast'"),
    ("zero steps in a config file", "finetune:\n  steps: 0\n", ".yaml", "error: finetune.steps must be >= 1, got 0"),
    ("list for a number", "groups: [1, 2]\n", ".yaml", r"setting 'groups' must be an integer, got \[1, 2\]"),
    ("fraction for an integer", "groups: 2.5\n", ".yaml", "setting 'groups' must be an integer, got 2.5"),
    ("null for a number", "k: null\n", ".yaml", "setting 'k' must be a number, got null"),
    ("bool for a number", "k: true\n", ".yaml", "setting 'k' must be a number, got True"),
    ("fraction for the seed", "seed: 1.5\n", ".yaml", "setting 'seed' must be an integer, got 1.5"),
    ("repeated key", "groups: 2\ngroups: 3\n", ".yaml",
     r"config file .*config.yaml is not valid YAML \(key\(s\) \['groups'\] appear more than once in one mapping; keep "
     r"one"),
    ("repeated section", "base: {steps: 3}\nbase: {lr: 0.1}\n", ".yaml", r"key\(s\) \['base'\] appear more than once"),
    ("repeated JSON key", '{"k": 0.3, "k": 0.5}', ".json",
     r"is not valid JSON \(key\(s\) \['k'\] appear more than once"),
    ("number for a section", "base: 5\n", ".yaml",
     r"config section 'base' must be a mapping of settings \(batch_size, .*\), got 5"),
    ("key inside a plain setting", "k:\n  x: 1\n", ".yaml",
     "unknown setting 'k.x': 'k' is a single setting, not a section"),
    ("text for a bool", "search:\n  memory: 'yes'\n", ".yaml",
     "setting 'search.memory' must be true or false, got 'yes'"),
    ("text where null is allowed", "base:\n  ema_decay: x\n", ".yaml",
     "setting 'base.ema_decay' must be a number or null, got 'x'"),
    ("malformed YAML", "k: [\n", ".yaml",
     r"config file .*config\.yaml is not valid YAML \(.*line 2.*\); fix it and rerun"),
    ("malformed JSON", '{"k": \n', ".json",
     r"config file .*config\.json is not valid JSON \(Expecting value: line 2 column 1 .*\); fix it"),
    ("malformed TOML", "k = \n", ".toml", r"config file .*config\.toml is not valid TOML \(.*line 1.*\); fix it"),
    ("config not a mapping", "- 1\n", ".yaml", r"config file .*config\.yaml must hold a mapping of settings, got list"),
    ("plan fractions that do not fit", "groups: 2\nplan_fractions: [0.5]\n", ".yaml",
     r"plan_fractions must be one budget fraction in \(0, 1\] per group \(N=2\), got \[0.5\]; give N values"),
    ("plan fractions and a mean budget", "groups: 2\nplan_fractions: [0.5, 1]\nmean_budget: 0.6\n", ".yaml",
     "plan_fractions and mean_budget both set the budgets; give one of them"),
    ("more FID images in a config file", "eval_samples: 1e8\n", ".yaml",
     r"error: eval_samples must be at most 50000, got 100000000 \(a stated maximum: 50,000 images per seed is FID-50k"),
    ("more FID seeds in a config file", "eval_seeds: 1e9\n", ".yaml",
     r"error: eval_seeds must be at most 100, got 1000000000 \(a stated maximum: each seed samples and scores"),
    ("label dropout without a class-conditional model", "base:\n  label_dropout: 0.1\n", ".yaml",
     r"error: label dropout \(base.label_dropout 0.1, finetune.label_dropout 0.0\) needs a class-conditional model, "
     r"and the UNet presets are unconditional; give a class-conditional --base"),
    ("stage precisions differ", "finetune:\n  mixed_precision: bf16\n", ".yaml",
     "base.mixed_precision 'no' and finetune.mixed_precision 'bf16' differ, but accelerate keeps one precision per "
     r"process \(stage 2 would fail after stage 1\); set both to the same value"),
]


@pytest.mark.parametrize("name, content, suffix, message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_files(tmp_path, name, content, suffix, message):
    path = tmp_path / f"config{suffix}"
    path.write_text(content)
    result = CliRunner().invoke(app, ["run", "--config", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and re.search(message, result.output), result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_config_values_are_typed_where_they_are_read():
    """The values a setting takes: integral floats and numbers written as text are numbers; None where declared."""
    from tdcdiff.run import RunConfig

    config = RunConfig.from_dict({"groups": 2.0, "k": "0.3", "base": {"lr": "1e-3", "steps": "1e3", "ema_decay": None}})
    assert (config.groups, config.k, config.base.lr, config.base.steps, config.base.ema_decay) == (2, 0.3, 1e-3, 1000,
                                                                                                   None)
    assert type(config.groups) is int and type(config.k) is float
    with pytest.raises(ValueError, match="setting 'k' must be a number, got True"):
        RunConfig(k=True).validate()  # a config built in code is checked by validate()
    with pytest.raises(ValueError, match="a config must be a mapping of settings"):
        RunConfig.from_dict([1])


def test_sampling_steps_follow_a_small_T_unless_set():
    from tdcdiff.run import RunConfig

    small = RunConfig(num_train_timesteps=10, beta_schedule="squaredcos_cap_v2")  # linear betas need T >= 21
    small.validate()  # train-base --timesteps 10 needs no --steps
    assert (small.sampling_steps, RunConfig().sampling_steps, RunConfig(sample_steps=7).sampling_steps) == (10, 50, 7)


def test_config_option_naming_a_directory(tmp_path):
    result = CliRunner().invoke(app, ["run", "--config", str(tmp_path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert f"config file {tmp_path} is a directory; pass the settings file itself" in result.output


def test_damaged_run_config_names_the_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"k": 0.4, "gro')
    result = CliRunner().invoke(app, ["plan", "--out", str(run)])
    assert result.exit_code == 2, result.output
    assert re.search(rf"{run / 'config.json'} is damaged \(Unterminated string .*\); restore it, or delete it and "
                     r"rerun", result.output)
    (run / "config.json").write_text('{"k": "high"}')
    result = CliRunner().invoke(app, ["plan", "--out", str(run)])
    assert f"{run / 'config.json'} is damaged (setting 'k' must be a number, got 'high')" in result.output


def test_a_run_config_value_out_of_range_names_the_file(tmp_path):
    # An edited config.json's 'k': 1e400 (inf) or a NaN ema_decay was "k must be in (0, 1] ..., got inf" from
    # `tdcdiff sample --out R`: no word of the file the value came from.
    run = tmp_path / "run"
    run.mkdir()
    for text, problem in [('{"k": 1e400}', "k must be in (0, 1] (the easiest group's share grows with k), got inf"),
                          ('{"base": {"ema_decay": NaN}}', "base.ema_decay must be in (0, 1) or None, got nan"),
                          # a check across settings (T), not one setting's own range
                          ('{"sample_steps": 1e30}', "sampling steps must be between 1 and T=1000, got "
                                                     f"{int(1e30)} (--steps, sample_steps; unset: min(50, T))"),
                          ('{"groups": 20, "num_train_timesteps": 10}', "number of groups N=20 exceeds T=10")]:
        (run / "config.json").write_text(text)
        result = CliRunner().invoke(app, ["sample", "--out", str(run), "--num", "2"])
        assert result.exit_code == 2, result.output
        assert result.output == f"error: {run / 'config.json'} is damaged ({problem}); restore it, or delete it " \
                                "and rerun with the settings the run was made with (or use a new output directory)\n"


def test_names_from_files_are_printed_on_one_line(tmp_path):
    # A corrupt image named "bad\nerror: all good\x1b[31m.png" printed two error lines, the second forged, and a
    # terminal escape: control characters in a message are escaped.
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.new("L", (8, 8), i * 60).save(folder / f"{i}.png")
    (folder / "bad\nerror: all good\x1b[31m.png").write_bytes(b"not a png")
    result = CliRunner().invoke(app, ["run", "--dry-run", "--data", str(folder), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "\x1b" not in result.output, result.output
    assert result.output.startswith(f"error: cannot decode image {folder}/bad\\nerror: all good\\x1b[31m.png")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("out, message", [
    ("", "--out is empty; give the run directory"),
    ("a_file", "--out {tmp}/a_file is a file, not a directory; choose another --out"),
    ("a_file/run", "--out {tmp}/a_file/run cannot be created: {tmp}/a_file is a file; choose another --out"),
])
def test_unusable_run_directory(tmp_path, monkeypatch, out, message):
    (tmp_path / "a_file").write_text("")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", "--out", out and str(tmp_path / out)])
    assert result.exit_code == 2, result.output
    assert message.format(tmp=tmp_path) in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_read_only_outputs_are_refused_before_work(tmp_path, monkeypatch):
    from tdcdiff import files  # the check, shared with every atomic writer

    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = files.os.access
    monkeypatch.setattr(files.os, "access", lambda path, mode: Path(path) != read_only and real_access(path, mode))
    result = CliRunner().invoke(app, ["run", "--out", str(read_only / "run")])
    assert result.exit_code == 2, result.output
    assert (f"--out {read_only}/run cannot be written: {read_only} is read-only (read-only file system or "
            "no permission)") in result.output
    result = CliRunner().invoke(app, ["sample", "--bundle", "/no/such/bundle", "--output", str(read_only / "grid.png")])
    assert result.exit_code == 2 and f"--output {read_only}/grid.png cannot be written" in result.output, result.output
    assert list(read_only.iterdir()) == []


def test_operating_system_errors_are_one_line(tmp_path, monkeypatch):
    from tdcdiff.run import stages as run

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "config.json"))

    monkeypatch.setattr(run, "atomic_write_text", refuse)
    result = CliRunner().invoke(app, ["train-base", "--out", str(tmp_path / "run"), "--limit", "20"])
    assert result.exit_code == 2, result.output
    assert result.output == (f"error: Permission denied: {tmp_path}/run/config.json; check that path and its "
                             "permissions, or choose another\n")


def _train_one_step(out):
    return CliRunner().invoke(app, ["train-base", "--out", str(out), "--limit", "20", "--base-steps", "1",
                                    "--batch-size", "4", "-q"])


def test_full_disk_at_a_training_checkpoint_names_it(tmp_path, monkeypatch):
    """safetensors reports a full disk as SafetensorError, not OSError: it gets the same message."""
    import safetensors.torch
    from safetensors import SafetensorError

    import tdcdiff.serialization  # noqa: F401  (binds the real save_file, for final/, before the patch)

    def no_space(tensors, path, *args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    result = _train_one_step(tmp_path / "run")
    assert result.exit_code == 2, result.output
    checkpoint = tmp_path / "run" / "base" / "checkpoint"
    assert re.fullmatch(rf"error: no space left on device while writing {checkpoint}; nothing was half-written "
                        r"there\. Free some space .* and rerun: finished stages are kept\n",
                        result.output), result.output
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["log.jsonl"]


@pytest.mark.parametrize("count, size, message", [
    (3, 7, "images of size 7 do not fit the UNet preset 'digits-8'"),
    (3, 1, "images of size 1 do not fit the UNet preset 'digits-8': .* resize them to 2 "),
    (1, 8, r"the data \(.*imgs\.zip\) has 1 image, too few: .* give at least 2 images"),
])
def test_image_files_the_run_cannot_train_on(tmp_path, count, size, message):
    import zipfile

    from PIL import Image

    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as archive:
        for i in range(count):
            image = tmp_path / f"{i}.png"
            Image.new("L", (size, size), color=40 * i).save(image)
            archive.write(image, image.name)
    result = CliRunner().invoke(app, ["run", "--data", str(tmp_path / "imgs.zip"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and re.search(message, result.output), result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("folders, size, message", [
    (("",), (8, 8), r"data set '.*imgs' has 0 labelled images, but the report's FID feature net is a classifier "
                    r"trained on the data's labels and needs at least 20: give labelled data .*or stop before the "
                    r"report"),
    (("a", "b"), (8, 8), "has 12 labelled images, but the report's FID feature net .* needs at least 20"),
    (("a",), (12, 8), r"has 12x8 images, but the report's FID feature net takes square ones; resize them with "
                      r"--image-size \(image_size\), e.g. --image-size 8"),
])
def test_data_the_report_cannot_measure_fails_before_training(tmp_path, folders, size, message):
    from PIL import Image

    for folder in folders:
        (tmp_path / "imgs" / folder).mkdir(parents=True, exist_ok=True)
        for i in range(6):
            Image.new("L", size, color=40 * i).save(tmp_path / "imgs" / folder / f"{i}.png")
    result = CliRunner().invoke(app, ["run", "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and re.search(message, result.output), result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [["run"], ["run", "--dry-run"], ["tune", "--dry-run"], ["tune"]])
def test_a_cache_folder_fid_cannot_write_is_named_before_training(tmp_path, monkeypatch, command):
    # attack 2026-12-07f rows 630/631: `tdcdiff run` named TDCDIFF_CACHE only at the report, tune after every candidate
    cache = tmp_path / "cachefile"
    cache.write_text("not a folder")
    monkeypatch.setenv("TDCDIFF_CACHE", str(cache))
    result = CliRunner().invoke(app, [*command, "--image-size", "8", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and (f"TDCDIFF_CACHE is {cache}, which cannot be used as a folder (it is a file, "
                                      "not a folder); point TDCDIFF_CACHE at a folder you can write") in result.output
    assert not (tmp_path / "out").exists()


def test_diverged_training_is_one_line(tmp_path, monkeypatch):
    from tdcdiff.train import loop

    monkeypatch.setattr(loop, "training_target", lambda scheduler, x0, noise, t: torch.full_like(x0, float("nan")))
    result = _train_one_step(tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert re.fullmatch(r"error: loss became nan at step 1; the last good checkpoint is kept in .*checkpoint \(step "
                        r"0\)\. "
                        r"Lower the learning rate or enable grad_clip, then rerun\n", result.output), result.output


def test_damaged_checkpoint_names_the_file_and_the_fix(tmp_path):
    out = tmp_path / "run"
    first = _train_one_step(out)
    assert first.exit_code == 0, first.output
    base = out / "base"
    shutil.rmtree(base / "final")  # as if killed after the checkpoint
    (base / "train.json").unlink()
    (base / "checkpoint" / "state.json").write_text('{"step": 1, "fing')
    result = _train_one_step(out)
    assert result.exit_code == 2, result.output
    assert re.fullmatch(rf"error: checkpoint {base / 'checkpoint'} is unreadable \(JSONDecodeError: .*\); delete "
                        rf"{base / 'checkpoint'} to start this stage over\n", result.output), result.output
    (base / "checkpoint" / "state.json").write_text('["not", "an", "object"]')
    assert "is unreadable (TypeError" in _train_one_step(out).output


def test_llm_proposer_without_endpoint_fails_before_training(tmp_path):
    unset = {name: None for name in ("TDCDIFF_LLM_BASE_URL", "OPENAI_BASE_URL", "TDCDIFF_LLM_MODEL")}
    result = CliRunner().invoke(app, ["run", "--proposer", "llm", "--out", str(tmp_path / "run")], env=unset)
    assert result.exit_code == 2 and "TDCDIFF_LLM_BASE_URL" in result.output, result.output
    assert not (tmp_path / "run" / "base").exists()


def test_model_whose_output_shape_differs_from_its_input(scheduler):
    from tdcdiff.pipeline import sample

    class Squash(nn.Module):
        def forward(self, x, t):
            return x.mean(dim=1, keepdim=True).repeat(1, 3, 1, 1)  # 2 x 1 channels would be a learned variance

    with pytest.raises(ValueError,
                       match=r"denoiser output has shape \(64, 3, 8, 8\) but its input has shape \(64, 1, 8, 8\)"):
        sample(Squash(), scheduler, sample_shape=(1, 8, 8), steps=2, progress=False)


def test_data_with_the_wrong_channel_count_for_the_model(tmp_path, digits, scheduler):
    from tdcdiff.models import build_unet
    from tdcdiff.train import TrainConfig, train

    with pytest.raises(ValueError, match="takes 3-channel images but the data has 1 channels"):
        train(build_unet("digits-8", in_channels=3), digits.images, scheduler, TrainConfig(steps=1), tmp_path,
              progress=False)


def test_full_disk_names_the_file_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    from tdcdiff import files, serialization
    from tdcdiff.models import build_unet

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", no_space)
    with pytest.raises(OSError, match=r"no space left on device while writing .*plan\.json"):
        files.atomic_write_text(tmp_path / "plan.json", "{}")
    with pytest.raises(OSError, match=r"no space left on device while writing .*model"):
        serialization.save_model(build_unet("digits-8"), tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_fid_refuses_images_outside_its_range(digits):
    from tdcdiff.metrics import FeatureNet, compute_fid

    net = FeatureNet(1, 8, 10)
    images = digits.images[:8]
    pixels = ((images + 1) * 127.5).round()
    with pytest.raises(ValueError, match=r"generated images have dtype torch.uint8; expected float images in \[-1, 1\] "
                                         r"\(convert uint8 pixels with x.float\(\) / 127.5 - 1\)"):
        compute_fid(pixels.to(torch.uint8), images, net)
    with pytest.raises(ValueError, match=r"reference images have values in \[0, 255\]; expected \[-1, 1\]"):
        compute_fid(images, pixels, net)
    compute_fid(images * (1 + 1e-4), images, net)  # rounding slack is fine


def test_every_case_is_in_the_catalogue():
    text = DOC.read_text()
    for name, *_ in CLI_CASES + CONFIG_CASES:
        assert f"| {name} |" in text, f"docs/errors.md lacks '{name}'"


def test_nothing_is_unpickled():
    """Files a user may be handed are read with safetensors or JSON; never pickle or an unrestricted torch.load."""
    source = Path(__file__).resolve().parents[1] / "src" / "tdcdiff"
    for path in source.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"


def _write_plan(run: Path, **changes) -> Path:
    """A valid 2-group plan.json in run/plan, with `changes` to its fields."""
    import json

    from tdcdiff.budget import make_plan
    from tdcdiff.grouping import make_groups
    from tdcdiff.schedule import make_scheduler

    plan = make_plan(make_groups("uniform", 2, make_scheduler(1000)), k=0.5, ordering="snr-high-hard",
                     base_flops=1000, sample_shape=(1, 8, 8))
    path = run / "plan" / "plan.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**plan.to_dict(), **changes}))
    (run / "config.json").write_text("{}")  # the defaults: 2 groups
    return path


@pytest.mark.parametrize("changes, problem", [
    # a text fraction or a short list was a TypeError / IndexError traceback at `tdcdiff prune`, NaN "cannot
    # convert float NaN to integer", base_flops 0 "budget_flops must be > 0" (no file, no fix)
    ({"fractions": ["0.5", 1.0]}, "'fractions' must be one budget fraction in (0, 1] per group (2 groups), got "
                                  "['0.5', 1.0]"),
    ({"fractions": [0.7]}, "'fractions' must be one budget fraction in (0, 1] per group (2 groups), got [0.7]"),
    ({"fractions": [float("nan"), 1.0]}, "'fractions' must be one budget fraction in (0, 1] per group (2 groups), "
                                         "got [nan, 1.0]"),
    ({"base_flops": 0}, "'base_flops' must be a positive integer (the base's FLOPs per forward), got 0"),
    ({"ranks": [1, "2"]}, "'ranks' must be the difficulty ranks 1..2, one per group, got [1, '2']"),
    ({"sample_shape": [1, 8]}, "'sample_shape' must be 3 positive integers (channels, height, width), got [1, 8]"),
    ({"ordering": "random"}, "'ordering' must be null or one of ('measured', 'snr-high-hard', 'snr-low-hard'), got "
                             "'random'"),
    ({"grouping": None}, "'grouping' must be a mapping, got NoneType"),
    ({"format": None}, "format 'None', expected 'tdcdiff-plan/1'"),
])
def test_a_damaged_plan_names_the_file_and_the_field(tmp_path, changes, problem):
    run = tmp_path / "run"
    path = _write_plan(run, **changes)
    result = CliRunner().invoke(app, ["prune", "--out", str(run)])
    assert result.exit_code == 2, result.output
    assert result.output == (f"error: {path} is damaged ({problem}); restore it, or delete {path.parent} and rerun "
                             "`tdcdiff plan` (then redo the stages after it, which were made for the old plan)\n")
    assert not (run / "prune").exists()
    (run / "plan" / "plan.json").write_text("[1, 2]")
    result = CliRunner().invoke(app, ["prune", "--out", str(run)])
    assert "is damaged (it holds a list, not a JSON object)" in result.output


@pytest.mark.parametrize("args, message", [
    # 10^8 candidates filled memory after stage 1 (a MemoryError traceback) and --dry-run estimated 1.8e12 CPU-hours
    (["run", "--dry-run", "--candidates", "100000000"], "error: --candidates must be at most 256 (each candidate is "
                                                        "pruned and scored, seconds each, and kept in memory), got "
                                                        "100000000\n"),
    (["prune", "--rounds", "257"], "error: --rounds must be at most 256 (each round's candidates are pruned and "
                                   "scored, seconds each), got 257\n"),
])
def test_search_counts_have_a_maximum(tmp_path, args, message):
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and result.output == message, result.output
    assert not (tmp_path / "run").exists()
    config = tmp_path / "c.yaml"
    config.write_text("search:\n  candidates_per_round: 100000000\n")
    result = CliRunner().invoke(app, ["run", "--dry-run", "--config", str(config), "--out", str(tmp_path / "run")])
    assert result.output.startswith("error: search.candidates_per_round must be at most 256"), result.output
    import numpy as np

    from tdcdiff.prune.search import SearchConfig

    for rounds in (10**8, np.int64(300)):  # a numpy integer is a number too
        with pytest.raises(ValueError, match=r"^rounds must be at most 256 \(each round's"):
            SearchConfig(rounds=rounds).validate()
    SearchConfig(rounds=256, candidates_per_round=256).validate()


@pytest.mark.parametrize("values", [[""], [" , ", ""]])
def test_an_empty_settings_ladder_is_refused(tmp_path, values):
    # `tune --settings ""` (an unset shell variable) ran the default 5-setting ladder: an empty value read as not given
    args = [a for v in values for a in ("--settings", v)]
    result = CliRunner().invoke(app, ["tune", *args, "--dry-run", "--out", str(tmp_path / "tune")])
    assert result.exit_code == 2, result.output
    assert result.output == ("error: --settings is empty; give sampling settings, e.g. --settings 'dpm-solver++:20 "
                             "unipc:10', or --settings none for only the reference (leave the flag out for the "
                             "default ladder)\n")
    assert not (tmp_path / "tune").exists()


@pytest.mark.parametrize("args, problem", [
    # was Python's "invalid literal for int() with base 10: ''"
    (["--reference", "dpm-solver++:"], "--reference 'dpm-solver++:': sampling steps must be an integer >= 1, got "
                                       "nothing"),
    (["--settings", "ddim:10:cx"], "--settings 'ddim:10:cx': the number after ':c' must be an integer >= 1, got 'x'"),
    # was "cache_depth (--cache-depth) 1 was given without feature caching; give cache_interval (--cache-interval)"
    (["--reference", "ddim:4:d1"], "--reference 'ddim:4:d1': :d1 (cache_depth) was given without feature caching; "
                                   "add :cN with N >= 2 (cache_interval), e.g. ddim:4:c2:d1, or drop it"),
    (["--settings", "ddim:10:c0"], "--settings 'ddim:10:c0': the number after ':c' must be an integer >= 1, got '0'"),
])
def test_a_sampling_setting_text_is_judged_in_its_own_terms(tmp_path, args, problem):
    result = CliRunner().invoke(app, ["tune", *args, "--dry-run", "--out", str(tmp_path / "tune")])
    assert result.exit_code == 2, result.output
    assert result.output == (f"error: {problem} (e.g. ddim:50, dpm-solver++:20:c3; samplers: ddpm, ddim, "
                             "dpm-solver++, unipc, deis, pndm, euler)\n")
    assert "--cache" not in result.output and not (tmp_path / "tune").exists()


@pytest.mark.parametrize("name", [".png", ".PNG"])
def test_a_grid_path_with_no_file_name(tmp_path, name):
    # was "give a path ending in .png" for a path that ends in .png: a hidden name without a stem
    result = CliRunner().invoke(app, ["sample", "--bundle", str(tmp_path / "b"), "--output", str(tmp_path / name)])
    assert result.exit_code == 2, result.output
    assert result.output == (f"error: --output {tmp_path / name}: the file name is empty (only the .png extension); "
                             f"give a name, e.g. {tmp_path / 'samples.png'}\n")
    assert list(tmp_path.iterdir()) == []


def test_a_dry_run_refuses_what_the_run_would(tmp_path):
    # `run --batch-size 100000000 --dry-run` estimated 3,008 CPU-hours where the run refuses at once for memory
    result = CliRunner().invoke(app, ["run", "--batch-size", "100000000", "--dry-run", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert re.fullmatch(r"error: training the UNet preset 'digits-8' \(.*\) needs about [\d.]+ GiB, more than the "
                        r".* GiB of memory this machine has available now; lower --batch-size \(base.batch_size, "
                        r"finetune.batch_size\) or --image-size\n", result.output), result.output
    assert not (tmp_path / "r").exists()


def test_a_report_before_the_bundle_names_the_command(tmp_path):
    # was "no bundle at R/bundle: the directory does not exist", where the other stages say what to run first
    run = tmp_path / "run"
    (run / "base").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    result = CliRunner().invoke(app, ["report", "--out", str(run)])
    assert result.exit_code == 2, result.output
    assert result.output == (f"error: no bundle at {run / 'bundle'}; run `tdcdiff bundle --out {run}` first (or "
                             f"`tdcdiff run --out {run}`, which makes every missing stage)\n")
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["base", "config.json"]


@pytest.mark.parametrize("command", [["report"], ["sample", "--num", "2"], ["prune"]])
def test_a_run_whose_config_json_is_gone(tmp_path, command):
    # a deleted config.json was reported as "R/bundle was not made by this run ... Delete R/bundle and rerun":
    # the defaults stood in for the settings the run was made with, and the advice deleted a good bundle
    run = tmp_path / "run"
    for name in ("base", "bundle"):
        (run / name).mkdir(parents=True)
    result = CliRunner().invoke(app, [*command, "--out", str(run)])
    assert result.exit_code == 2, result.output
    assert result.output == (f"error: {run / 'config.json'} is missing, but {run} holds a run's outputs (base/, "
                             "bundle/): the settings they were made with are unknown; restore config.json (a bundle's "
                             "manifest.json keeps them under provenance.config), or use a new output directory\n")
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["base", "bundle"]


def test_a_changed_setting_of_a_finished_stage_is_named_by_its_key(tmp_path):
    # a changed stage-2 flag printed both whole `finetune` sections (17 keys each, 700+ characters)
    from dataclasses import replace

    from tdcdiff.run.config import RunConfig, check_unchanged

    (tmp_path / "finetune").mkdir()
    saved = RunConfig()
    tail = (f"from the one{{s}} {tmp_path} was run with ({{values}}) and stage 'finetune' has already run; use a new "
            f"output directory, or delete {tmp_path / 'finetune'} to redo it and the stages after it")
    one = replace(saved, finetune=replace(saved.finetune, distill_weight=0.5))
    with pytest.raises(ValueError) as err:
        check_unchanged(tmp_path, saved, one)
    assert str(err.value) == "setting 'finetune.distill_weight' differs " + tail.format(s="", values="0.0 -> 0.5")
    two = replace(one, finetune=replace(one.finetune, steps=7))
    with pytest.raises(ValueError) as err:
        check_unchanged(tmp_path, saved, two)
    assert str(err.value) == "settings 'finetune.distill_weight', 'finetune.steps' differ " + tail.format(
        s="s", values="finetune.distill_weight: 0.0 -> 0.5; finetune.steps: 400 -> 7")
    check_unchanged(tmp_path, saved, replace(saved, num_samples=8))  # shapes no stage's output


def test_captions_behind_a_byte_order_mark_are_read(tmp_path):
    # metadata.jsonl saved by Windows Notepad (a UTF-8 BOM first) was "line 1 is not a JSON object"
    from tdcdiff.data import load_dataset
    from text_pipeline import captioned_folder

    folder = captioned_folder(tmp_path / "data")
    wanted = load_dataset(str(folder)).captions
    metadata = folder / "metadata.jsonl"
    metadata.write_bytes(b"\xef\xbb\xbf" + metadata.read_bytes())
    assert load_dataset(str(folder)).captions == wanted


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible here")
def test_a_saved_device_this_machine_lacks_names_the_file(tmp_path):
    # config.json's "device": "cuda" was reported as "device 'cuda' (--device)", a flag `sample` does not even take
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"device": "cuda"}')
    result = CliRunner().invoke(app, ["sample", "--out", str(run), "--num", "2"])
    assert result.exit_code == 2, result.output
    assert result.output == (f"error: device 'cuda' (from {run / 'config.json'}) is not visible here: torch sees 0 "
                             "CUDA device(s) (torch.cuda.is_available() is False); set its \"device\" to \"auto\" or "
                             "\"cpu\", or pass --device cpu to a command that takes it, or install a CUDA build of "
                             "torch on a machine with a GPU\n")
    result = CliRunner().invoke(app, ["plan", "--out", str(run), "--device", "cpu"])  # the flag takes over
    assert "is not visible" not in result.output and "no trained base model" in result.output, result.output
