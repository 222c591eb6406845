"""Orchestration: the training loop, `record` as a library call, torchrun, sweeps and pre-flight checks."""
