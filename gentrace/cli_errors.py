"""How every CLI module reports a user error: one `error: ...` line on stderr and the error's exit code.

Shared by `gentrace.cli` and `gentrace.analyze_cli` (which `cli` imports, so it cannot import `cli`).
Only GentraceError is caught: any other exception keeps its traceback (it is a bug).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer

from gentrace.errors import GentraceError

F = TypeVar("F", bound=Callable[..., Any])


def torchrun_worker() -> bool:
    """Whether this process is a rank other than 0 of a torchrun launch: it prints nothing, rank 0 speaks for all."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0


def error_line(message: str) -> None:
    """Print `error: message` on stderr (rank 0 only under torchrun: every rank usually fails alike)."""
    if not torchrun_worker():
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
