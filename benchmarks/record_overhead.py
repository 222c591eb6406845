"""Wall time of training with every stream recorded vs with recording off, side by side.

Three variants of the same config run alternately in one process, `--repeats` times each
(medians reported, machines are noisy):

- off: the bare training loop (no probe, no store);
- probes only: every probe runs (evaluations, host copies, checkpoints) but rows are dropped
  instead of written, which separates the cost of *what* is recorded from the cost of writing it;
- on: `gentrace record` as users run it (store creation, background writer, final resize).

Usage: python benchmarks/record_overhead.py [CONFIG] [--repeats 3] [--device cpu] [--set KEY=VALUE ...]
(no CONFIG: the quick start). Target: on / off <= 1.25 on CPU, <= 1.05 on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gentrace.core import config
from gentrace.training.run import prepare, record, resolve_device


class DropRows:
    """Stands in for the store writer: takes every row and keeps none."""

    def start(self) -> None:
        pass

    def put(self, block: object) -> None:
        pass


def _train_time(cfg: config.RunConfig, device: str, probes: bool) -> float:
    trainer, recorder, _ = prepare(cfg, resolve_device(device))
    if probes:
        recorder.attach(DropRows())  # type: ignore[arg-type]
    else:
        recorder.probes.clear()
    t0 = time.perf_counter()
    with recorder:
        trainer.run(recorder)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_off(cfg: config.RunConfig, device: str) -> float:
    return _train_time(cfg, device, probes=False)


def time_probes_only(cfg: config.RunConfig, device: str) -> float:
    return _train_time(cfg, device, probes=True)


def time_on(cfg: config.RunConfig, device: str, root: Path, i: int) -> float:
    t0 = time.perf_counter()
    record(cfg, root / f"on-{i}.zarr", device=device)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = config.load(args.config, args.overrides)
    times: dict[str, list[float]] = {"off": [], "probes only": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        time_off(cfg, args.device)  # warm-up: allocator, kernels, data set cache
        for i in range(args.repeats):
            times["off"].append(time_off(cfg, args.device))
            times["probes only"].append(time_probes_only(cfg, args.device))
            times["on"].append(time_on(cfg, args.device, Path(tmp), i))
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"config: {cfg.name} ({cfg.model.arch} on {cfg.data.name}, {cfg.train.epochs} epochs, "
        f"{cfg.train.replicates} replicates), device {args.device}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'variant':<14}{'median s':>10}{'ratio to off':>14}   runs")
    for name, values in times.items():
        runs = " ".join(f"{t:.3f}" for t in values)
        print(f"{name:<14}{medians[name]:>10.3f}{medians[name] / medians['off']:>14.3f}   {runs}")
    print(f"overhead ratio (on / off): {medians['on'] / medians['off']:.3f}")


if __name__ == "__main__":
    main()
