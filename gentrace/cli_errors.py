"""How every CLI module reports a user error: one `error: ...` line on stderr and the error's exit code.

Shared by `gentrace.cli` and `gentrace.analyze_cli` (which `cli` imports, so it cannot import `cli`).
Only GentraceError is caught: any other exception keeps its traceback (it is a bug).

Under torchrun rank 0 prints as a single process would. The other ranks print their own errors as
`error: [rank N] message`: data must be readable on every node, so a rank may fail where rank 0 did
not (torchrun itself then reports only that a child failed). The exception is
`gentrace.errors.PeerFailed`, the error of a rank that stops because rank 0 failed and printed why.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer

from gentrace.errors import GentraceError, PeerFailed

F = TypeVar("F", bound=Callable[..., Any])


def torchrun_worker() -> bool:
    """Whether this process is a rank other than 0 of a torchrun launch: rank 0 speaks for all but its own errors."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0


def error_line(message: str) -> None:
    """Print `error: message` on stderr, rank 0 only under torchrun: for what befalls every rank alike (an interrupt).

    A rank's own GentraceError goes through `report` instead.
    """
    if not torchrun_worker():
        typer.echo(f"error: {message}", err=True)


def report(exc: GentraceError) -> None:
    """Print a user error: `error: message` on rank 0 (or a single process), `error: [rank N] message` on the others.

    A rank > 0 stays silent on PeerFailed: rank 0 failed first and its line says why.
    """
    if not torchrun_worker():
        typer.echo(f"error: {exc}", err=True)
        return
    if isinstance(exc, PeerFailed):
        return
    typer.echo(f"error: [rank {os.environ['RANK']}] {exc}", err=True)


def user_errors(fn: F) -> F:
    """Turn GentraceError into one stderr line (see `report`) and its exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GentraceError as exc:
            report(exc)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]
