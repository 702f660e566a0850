"""The device checks shared by the run's settings (run/config.py, which must not import torch at module level:
`tdcdiff --help` stays fast) and the public API (models.torch_device): a CUDA device visible to this process, a
device of another type that this torch build and machine have, and inputs that hold data (not on the meta device)."""

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


def check_device_usable(device, label: str, fix: str) -> None:
    """Raise ValueError unless torch can put tensors on `device` (a torch.device) here: CUDA as check_cuda_visible
    says; another accelerator type ('mps', 'xpu', ...) only when it is the one torch reports available
    (torch.accelerator.current_accelerator, or torch.backends.mps for MPS), since torch parses every known type and
    fails only when a model is moved there. label, fix: as check_cuda_visible's."""
    import torch

    if device.type == "cuda":
        check_cuda_visible(device.index or 0, label, fix)
        return
    accelerator = torch.accelerator.current_accelerator(check_available=True) if hasattr(torch, "accelerator") else None
    usable = {"cpu", "meta", *([accelerator.type] if accelerator is not None else []),
              *(["mps"] if torch.backends.mps.is_available() else [])}
    if device.type not in usable:
        raise ValueError(f"{label} is not available here: this torch build and machine have "
                         f"{', '.join(repr(u) for u in sorted(usable - {'meta'}))} (torch.accelerator reports "
                         f"{accelerator.type if accelerator is not None else 'no accelerator'}); {fix}")


def check_holds_data(inputs: dict, fix: str) -> None:
    """Raise ValueError for a tensor among `inputs` (name -> value; other values are skipped) on the meta device,
    which has shapes but no values (torch's Tensor.item raised deep inside). fix: what to give instead."""
    for name, value in inputs.items():
        if getattr(getattr(value, "device", None), "type", None) == "meta":
            raise ValueError(f"{name} are on device 'meta', which holds no data: {fix}")
