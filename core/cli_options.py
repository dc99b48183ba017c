"""Command-line options that several entry points share, each defined once.

``main.py``, ``train.py``, the analysis commands and the bench scripts all take ``--device``,
``--data-dir`` and friends; defining them here keeps their spelling, defaults and help the same
everywhere. The analysis modules build their own parsers and sit below the command-line layer,
so these helpers live in ``core``, which every layer may import.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from core.errors import UserError


def new_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose ``--help`` shows the module docstring as written (examples included)."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: auto)")


def add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None, help="default: $DATA_DIR or ./data")


def add_checkpoints(p: argparse.ArgumentParser, *, search: bool = False) -> None:
    """``--checkpoints``: the cache folder to write to, or (``search``) folders to look in."""
    if search:
        p.add_argument("--checkpoints", type=Path, action="append", default=[],
                       help="where to look for base and oracle checkpoints (repeatable)")  # fmt: skip
    else:
        p.add_argument("--checkpoints", type=Path, default=Path("checkpoints"),
                       help="where base checkpoints and oracles are cached (%(default)s)")  # fmt: skip


def add_out(p: argparse.ArgumentParser, help: str, default: Path | None = None) -> None:
    p.add_argument("--out", type=Path, default=default, help=help)


def add_samples(p: argparse.ArgumentParser, default: int, help: str) -> None:
    p.add_argument("-S", "--samples", type=int, default=default, help=f"{help} (%(default)s)")


def add_feature_io(
    p: argparse.ArgumentParser, *, folder: str, samples: int, samples_help: str, out: str
) -> None:
    """``-D`` (the folder read), ``-S`` (the sample size) and ``--out`` of a feature command."""
    p.add_argument("-D", "--dir", type=Path, required=True, help=folder)
    add_samples(p, samples, samples_help)
    add_out(p, out)


FIG_FORMATS = ("pdf", "png", "svg")


def fig_formats(text: str) -> tuple[str, ...]:
    """``--fig-format``: a comma-separated subset of FIG_FORMATS, in FIG_FORMATS order."""
    chosen = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in chosen if f not in FIG_FORMATS]
    if bad or not chosen:
        raise UserError(
            f"--fig-format {text!r} is invalid: {bad[0] if bad else 'nothing'} is not a figure "
            f"format; use a comma-separated subset of {','.join(FIG_FORMATS)}"
        )
    return tuple(f for f in FIG_FORMATS if f in chosen)


def add_fig_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fig-format", type=fig_formats, default=FIG_FORMATS, metavar="LIST",
                   help="figure files to write, comma-separated subset of pdf,png,svg (default: "
                        "all three; the HTML report shows svg, else png)")  # fmt: skip


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: auto)")


def apply_threads(threads: int | None) -> None:
    """Set torch's CPU thread count; timings and numbers depend on it, so it is a flag."""
    if threads is None:
        return
    if threads < 1:
        raise UserError(f"--threads {threads} is invalid; use a positive integer")
    torch.set_num_threads(threads)
