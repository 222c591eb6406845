"""Next-step hints that run as printed: the program named the way this process was started.

After the README's set-up (`.venv/bin/gentrace record`, the venv not activated) a bare `gentrace`
is not on PATH, so a hint `gentrace info runs/x.zarr` would fail as printed. The hints name the
program as it was invoked instead (`.venv/bin/gentrace info runs/x.zarr`, relative when it was
invoked relatively), and `gentrace` only when PATH finds this very program; `python -m gentrace`
is named as such. Paths in hints are shell-quoted (shlex.quote), so a path with spaces runs too.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _same_directory(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two files lie in one directory, compared by path.

    A venv's python3 is a symlink to the system's: comparing the files themselves would take the
    system interpreter (without the venv's packages) for the venv's.
    """
    return os.path.abspath(os.path.dirname(a)) == os.path.abspath(os.path.dirname(b))


def python() -> str:
    """This interpreter as a command: `python` when PATH finds it, else as beside the invoked script, else its path.

    `.venv/bin/gentrace` runs `.venv/bin/python3`: hints then say `.venv/bin/python3` (as relative as the program).
    """
    executable = sys.executable
    for name in ("python", Path(executable).name):
        found = shutil.which(name)
        if found is not None and _same_directory(found, executable):
            return name
    sibling = Path(sys.argv[0]).parent / Path(executable).name
    if sibling.parent != Path() and _same_directory(sibling, executable):
        return shlex.quote(str(sibling))
    return shlex.quote(executable)


def program() -> str:
    """How to run this gentrace again: `gentrace` if PATH finds this program, else the path it was invoked by.

    `python -m gentrace` (argv[0] is gentrace/__main__.py) and torchrun's `-m gentrace` give
    `<python> -m gentrace`.
    """
    invoked = sys.argv[0] if sys.argv and sys.argv[0] else "gentrace"
    if Path(invoked).name == "__main__.py":
        return f"{python()} -m gentrace"
    found = shutil.which("gentrace")
    if found is not None and _same_file(found, invoked):
        return "gentrace"
    if os.sep not in invoked and (os.altsep is None or os.altsep not in invoked):
        invoked = os.path.join(os.curdir, invoked)  # a bare name would be looked up on PATH, which has another
    return shlex.quote(invoked)


def runnable(line: str) -> str:
    """A hint written as `gentrace ARGS` (or `python ARGS`) with the program as this process can run it."""
    for name, command in (("gentrace", program), ("python", python)):
        if line == name or line.startswith(f"{name} "):
            return command() + line[len(name) :]
    return line


def quote(path: str | os.PathLike[str]) -> str:
    """A path as one shell word (quoted when it holds spaces or shell characters)."""
    return shlex.quote(str(path))
