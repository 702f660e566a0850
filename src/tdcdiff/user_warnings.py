"""Warnings to the user of the library, pointing at their own line.

A fixed `stacklevel` points wherever the call happens to be nested (train() -> Trainer.run -> setup), usually
inside tdcdiff; warn() walks out of the package instead, so Python shows the caller's file and line (their
`train(...)` or `sample(...)` call). Imports nothing of tdcdiff.
"""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Decorators' wrappers between a tdcdiff function and its caller (torch.no_grad on sample()): walked through.
_WRAPPERS = (os.path.join("torch", "utils", "_contextlib.py"),)


def _ours(frame) -> bool:
    path = os.path.abspath(frame.f_code.co_filename)
    return path.startswith(_PACKAGE) or path.endswith(_WRAPPERS)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn(message, category) attributed to the innermost caller outside tdcdiff (the outermost frame
    when every frame is tdcdiff's)."""
    frame, level = sys._getframe(1), 2  # level 2: warn()'s caller
    while frame.f_back is not None and _ours(frame):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def called_by_user() -> bool:
    """Whether the function calling this was called from outside tdcdiff (the user's code), not by tdcdiff itself:
    a check of what the user gave (e.g. their noise schedule) is made where it enters, not again at every inner call."""
    frame = sys._getframe(2)
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).endswith(_WRAPPERS):
        frame = frame.f_back
    return not _ours(frame)
