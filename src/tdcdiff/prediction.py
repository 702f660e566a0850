"""What a denoiser's output predicts, by diffusers' names: the noise epsilon, the velocity v (Salimans & Ho 2022,
"Progressive Distillation", v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0) or the clean sample x0.

Kept apart from schedule.py (which imports torch and diffusers) so the CLI's option checks stay light.
"""

from __future__ import annotations

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(value, name: str = "prediction_type") -> None:
    """Raise ValueError unless value is one of PREDICTION_TYPES, the ones diffusers' beta schedulers take (they check
    it only inside step(), after a model call; a training target took any other value for "sample")."""
    if not isinstance(value, str) or value not in PREDICTION_TYPES:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, PREDICTION_TYPES))} (diffusers' names: "
                         f"v-prediction is 'v_prediction'), got {value!r}")
