"""How every CLI module reports a user error: one `error: ...` line on stderr and the error's exit code.

Shared by `gentrace.cli` and `gentrace.cli.analyze` (which `cli` imports, so it cannot import `cli`).
Only GentraceError is caught, and an OSError that names a file (a read-only mount, a full disk: one line
naming the file); any other exception keeps its traceback (it is a bug).

A click/typer usage error (a bad option value) becomes one line too (`usage_message`), the closest
choice suggested.

Under torchrun rank 0 prints as a single process would. The other ranks print their own errors as
`error: [rank N] message`: data must be readable on every node, so a rank may fail where rank 0 did
not (torchrun itself then reports only that a child failed). The exception is
`gentrace.core.errors.PeerFailed`, the error of a rank that stops because rank 0 failed and printed why.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer

from gentrace.core.errors import ConfigError, GentraceError, PeerFailed, did_you_mean

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


# A path the file system refuses (bad input, exit 2), with the fix; anything else failed under a running command
HINTS = {
    errno.EACCES: "check its permissions or give another path",
    errno.EPERM: "check its permissions or give another path",
    errno.EROFS: "give a path on a writable file system",
    errno.ENOTDIR: "a file is where a directory should be; give another path",
    errno.EISDIR: "it is a directory; give a file name",
    errno.ENOENT: "check the path",
}
FULL = {errno.ENOSPC, errno.EDQUOT}
# zarr writes `<file>` as `<file without suffix>.<uuid4 hex>.partial`, then renames it; only zarr.json has a suffix
PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


def file_error(exc: OSError) -> GentraceError | None:
    """An OSError naming a file as one user error, `cannot write FILE: reason; fix`; None when it names no file.

    Exit 2 when the file system refuses a path (permissions, read-only, a file in the way), 1 when it
    fails under a running command (disk full, I/O error). zarr's temporary `.partial` name becomes the
    file it stands for.
    """
    if exc.filename is None:
        return None
    filename = exc.filename
    name = os.fsdecode(filename) if isinstance(filename, str | bytes | os.PathLike) else str(filename)
    if PARTIAL.search(name):
        name = PARTIAL.sub("", name)
        name += ".json" if os.path.basename(name) == "zarr" else ""
    code = exc.errno or 0
    verb = "write" if code in FULL or code == errno.EROFS else "use"
    reason = exc.strerror or str(exc)
    if code in FULL:
        return GentraceError(f"cannot {verb} {name}: {reason}; free some space and run the command again")
    if code in HINTS:
        return ConfigError(f"cannot {verb} {name}: {reason}; {HINTS[code]}")
    return GentraceError(f"cannot {verb} {name}: {reason}")


def user_errors(fn: F) -> F:
    """Turn GentraceError, and an OSError naming a file, into one stderr line (see `report`) and its exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GentraceError as exc:
            report(exc)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            error = file_error(exc)
            if error is None:
                raise
            report(error)
            raise typer.Exit(error.exit_code) from None

    return wrapper  # type: ignore[return-value]


# typer >= 0.2x coerces values with pydantic, whose message for a ValueError starts with this
PYDANTIC_PREFIX = re.compile(r"^(Value error|Assertion failed), ")
# a choice option's value that is none of the choices (typer's and click's wording alike)
NOT_ONE_OF = re.compile(r"(?P<given>'[^']*') is not one of (?P<choices>'.*')\.?$")


def usage_message(exc: Exception) -> str:
    """A click/typer usage error as one line without pydantic's `Value error, ` and with the closest choice.

    `Invalid value for '--kind': 'crosss' is not one of 'overlap', 'cross', ...; did you mean `cross`?`
    (typer itself already suggests the closest command for an unknown one).
    """
    message = getattr(exc, "message", None)
    if isinstance(message, str):
        given = PYDANTIC_PREFIX.sub("", message)
        match = NOT_ONE_OF.search(given)
        if match:
            choices = re.findall(r"'([^']*)'", match["choices"])
            guess = did_you_mean(match["given"][1:-1], choices).strip()
            if guess:
                given = f"{given[: match.end('choices')]}; {guess}"
        exc.message = given  # type: ignore[attr-defined]  # format_message() puts the option name before it
    return str(exc.format_message()) if hasattr(exc, "format_message") else str(exc)
