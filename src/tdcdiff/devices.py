"""The device checks shared by the run's settings (run/config.py, which must not import torch at module level:
`tdcdiff --help` stays fast) and the public API (models.torch_device): a CUDA device visible to this process, and
inputs that hold data (not on the meta device)."""

from __future__ import annotations


def check_cuda_visible(index: int, label: str, fix: str) -> None:
    """Raise ValueError unless CUDA device `index` (0 for plain "cuda") is visible: a CPU build of torch, no GPU,
    or an index past the last. label: the setting as the user wrote it (e.g. "device 'cuda' (--device)");
    fix: how to change it there (e.g. "use --device cpu")."""
    import torch

    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    if index >= count:
        raise ValueError(f"{label} is not visible here: torch sees {count} CUDA device(s) (torch.cuda.is_available() "
                         f"is {available}); {fix}, or install a CUDA build of torch on a machine with a GPU")


def check_holds_data(inputs: dict, fix: str) -> None:
    """Raise ValueError for a tensor among `inputs` (name -> value; other values are skipped) on the meta device,
    which has shapes but no values (torch's Tensor.item raised deep inside). fix: what to give instead."""
    for name, value in inputs.items():
        if getattr(getattr(value, "device", None), "type", None) == "meta":
            raise ValueError(f"{name} are on device 'meta', which holds no data: {fix}")
