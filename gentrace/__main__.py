"""`python -m gentrace` runs the CLI (also what `torchrun -m gentrace` needs)."""

from gentrace.cli.app import main

main()
