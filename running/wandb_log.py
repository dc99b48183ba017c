"""Weights & Biases logging that never stops an experiment.

The API key comes from the environment or a ``.env`` file (``WANDB_API_KEY``; the SalUn
DeepDive name ``WANDB_SECRET`` is accepted too). Without a key, or when the service cannot be
reached, logging falls back to offline mode with one warning; ``disabled`` logs nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MODES = ("online", "offline", "disabled")
_SECRET_KEYS = ("WANDB_API_KEY", "WANDB_SECRET")


def _load_env() -> None:
    try:
        from dotenv import find_dotenv, load_dotenv
    except ImportError:  # python-dotenv is in requirements; stay usable without it
        return
    # the .env of the folder the user runs from (not of this file's folder)
    load_dotenv(find_dotenv(usecwd=True), override=False)
    if not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_SECRET"):
        os.environ["WANDB_API_KEY"] = os.environ["WANDB_SECRET"]


def _scrub(value: Any) -> Any:
    """Drop anything that looks like a secret before it reaches a config dict."""
    if isinstance(value, dict):
        return {
            k: _scrub(v)
            for k, v in value.items()
            if not any(s in str(k).upper() for s in ("SECRET", "API_KEY", "TOKEN", "PASSWORD"))
        }
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


class WandbLogger:
    """One W&B run per experiment x seed, grouped by experiment."""

    def __init__(self, mode: str, project: str, directory: Path) -> None:
        if mode not in MODES:
            raise ValueError(f"wandb mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.project = project
        self.directory = directory
        self.run: Any = None
        self._warned = False
        if mode == "online":
            _load_env()
            if not os.environ.get("WANDB_API_KEY"):
                self._warn("no WANDB_API_KEY (or WANDB_SECRET) found; logging offline")
                self.mode = "offline"

    def _warn(self, msg: str) -> None:
        if not self._warned:
            print(f"warning: W&B: {msg}", file=sys.stderr)
            self._warned = True

    def start(self, name: str, group: str, config: dict[str, Any]) -> None:
        if self.mode == "disabled":
            return
        import wandb

        self.directory.mkdir(parents=True, exist_ok=True)
        kwargs = dict(
            project=self.project,
            name=name,
            group=group,
            config=_scrub(config),
            dir=str(self.directory),
            reinit="finish_previous",
        )
        try:
            self.run = wandb.init(
                mode=self.mode,  # type: ignore[arg-type]  # one of MODES, checked above
                settings=wandb.Settings(init_timeout=30),
                **kwargs,
            )
        except Exception as e:  # no network, bad key, service down: keep the experiment going
            if self.mode == "offline":
                self._warn(f"could not start ({e}); logging disabled")
                self.mode = "disabled"
                return
            self._warn(f"could not reach the service ({e.__class__.__name__}); logging offline")
            self.mode = "offline"
            self.run = wandb.init(mode="offline", **kwargs)

    def log(self, row: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float))})

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if self.run is None:
            return
        if summary:
            for k, v in summary.items():
                if isinstance(v, (int, float, str)):
                    self.run.summary[k] = v
        self.run.finish()
        self.run = None

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], config: dict) -> None:
        """Log the final summary table as a run of its own."""
        if self.mode == "disabled":
            return
        import wandb

        self.start(name, "summary", config)
        if self.run is not None:
            self.run.log({name: wandb.Table(columns=list[Any](columns), data=rows)})
        self.finish()


def log_images(
    images: Mapping[str, tuple[Path, str]],
    mode: str,
    project: str,
    directory: Path,
    name: str,
) -> int:
    """Log figures as W&B images, ``{key: (PNG path, caption)}``, to the active run, else to a
    new run `name`. W&B shows raster images, so these are the PNGs. Nothing when `mode` is
    ``disabled``; never raises. Returns how many images were logged."""
    if mode == "disabled" or not images:
        return 0
    try:
        import wandb

        logged = {
            k: wandb.Image(str(path), caption=caption) for k, (path, caption) in images.items()
        }
        if wandb.run is not None:
            wandb.run.log(logged)
            return len(logged)
        logger = WandbLogger(mode, project, directory)
        logger.start(name, "report", {"run_folder": str(directory)})
        if logger.run is None:
            return 0
        logger.run.log(logged)
        logger.finish()
        return len(logged)
    except Exception as e:  # logging is a convenience: the files on disk are what counts
        print(f"warning: W&B: figures not logged ({e.__class__.__name__}: {e})", file=sys.stderr)
        return 0
