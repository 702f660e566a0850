"""What this machine can hold: the memory available now, and refusing a request whose tensors would not fit it
before any work is done (the data set, a model's weights, one training batch, the images of one sampling run).

The sizes are estimates in float32 (what tdcdiff computes in); a request is refused only when the estimate is over
what the machine has available, so they err towards letting a run start. Imports nothing of tdcdiff.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

FLOAT_BYTES = 4  # float32
# Stated maxima, for counts fixed before the data's image size (and so their memory) is known:
MAX_GRID_IMAGES = 10_000  # one sample grid is one PNG to look at; 10,000 cells of >= 64 px are ~7,000 px wide
MAX_FID_IMAGES = 50_000  # images per FID: FID-50k, the field's usual count (Karras et al. 2019, Dhariwal & Nichol 2021)
MAX_FID_SEEDS = 100  # seeds of one FID comparison: each samples and scores a full FID set; a spread needs a few
SEEDS_LIMIT = (f"a stated maximum: each seed samples and scores a whole FID set, and the spread over seeds needs a "
               f"few; {MAX_FID_SEEDS} is far beyond that")
GRID_LIMIT = (f"a stated maximum: a sample grid is one PNG to look at, and {MAX_GRID_IMAGES:,} images in cells of at "
              "least 64 pixels make it some 7,000 pixels wide")
FID_LIMIT = f"a stated maximum: {MAX_FID_IMAGES:,} images per seed is FID-50k, the field's usual count"
# weights, gradients, AdamW's two moments and the EMA copy: what training keeps per parameter
TRAINING_COPIES = 5
# one training batch's own tensors, each of the batch's shape: clean images, noise, noisy inputs, targets, outputs
BATCH_TENSORS = 5


def available_memory() -> int | None:
    """Bytes of memory this process can still use: the kernel's MemAvailable, lowered to what is left of a
    cgroup's limit (containers); None where neither can be read (no check is made then)."""
    values = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                values.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    cgroup = Path("/sys/fs/cgroup")
    for limit, usage in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes",
                                                             "memory/memory.usage_in_bytes")):
        try:
            cap = (cgroup / limit).read_text().strip()
            if cap != "max":
                values.append(max(0, int(cap) - int((cgroup / usage).read_text())))
        except (OSError, ValueError):
            pass
    if not values and hasattr(os, "sysconf"):
        try:
            values.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return min(values) if values else None


def gib(nbytes: float) -> str:
    """A byte count as GiB (MiB below one GiB), for messages."""
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def check_memory(need: int, what: str, fix: str, error: type[ValueError] = ValueError) -> None:
    """Raise `error` (a ValueError) "`what` needs about X GiB, more than the Y GiB of memory this machine has
    available now; `fix`" when `need` bytes exceed available_memory(): before anything is allocated, since an
    allocation the machine cannot hold may be killed by the kernel rather than fail. Nothing is checked where the
    memory is unknown."""
    have = available_memory()
    if have is not None and need > have:
        raise error(f"{what} needs about {gib(need)}, more than the {gib(have)} of memory this machine has "
                         f"available now; {fix}")


def tensor_bytes(count: int, shape: tuple[int, ...]) -> int:
    """Bytes of `count` float32 tensors of `shape`."""
    size = count * FLOAT_BYTES
    for dim in shape:
        size *= dim
    return size


def check_sampling_memory(num_images: int, sample_shape: tuple[int, ...], *, what: str = "",
                          fix: str = "sample fewer images (num_images, --num)") -> None:
    """Refuse (ValueError) sampling `num_images` images of `sample_shape` when their initial noise and the images,
    both kept as float32 for the whole run (pipeline.sample), do not fit in memory. what: the message's subject
    (default: "sampling N images of CxHxW (...)")."""
    shape = "x".join(map(str, sample_shape))
    check_memory(2 * tensor_bytes(num_images, sample_shape),
                 what or f"sampling {num_images} images of {shape} (their initial noise and the images, kept as "
                         "float32)", fix)


def activation_bytes(model: nn.Module, sample_shape: tuple[int, int, int], batch_size: int, *, timestep: int = 0,
                     class_labels: bool = False) -> int | None:
    """Bytes of the outputs of every leaf module in one forward pass of `batch_size` samples: about what autograd
    keeps for the backward pass. Run on the meta device (no memory, no compute; the weights are swapped for meta
    tensors for the call), so any size can be asked for; the model's own forward hooks do not run. None when the
    model cannot run on meta tensors (e.g. it makes tensors of its own on the CPU)."""
    from torch.func import functional_call

    total = 0

    def count(module, inputs, output):
        nonlocal total
        for out in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(out, torch.Tensor):
                total += out.numel() * out.element_size()

    meta = {name: torch.empty_like(t, device="meta") for name, t in [*model.named_parameters(), *model.named_buffers()]}
    # The caller's own forward hooks are set aside for this pass: they count or record real calls, not estimates.
    modules = [(m, m._forward_pre_hooks, m._forward_hooks) for m in model.modules()]
    for m, _, _ in modules:
        m._forward_pre_hooks, m._forward_hooks = type(m._forward_pre_hooks)(), type(m._forward_hooks)()
    for m, _, _ in modules:
        if not any(True for _ in m.children()):
            m.register_forward_hook(count)
    try:  # a batch too large for torch's sizes (over 2**63 bytes) has no estimate either
        x = torch.empty((batch_size, *sample_shape), device="meta")
        t = torch.full((batch_size,), timestep, dtype=torch.long, device="meta")
        kwargs = {"class_labels": torch.zeros(batch_size, dtype=torch.long, device="meta")} if class_labels else {}
        with torch.no_grad():
            functional_call(model, meta, (x, t), kwargs)
    except Exception:  # noqa: BLE001 - any model code may refuse meta tensors; then there is no estimate
        return None
    finally:
        for m, pre_hooks, hooks in modules:
            m._forward_pre_hooks, m._forward_hooks = pre_hooks, hooks
    return total


def check_training_memory(model: nn.Module, sample_shape: tuple[int, int, int], batch_size: int, *, what: str,
                          fix: str, class_labels: bool = False) -> None:
    """Refuse (ValueError naming `what` and `fix`) training `model` on batches of `batch_size` samples of
    `sample_shape` when its weights, gradients, AdamW moments and EMA (TRAINING_COPIES float32 copies of every
    parameter) and one batch's activations (activation_bytes; at least the batch's own BATCH_TENSORS tensors, also
    where the model gives no estimate) need more memory than this machine has available.
    `model` may live on the meta device (built there to be checked before its weights exist)."""
    params = sum(p.numel() for p in model.parameters())
    state = params * FLOAT_BYTES * TRAINING_COPIES
    activations = max(activation_bytes(model, sample_shape, batch_size, class_labels=class_labels) or 0,
                      tensor_bytes(BATCH_TENSORS * int(batch_size), sample_shape))  # at least the batch's
    shape = "x".join(str(d) for d in sample_shape)
    check_memory(state + activations,
                 f"training {what} ({params:,} parameters: {gib(state)} for weights, gradients, AdamW moments and "
                 f"EMA; one batch of {batch_size} images of {shape}: about {gib(activations)} of activations)", fix)
