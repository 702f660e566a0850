"""What a big model's timing costs: each distinct expert is timed once, the base once (cached on disk), a full-size
expert never, and a long forward is warmed up once and timed in a few rounds. Forwards are counted, not timed."""

import copy

import pytest
import torch
from torch import nn

from tdcdiff import latency
from tdcdiff.latency import LONG_FORWARD_REPEATS, ExpertTimer, compare

SHAPE = (1, 8, 8)


class Counted(nn.Module):
    """A convolution that counts its forwards."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv_in = nn.Conv2d(1, channels, 3, padding=1)
        self.conv_out = nn.Conv2d(channels, 1, 3, padding=1)
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return self.conv_out(self.conv_in(x))


@pytest.fixture()
def seconds_per_forward(monkeypatch):
    """latency's CPU timer made to report a fixed time per forward (the forwards still run and are counted)."""
    per_forward = {"value": 2.0}

    def timer(device):
        def run_and_report(run, calls):
            for _ in range(calls):
                run()
            return per_forward["value"]

        return run_and_report

    monkeypatch.setattr(latency, "_timer", timer)
    return per_forward


def test_a_long_forward_is_warmed_up_once_and_timed_in_a_few_rounds(seconds_per_forward):
    models = [Counted(), Counted(2)]
    compare(models, SHAPE, 4, repeats=7, warmup=2)
    assert [m.calls for m in models] == [1 + LONG_FORWARD_REPEATS] * 2  # one warm-up, then the rounds
    seconds_per_forward["value"] = 1e-3  # a short forward: the rounds and warm-ups asked for
    models = [Counted(), Counted(2)]
    times = compare(models, SHAPE, 4, repeats=7, warmup=2, min_seconds=0.0)
    assert [m.calls for m in models] == [2 + 7] * 2 and all(len(t) == 7 for t in times)


def test_each_distinct_expert_is_timed_once_the_base_once_and_a_full_size_one_never(tmp_path, monkeypatch,
                                                                                    seconds_per_forward):
    monkeypatch.setenv("TDCDIFF_CACHE", str(tmp_path))
    base = Counted(8)
    timer = ExpertTimer(base, SHAPE, 4, repeats=5, warmup=1)
    assert timer.ratio(copy.deepcopy(base)) == 1.0 and base.calls == 0  # the group whose budget is the whole base
    small, same = Counted(4), Counted(4)
    assert timer.ratio(small) == 1.0  # the fake timer reports the same seconds for every model
    assert timer.ratio(same) == 1.0 and same.calls == 0  # the same architecture: timed once
    assert small.calls == 1 + LONG_FORWARD_REPEATS and base.calls == 1 + LONG_FORWARD_REPEATS
    other = ExpertTimer(base, SHAPE, 4)  # another process or group job: the base's time comes from the cache
    other.ratio(Counted(2))
    assert base.calls == 1 + LONG_FORWARD_REPEATS
    assert len(list((tmp_path / "latency").glob("*.json"))) == 1


def test_a_given_base_time_is_used_as_it_is(seconds_per_forward):
    base = Counted(8)
    timer = ExpertTimer(base, SHAPE, 4, base_time=4.0)
    assert timer.ratio(Counted(4)) == 0.5 and base.calls == 0


@pytest.mark.usefixtures("counted_time")
def test_the_prune_stage_times_no_full_size_expert(tmp_path, monkeypatch):
    """k = 1: every group's budget is the whole base; its expert is the base and no forward is timed."""
    from conftest import tiny_config
    from tdcdiff.run import Run

    monkeypatch.setenv("TDCDIFF_CACHE", str(tmp_path / "cache"))
    timed = []
    monkeypatch.setattr(latency, "forward_seconds", lambda model, *a, **k: timed.append(model) or 1.0)
    config = tiny_config(k=1.0, ordering="snr-high-hard")
    config.base.steps = 2
    run = Run(tmp_path / "run", config, progress=False)
    run.train_base()
    summaries = run.prune()
    assert [s["time_ratio"] for s in summaries] == [1.0, 1.0] and timed == []
    assert torch.equal(run.load(tmp_path / "run" / "prune" / "group_0").conv_in.weight,
                       run.base_model().conv_in.weight)
