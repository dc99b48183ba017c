"""User-facing errors: one clear line, exit code 2, no traceback."""

from __future__ import annotations

import difflib
import functools
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar


class UserError(Exception):
    """Bad input from the user: the message is the whole story, so no traceback is shown."""


def closest(name: str, valid: Iterable[str]) -> str | None:
    """The valid choice the user most likely meant, or None.

    In order: the same name in another case; a name this one abbreviates (``epoch`` ->
    ``epochs``); a close spelling (``momentun`` -> ``momentum``); a name this one starts with
    (``temp`` -> ``T``). A loose spelling match comes last, so a short key is not matched to
    an unrelated long one that merely shares letters (``temp`` is not ``msteps``).
    """
    options = list(valid)
    low = {v.lower(): v for v in options}
    n = name.lower()
    if n in low:
        return low[n]
    longer = sorted((v for v in low if len(n) >= 2 and v.startswith(n)), key=len)
    if longer:
        return low[longer[0]]
    close = difflib.get_close_matches(n, list(low), n=1, cutoff=0.7)
    if close:
        return low[close[0]]
    shorter = sorted((v for v in low if n.startswith(v)), key=len, reverse=True)
    if shorter:
        return low[shorter[0]]
    close = difflib.get_close_matches(n, list(low), n=1, cutoff=0.5)
    return low[close[0]] if close and len(close[0]) > 1 and len(n) > 1 else None


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """A hint naming the closest valid choice, or an empty string."""
    close = closest(name, valid)
    return f" (did you mean '{close}'?)" if close else ""


def choices(valid: Iterable[str]) -> str:
    return ", ".join(sorted(valid))


F = TypeVar("F", bound=Callable[..., Any])


def cli(fn: F) -> F:
    """Run a command-line entry point: a UserError is one line on stderr and exit code 2; Ctrl-C
    is one line and exit code 130 (entry points with something to add catch it themselves)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
