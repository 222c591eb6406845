"""Probes: one module per recorded stream, wired by the Recorder."""
