"""The command line's own promises: every option's shown default is RunConfig's, flags name themselves in errors,
`--help` is fast and plain."""

import subprocess
import sys
import typing

import pytest

from tdcdiff.cli.options import SETTINGS, flag
from tdcdiff.run import RunConfig

# What a help text says where the setting's default is not one value: the setting is unset (None) or a switch.
DESCRIBED = {"the data's": None, "all": None, "by image size": None, "unscaled": None, "min(50, T)": None,
             "the --base pipeline's scheduler's, else ddim": None, "off": False, "on": True}


def _default(option) -> str | None:
    info = typing.get_args(option)[1]
    text = info.help or ""
    return text.rpartition("[default: ")[2].rstrip("]") if "[default: " in text else None


def _setting(key: str):
    value = RunConfig()
    for part in key.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("name", [n for n in SETTINGS if n not in ("base", "base_model_steps")])
def test_every_shown_default_is_the_run_configs(name):
    keys, option = SETTINGS[name]
    shown = _default(option)
    assert shown is not None, f"{flag(name)} shows no default"
    for key in keys if isinstance(keys, tuple) else (keys,):
        actual = _setting(key)
        if shown in DESCRIBED:
            assert actual == DESCRIBED[shown], (key, shown, actual)
        else:
            assert str(actual) == shown, (key, shown, actual)


def test_flags_are_spelled_as_declared():
    assert flag("base_steps") == "--base-steps" and flag("k") == "--k" and flag("attention") == "--attention"
    assert flag("base_model_steps") == "--base-steps"


def test_help_is_plain_and_imports_no_torch():
    code = "import sys; from tdcdiff.cli import app; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == \
        ["False", "False"]
    shown = subprocess.run([sys.executable, "-m", "tdcdiff.cli", "run", "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and "<bool>" not in shown.stdout and "╭" not in shown.stdout
    assert "--base-steps <int>" in shown.stdout and "[default: 3000]" in shown.stdout


@pytest.fixture(scope="module")
def caching_bundles(tmp_path_factory):
    """Two bundles of the tiny UNet (two experts, uniform groups): one recording ddim:4:c2:d2, one ddim:4."""
    import torch

    from tdcdiff.bundle import save_bundle
    from tdcdiff.flops import count_flops
    from tdcdiff.grouping import make_groups
    from tdcdiff.models import build_unet
    from tdcdiff.schedule import make_scheduler

    torch.manual_seed(0)
    tiny_unet, scheduler = build_unet("digits-8"), make_scheduler(1000)
    flops = count_flops(tiny_unet, (1, 8, 8))
    folder = tmp_path_factory.mktemp("bundles")
    return [save_bundle(folder / name, [tiny_unet, tiny_unet], make_groups("uniform", 2, scheduler), scheduler,
                        sample_shape=(1, 8, 8), expert_flops=[flops, flops], base_flops=flops, sampling=sampling)
            for name, sampling in (("cached", "ddim:4:c2:d2"), ("plain", "ddim:4"))]


@pytest.mark.parametrize("args, shown", [
    # attack 2026-12-08 row 871: --cache-depth alone was refused on a bundle that caches every 2 steps
    (["--cache-depth", "1"], "a full pass every 2 steps, the depth-1 shallow branch alone at 2 of 4 steps"),
    (["--cache-interval", "3"], "a full pass every 3 steps, the depth-2 shallow branch alone at 2 of 4 steps"),
    (["--sampler", "unipc"], "unipc 4 steps (trailing spacing), seed 0, feature cache: a full pass every 2 steps, "
                             "the depth-2 shallow branch alone at 2 of 4 steps"),
    (["--cache-interval", "1"], "ddim 4 steps (trailing spacing), seed 0, "),
])
def test_sample_options_not_given_are_the_bundles_item_by_item(caching_bundles, tmp_path, args, shown):
    from typer.testing import CliRunner

    from tdcdiff.cli import app

    result = CliRunner().invoke(app, ["sample", "--bundle", str(caching_bundles[0]), "--num", "2", "-q",
                                      "--output", str(tmp_path / "g.png"), *args])
    assert result.exit_code == 0 and shown in result.output, result.output
    assert ("feature cache" in result.output) == (args != ["--cache-interval", "1"])


@pytest.mark.parametrize("bundle, args", [(1, ["--cache-depth", "2"]),
                                          (0, ["--cache-interval", "1", "--cache-depth", "2"])])
def test_a_cache_depth_where_the_setting_does_not_cache_is_one_error(caching_bundles, tmp_path, bundle, args):
    from typer.testing import CliRunner

    from tdcdiff.cli import app

    result = CliRunner().invoke(app, ["sample", "--bundle", str(caching_bundles[bundle]), "--num", "2", "-q",
                                      "--output", str(tmp_path / "g.png"), *args])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output == ("error: cache_depth (--cache-depth) 2 was given without feature caching; give "
                             "cache_interval (--cache-interval) >= 2 too, or drop cache_depth\n")
    assert not (tmp_path / "g.png").exists()


def test_the_sample_summary_counts_one_step_and_one_image_in_the_singular(caching_bundles, tmp_path):
    from typer.testing import CliRunner

    from tdcdiff.cli import app

    # attack 2026-12-08 (noticed, row 816): "ddim 1 steps", "at 0 of 1 steps"
    result = CliRunner().invoke(app, ["sample", "--bundle", str(caching_bundles[0]), "--num", "1", "--steps", "1",
                                      "-q", "--output", str(tmp_path / "g.png")])
    assert result.exit_code == 0, result.output
    assert f"samples: {tmp_path / 'g.png'} (1 image, ddim 1 step (trailing spacing), seed 0, feature cache: a full " \
           "pass every 2 steps, the depth-2 shallow branch alone at 0 of 1 step; " in result.output
