"""Foundations: the config tree, the error types and the step schedules; no torch, no store."""
