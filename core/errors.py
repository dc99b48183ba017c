"""User-facing errors: one clear line, exit code 2, no traceback."""

from __future__ import annotations

import difflib
import functools
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar


class UserError(Exception):
    """Bad input from the user: the message is the whole story, so no traceback is shown."""


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """A hint naming the closest valid choice, or an empty string."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def choices(valid: Iterable[str]) -> str:
    return ", ".join(sorted(valid))


F = TypeVar("F", bound=Callable[..., Any])


def cli(fn: F) -> F:
    """Run a command-line entry point, turning UserError into one line on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
