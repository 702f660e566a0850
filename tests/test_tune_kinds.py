"""The registry of tune's candidate kinds: an unknown kind is an error naming the known ones, wherever it comes
from, and every registered kind has candidates, a check, and a style of its own in the frontier plot."""

import pytest
from matplotlib.colors import is_color_like
from matplotlib.markers import MarkerStyle

from conftest import tiny_config
from tdcdiff.tune import KINDS, Tune, TuneConfig, candidate_list, kind_of
from tdcdiff.tune.output import BASE_STYLE, frontier_series

UNKNOWN = r"unknown candidate kind 'base-model'; the known kinds are single, uniform, tdc, tdc-curves \("
# Every kind on: each registered kind must give candidates under it (a new kind adds its settings here).
EVERYTHING = TuneConfig(widths=(0.6,), uniform_time_budgets=(0.7,), ks=(0.4,), groups=(2,), time_budgets=(0.8,),
                        curves=True, depth=True)


def test_an_unknown_kind_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=UNKNOWN):
        kind_of("base-model")
    assert kind_of("tdc") is KINDS["tdc"]


def test_a_candidate_of_an_unknown_kind_is_refused_before_any_work(tmp_path):
    """Never trained as some default: refused before the candidate list is written or the base trained."""
    tune = Tune(tmp_path / "t", TuneConfig(widths=(), ks=(), groups=(2,)), run_config=tiny_config(), progress=False)
    tune.candidates[0] = {**tune.candidates[0], "kind": "base-model"}  # as a typo or another version would have it
    with pytest.raises(ValueError, match=UNKNOWN):
        tune.run_candidate(0)
    assert not (tmp_path / "t" / "tune.json").exists() and not (tmp_path / "t" / "base" / "base").exists()


def test_a_result_of_an_unknown_kind_is_not_left_out_of_the_plot():
    rows = [{"name": "base", "kind": "base", "index": None}, {"name": "x", "kind": "base-model", "index": 1}]
    with pytest.raises(ValueError, match=UNKNOWN):
        frontier_series(rows)


def test_every_registered_kind_has_candidates_and_a_plot_style_of_its_own():
    candidates = candidate_list(EVERYTHING)
    assert {c["kind"] for c in candidates} == set(KINDS)
    assert len({c["name"] for c in candidates}) == len({c["dir"] for c in candidates}) == len(candidates)
    for name, kind in KINDS.items():
        assert kind.name == name
        color, marker = kind.style
        assert is_color_like(color) and marker in MarkerStyle.markers, (name, kind.style)
    styles = [BASE_STYLE, *(kind.style for kind in KINDS.values())]
    assert len(set(styles)) == len(styles)  # each kind can be told apart in the plot
    rows = [{"name": "base", "kind": "base", "index": None}] + candidates
    series = frontier_series(rows)
    assert [label for label, *_ in series] == ["base", *KINDS]
    assert all(style == kind_of(label).style and members for label, style, members in series[1:])


def test_every_kind_checks_its_candidates_against_the_base_run():
    config = tiny_config()
    for spec in candidate_list(EVERYTHING):
        kind_of(spec["kind"]).check(spec, config)  # all fine on the tiny run
    curves = next(c for c in candidate_list(EVERYTHING) if c["kind"] == "tdc-curves")
    with pytest.raises(ValueError, match="its budget unit is time"):
        KINDS["tdc-curves"].check({**curves, "settings": {**curves["settings"], "budget_unit": "time"}}, config)


def test_a_kind_added_later_goes_last_and_its_names_may_not_clash(monkeypatch):
    """A kind is one class and one registry entry: its candidates follow every existing one (so tune directories
    made before it keep their indices), and a name clash with another candidate or the base is refused."""
    from tdcdiff.tune.kinds import kind as kind_module

    class Extra(kind_module.Kind):
        name, style = "extra", ("tab:green", "D")

        def __init__(self, names):
            self.names = names

        def candidates(self, config):
            return [(kind_module.LATER, {"name": n}) for n in self.names]

        def train(self, tune, spec, out):
            raise AssertionError("not trained here")

    before = candidate_list(EVERYTHING)
    monkeypatch.setitem(KINDS, "extra", Extra(["extra 1"]))
    after = candidate_list(EVERYTHING)
    assert after[:-1] == before and after[-1]["kind"] == "extra" and after[-1]["index"] == len(before)
    for clash in ("base", "single"):
        monkeypatch.setitem(KINDS, "extra", Extra([clash]))
        with pytest.raises(ValueError, match="candidate names must be unique and not 'base'"):
            candidate_list(EVERYTHING)
