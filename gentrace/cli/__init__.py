"""The command line: the typer app (gentrace.cli.app), analyze and plot commands, output, error lines, progress.

This package is the only importer of typer and rich (an import-linter contract).
"""
