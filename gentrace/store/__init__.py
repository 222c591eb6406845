"""Background store writer, read-only reader and the schema both follow (NumPy and zarr only, no torch)."""
