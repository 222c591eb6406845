"""M replicates trained together (one optimizer, one backward of the summed losses) vs one by one.

Both variants train the same config side by side in one process, alternating, `--repeats`
times; medians and their ratio are printed. "one by one" trains M runs of one replicate each
(the same per-replicate work, M optimizer calls and M backward passes per step).

Usage: python benchmarks/replicates.py [CONFIG] [--replicates 2 4 8] [--repeats 3] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from gentrace.core import config
from gentrace.training.run import prepare, resolve_device


def train_time(cfg: config.RunConfig) -> float:
    trainer, recorder, _ = prepare(cfg, resolve_device("cpu"))
    recorder.probes.clear()
    t0 = time.perf_counter()
    trainer.run(recorder)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", type=Path, default=None)
    parser.add_argument("--replicates", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    base = config.load(args.config, ["data.n_train=150", "data.n_test=100", *args.overrides])
    print(f"config: {base.name} ({base.model.arch} on {base.data.name}, {base.train.epochs} epochs), CPU")
    print(f"{'M':>3}{'together s':>12}{'one by one s':>14}{'speed-up':>10}")
    single = config.from_dict({**config.to_dict(base), "train": {**config.to_dict(base.train), "replicates": 1}})
    train_time(single)  # warm-up
    for m in args.replicates:
        together_cfg = config.from_dict(
            {**config.to_dict(base), "train": {**config.to_dict(base.train), "replicates": m}}
        )
        together, separate = [], []
        for _ in range(args.repeats):
            together.append(train_time(together_cfg))
            separate.append(sum(train_time(single) for _ in range(m)))
        t, s = statistics.median(together), statistics.median(separate)
        print(f"{m:>3}{t:>12.3f}{s:>14.3f}{s / t:>10.2f}x")


if __name__ == "__main__":
    main()
