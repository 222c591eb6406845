"""How every CLI module reports a user error: one `error: ...` line on stderr and the error's exit code.

Shared by `gentrace.cli` and `gentrace.analyze_cli` (which `cli` imports, so it cannot import `cli`).
Only GentraceError is caught: any other exception keeps its traceback (it is a bug).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer

from gentrace.errors import GentraceError

F = TypeVar("F", bound=Callable[..., Any])


def error_line(message: str) -> None:
    """Print `error: message` on stderr."""
    typer.echo(f"error: {message}", err=True)


def user_errors(fn: F) -> F:
    """Turn GentraceError into one stderr line and its exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GentraceError as exc:
            error_line(str(exc))
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]
