"""gentrace: record a training run once into a crash-safe Zarr store, diagnose generalization offline.

`gentrace.Run` records a training loop of your own (gentrace.training.own_loop); it is imported on
first use, so `import gentrace` stays light for the command line.
"""

from __future__ import annotations

from typing import Any

from gentrace.core.version import __version__

__all__ = ["Run", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Run":
        from gentrace.training.own_loop import Run

        return Run
    raise AttributeError(f"module 'gentrace' has no attribute {name!r}")
