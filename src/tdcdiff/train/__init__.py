"""Training a denoiser for both TDC stages (the base model on all t; each group's model on its own t), on accelerate.

    config.py      TrainConfig (settings, learning-rate schedule), TrainResult, TrainingDiverged
    batch.py       class labels checked against the model; each step's seeded batch
    distill.py     feature points and the FeatureDistiller (stage 2 distillation from a teacher)
    cost.py        training FLOPs per step
    checkpoint.py  the training directory: checkpoint/, final/, train.json and the run's fingerprint
    log.py         log.jsonl
    loop.py        Trainer (a class of small steps, as improved-diffusion's TrainLoop) and `train`
"""

from .batch import conditioning
from .checkpoint import CHECKPOINT_DIR, FINAL_DIR, LOG_FILE, SUMMARY_FILE
from .config import TrainConfig, TrainingDiverged, TrainResult
from .cost import step_flops
from .distill import FEATURE_POINTS, FeatureDistiller, feature_points
from .log import LOSS_BUCKETS
from .loop import Trainer, train

__all__ = [
    "CHECKPOINT_DIR", "FEATURE_POINTS", "FINAL_DIR", "LOG_FILE", "LOSS_BUCKETS", "SUMMARY_FILE", "FeatureDistiller",
    "TrainConfig", "TrainResult", "Trainer", "TrainingDiverged", "conditioning", "feature_points", "step_flops",
    "train",
]
