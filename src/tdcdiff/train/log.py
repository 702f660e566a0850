"""log.jsonl: the mean losses of every log_every steps, overall and per timestep bucket.

Each line: {"step": steps done, "loss": mean loss of the window, "lr": the last step's learning rate,
"loss_by_t_bucket": LOSS_BUCKETS means of the per-sample loss by t (bucket t * LOSS_BUCKETS // T; null where no
sample fell), "feature_loss": mean feature-distillation loss (only when distilling features)}.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files import MAX_RECORD_BYTES, atomic_write_text, is_count, name_write_errors, parse_json, read_untrusted

LOSS_BUCKETS = 10


def truncate_log(path: Path, last_step: int) -> None:
    """Drop the lines after `last_step`: those a crashed run wrote after its last checkpoint (and a last line cut
    short by a kill or a full disk).

    Raises ValueError naming the file, the line and the fix for any other line that is not a log record.
    """
    if not path.exists():
        return
    hint = f"delete {path} (the loss log; training resumes from its checkpoint without its earlier lines)"
    text = read_untrusted(path.parent, path.name, str(path), max_bytes=MAX_RECORD_BYTES, hint=hint).decode(
        "utf-8", "replace")
    lines = text.splitlines()
    if lines and not text.endswith("\n"):  # a line whose writing was cut short
        lines.pop()
    kept = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            record = parse_json(line, f"{path} line {number}", hint)
            if not isinstance(record, dict) or not is_count(record.get("step")):
                raise ValueError(f"{path} line {number} is not a log record ({{\"step\": <integer>, ...}}); {hint}")
            if record["step"] <= last_step:
                kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


class TrainingLog:
    """The window of losses since the last line, and the file it goes to (None: a process that keeps no log,
    as every accelerate process but the main one; it still collects, and writes nothing).

    num_train_timesteps: T of the schedule, to put each sample's t in its bucket.
    """

    def __init__(self, path: Path | None, num_train_timesteps: int):
        self.path = path
        self.file = open(path, "a") if path is not None else None
        self.num_train_timesteps = num_train_timesteps
        self._reset()

    def _reset(self) -> None:
        self.losses, self.feature_losses = [], []
        self.buckets = [[] for _ in range(LOSS_BUCKETS)]

    def add(self, loss: float, t: torch.Tensor, per_sample: torch.Tensor, feature_loss: float | None = None) -> None:
        """One step: its loss (mean over all processes), its timesteps (B,) and per-sample losses (B,) on this
        process, its feature loss (mean over all processes) when distilling features."""
        self.losses.append(loss)
        if feature_loss is not None:
            self.feature_losses.append(feature_loss)
        for bucket, value in zip((t * LOSS_BUCKETS // self.num_train_timesteps).tolist(), per_sample.detach().tolist()):
            self.buckets[bucket].append(value)

    def write(self, step: int, lr: float) -> None:
        """Write the window as the line of `step` (steps done) and start a new window."""
        if self.file is not None:
            record = {
                "step": step,
                "loss": sum(self.losses) / len(self.losses),
                "lr": lr,
                "loss_by_t_bucket": [sum(b) / len(b) if b else None for b in self.buckets],
                **({"feature_loss": sum(self.feature_losses) / len(self.feature_losses)}
                   if self.feature_losses else {}),
            }
            with name_write_errors(self.path, atomic=False):  # a full disk or `ulimit -f`: one line naming the log
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
        self._reset()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
