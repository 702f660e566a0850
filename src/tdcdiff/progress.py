"""Progress bars for long work: shown on a terminal, never written into a log file (every redraw would be)."""

from __future__ import annotations


def progress_bar(*, total: int, desc: str, enabled: bool = True, initial: int = 0):
    """A tqdm bar of `total` steps: when enabled, shown only if stderr is a terminal (tqdm's disable=None)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=None if enabled else True)
