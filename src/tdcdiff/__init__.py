"""tdcdiff: TDC training with proxy-based pruning for diffusion models (arXiv 2312.13307).

Train one base denoiser, split the timesteps into groups, prune the base into a smaller model per group under
a FLOPs budget that grows with the group's difficulty, fine-tune each on its own timesteps, and route every
sampling step to its group's model.
"""

__version__ = "0.1.0"

_LAZY = {
    "load_bundle": "bundle", "save_bundle": "bundle", "Router": "router", "TDCPipeline": "pipeline",
    "sample": "pipeline", "Run": "run", "RunConfig": "run", "TrainConfig": "train", "train": "train",
    "load_dataset": "data", "build_unet": "models", "make_scheduler": "schedule", "count_flops": "flops",
    "make_groups": "grouping", "make_plan": "budget", "evaluate": "evaluate", "ModelEntry": "evaluate",
    "write_report": "report", "report_for_run": "run", "register_model_class": "serialization",
}


def __getattr__(name):
    # Imports stay lazy: diffusers and torch take seconds to import, and `tdcdiff --help` should not wait.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'tdcdiff' has no attribute {name!r}")


__all__ = sorted(_LAZY)
