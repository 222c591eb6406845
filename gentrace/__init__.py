"""gentrace: record a training run once into a crash-safe Zarr store, diagnose generalization offline."""

__version__ = "0.1.0"
