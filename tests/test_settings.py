"""The settings mechanism itself (tdcdiff.settings): rules, the type check, dotted overrides, bounded files."""

from dataclasses import dataclass

import pytest

from tdcdiff.settings import (
    Settings,
    apply_overrides,
    at_least,
    at_most,
    between,
    load_config_file,
    one_of,
    parse_settings,
    setting,
)


@dataclass
class Inner(Settings):
    steps: int = setting(10, rule=at_least(1))


@dataclass
class Outer(Settings):
    k: float = setting(0.5, rule=between("(0, 1]", about="the slope", typical="typical: 0.5"))
    n: int = setting(4, rule=at_most(10))
    kind: str = setting("a", rule=one_of(("a", "b"), what="kind of thing"))
    scale: float | None = setting(None, rule=between("[0, 1]", optional=True))
    inner: Inner = setting(factory=Inner)

    def checks(self):
        return [(self.n >= self.inner.steps or self.n == 4, "n must reach inner.steps")]


@pytest.mark.parametrize("change, message", [
    ({"k": 0}, r"^k \(the slope\) must be in \(0, 1\], got 0 \(typical: 0.5\)$"),
    ({"k": 1.5}, r"^k \(the slope\) must be in \(0, 1\]"),
    ({"k": float("nan")}, r"^k \(the slope\) must be in"),
    ({"n": 11}, r"^n must be at most 10, got 11$"),
    ({"kind": "c"}, r"^unknown kind of thing 'c'; choose one of \('a', 'b'\)$"),
    ({"scale": 2.0}, r"^scale must be in \[0, 1\] or None, got 2.0$"),
    ({"inner": Inner(steps=0)}, r"^inner.steps must be >= 1, got 0$"),
    ({"k": True}, r"^setting 'k' must be a number, got True$"),  # a bool is no number: the type check says so
    ({"n": "4"}, r"^setting 'n' must be an integer, got '4'$"),
    ({"n": 5, "inner": Inner(steps=6)}, r"^n must reach inner.steps$"),
])
def test_rules_types_and_checks_each_name_the_setting(change, message):
    with pytest.raises(ValueError, match=message):
        Outer(**change).validate()


def test_valid_values_pass_and_none_is_taken_where_declared():
    Outer(k=1, n=10, kind="b", scale=None).validate()
    Outer(scale=0.0, inner=Inner(steps=1)).validate()


def test_dotted_overrides_are_typed():
    config = apply_overrides(Outer(), {"k": "0.25", "inner.steps": 3.0})
    assert (config.k, config.inner.steps, type(config.inner.steps)) == (0.25, 3, int)
    with pytest.raises(ValueError, match=r"unknown setting 'k.x': 'k' is a single setting, not a section"):
        apply_overrides(Outer(), {"k.x": 1})
    with pytest.raises(ValueError, match=r"unknown config keys \['bogus'\]"):
        apply_overrides(Outer(), {"bogus": 1})
    with pytest.raises(ValueError, match="setting names are text, got 1"):
        apply_overrides(Outer(), {1: 2})


def test_parse_settings_reads_yaml_values_and_names_the_option():
    assert parse_settings(["k=0.3", "inner.steps=1e3", "kind=b", "x=[1, 2]"]) == \
        {"k": 0.3, "inner.steps": "1e3", "kind": "b", "x": [1, 2]}
    with pytest.raises(ValueError, match=r"--variant takes KEY=VALUE\[,KEY=VALUE...\], got 'mix'; e.g. a=1"):
        parse_settings(["mix"], "--variant", form="KEY=VALUE[,KEY=VALUE...]", example="a=1")
    with pytest.raises(ValueError, match=r"--set k: cannot read '\[1' as a value"):
        parse_settings(["k=[1"])


@pytest.mark.parametrize("text, message", [
    ("a: &x [1, 2]\nb: *x\n", "aliases"),
    ("1: 2\n", "setting names are text, got 1"),
    ("a:\n" + "".join(f"  k{i}: {i}\n" for i in range(1001)), "more than 1000 keys"),
    ("a: " + "[" * 20 + "]" * 20 + "\n", "nests deeper than 8 levels"),
    ("a: 1\na: 2\n", r"key\(s\) \['a'\] appear more than once"),
])
def test_config_files_are_bounded(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config_file(path)


def test_a_huge_config_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes(b"{" + b" " * (2 << 20) + b"}")
    with pytest.raises(ValueError, match=r"is larger than 1048576 bytes"):
        load_config_file(path)


@pytest.mark.parametrize("kind, changes, message", [
    ("tune", {"min_model_speedup": 10**400}, "setting 'min_model_speedup' must be a number, got 1000"),
    ("train", {"lr": -(10**400)}, r"lr \(the peak learning rate\) must be in \(0, 1\), got -1000"),
    ("train", {"lr": 10**400}, r"lr \(the peak learning rate\) must be in \(0, 1\), got 1000"),
])
def test_an_integer_past_a_floats_range_is_one_error_not_an_overflow(kind, changes, message):
    # attack 2026-12-07f row 646: OverflowError (int too large to convert to float) from the settings mechanism
    from tdcdiff.train import TrainConfig
    from tdcdiff.tune import TuneConfig

    with pytest.raises(ValueError, match=rf"^{message}"):
        (TuneConfig if kind == "tune" else TrainConfig)(**changes).validate()
