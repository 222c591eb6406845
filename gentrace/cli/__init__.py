"""The command line: the typer app (`app`), the analyze and plot commands, error lines and progress.

This package is the only importer of typer and rich (an import-linter contract).
"""

from gentrace.cli.app import app, main

__all__ = ["app", "main"]
