import pytest
import torch

# The longest test (the README's quick start: one default `tdcdiff run`, about 15 CPU-minutes) goes first, so that
# with `-n 2` (CI) one process runs it while the other runs the rest, instead of starting it last.
FIRST = ("tests/test_readme.py",)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: not item.nodeid.startswith(FIRST))


@pytest.fixture(scope="session")
def digits():
    """scikit-learn digits, NCHW in [-1, 1]."""
    from tdcdiff.data import load_dataset

    return load_dataset("digits")


@pytest.fixture()
def tiny_unet():
    from tdcdiff.models import build_unet

    torch.manual_seed(0)
    return build_unet("digits-8")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: as fast, and two threads contend badly on a shared
    2-core machine (20-50x slower forwards measured). Use: pytestmark = pytest.mark.usefixtures("one_thread")."""
    from tdcdiff.latency import one_thread

    with one_thread():
        yield


@pytest.fixture()
def counted_time(monkeypatch):
    """Forward time counted from FLOPs, not measured (latency.clock "flops"): latency tables, time budgets and
    time ratios come out the same on any machine, however busy. Its tables are cached apart from measured ones."""
    monkeypatch.setenv("TDCDIFF_CLOCK", "flops")


@pytest.fixture(scope="session")
def scheduler():
    from tdcdiff.schedule import make_scheduler

    return make_scheduler(1000)


def tiny_config(**changes):
    """A RunConfig for the whole method at toy sizes (seconds on 2 cores)."""
    from tdcdiff.prune.search import SearchConfig
    from tdcdiff.run import RunConfig
    from tdcdiff.train import TrainConfig

    config = RunConfig(
        base=TrainConfig(steps=40, batch_size=32, lr=2e-3, warmup_steps=2, checkpoint_every=20, log_every=10),
        groups=2,
        k=0.4,
        search=SearchConfig(rounds=1, candidates_per_round=2),
        finetune=TrainConfig(steps=6, batch_size=32, lr=5e-4, warmup_steps=1, checkpoint_every=3, log_every=3),
        sample_steps=4,
        num_samples=8,
        eval_samples=32,
        eval_seeds=1,
    )
    for key, value in changes.items():
        setattr(config, key, value)
    return config


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """One finished tiny TDC run on digits, shared by the tests that only read it: (Run, run_all() result)."""
    from tdcdiff.run import Run

    run = Run(tmp_path_factory.mktemp("run") / "digits", tiny_config(), progress=False)
    return run, run.run_all()
