import pytest
import torch


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


@pytest.fixture(scope="session")
def scheduler():
    from tdcdiff.schedule import make_scheduler

    return make_scheduler(1000)
