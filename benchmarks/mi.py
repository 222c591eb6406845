"""Time of every `analyze mi` column for 100 recorded steps x 10,000 test samples (target: well under 1 s).

Usage: python benchmarks/mi.py [--steps 100] [--samples 10000] [--classes 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from gentrace.analyses import mi


def noisy_copy(rng: np.random.Generator, y: np.ndarray, classes: int, keep: float) -> np.ndarray:
    out = y.copy()
    flip = rng.random(len(y)) > keep
    out[flip] = rng.integers(0, classes, int(flip.sum()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    y = rng.integers(0, args.classes, args.samples).astype(np.int16)
    f = np.stack([noisy_copy(rng, y, args.classes, 0.5 + 0.4 * t / args.steps) for t in range(args.steps)])
    lin = noisy_copy(rng, y, args.classes, 0.7)
    steps = np.arange(args.steps)
    times = []
    for _ in range(args.repeats + 1):
        t0 = time.perf_counter()
        mi.compute(f, y, lin, steps, steps, args.classes, preds_train=f, labels_train=y)
        times.append(time.perf_counter() - t0)
    times = times[1:]  # the first call warms up
    print(f"mi.compute, {args.steps} steps x {args.samples} samples, {args.classes} classes, every column")
    print(f"median {statistics.median(times) * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms over {args.repeats} runs")


if __name__ == "__main__":
    main()
