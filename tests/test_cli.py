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
