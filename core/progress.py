"""Progress output: whether the inner progress bars (epochs, batches) show, and lines that
never tear a bar.

A sweep shows one progress bar (tasks done / total); the bars of one training run or one
unlearning run below it only show with ``-v``. Lines go through ``tqdm.write``, which clears the
bars, prints the line and redraws them.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

# None: tqdm's own rule (shown on a terminal); True: never shown
_inner_disabled: bool | None = None


def inner_bars_disabled() -> bool | None:
    """The ``disable`` argument of an inner bar (a training or unlearning loop's)."""
    return _inner_disabled


def show_inner_bars(show: bool) -> None:
    """Show the inner bars (on a terminal) or never."""
    global _inner_disabled
    _inner_disabled = None if show else True


def say(line: str) -> None:
    """Print one line to stderr above any progress bar."""
    tqdm.write(line, file=sys.stderr)


__all__ = ["inner_bars_disabled", "say", "show_inner_bars"]
