"""Wall time of the quick-start training with every stream recorded vs with recording off.

Both variants run side by side in one process, alternating, `--repeats` times each; the
ratio of medians is printed (target <= 1.25 on CPU). Usage:

    python benchmarks/record_overhead.py [--repeats 3] [--device cpu] [--set KEY=VALUE ...] [CONFIG]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from gentrace import config
from gentrace.run import prepare, record, resolve_device


def time_off(cfg: config.RunConfig, device: str) -> float:
    trainer, recorder, _ = prepare(cfg, resolve_device(device))
    recorder.probes.clear()  # recording off: same loop, no probe, no writer
    t0 = time.perf_counter()
    with recorder:
        trainer.run(recorder)
    return time.perf_counter() - t0


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
    off, on = [], []
    with tempfile.TemporaryDirectory() as tmp:
        time_off(cfg, args.device)  # warm-up: imports, allocator, data set cache
        for i in range(args.repeats):
            off.append(time_off(cfg, args.device))
            on.append(time_on(cfg, args.device, Path(tmp), i))
    m_off, m_on = statistics.median(off), statistics.median(on)
    print(f"config: {cfg.name} ({cfg.model.arch}, {cfg.data.name}, {cfg.train.epochs} epochs, device {args.device})")
    print(f"{'variant':<16}{'median s':>10}{'runs':>40}")
    print(f"{'recording off':<16}{m_off:>10.3f}{' '.join(f'{t:.3f}' for t in off):>40}")
    print(f"{'recording on':<16}{m_on:>10.3f}{' '.join(f'{t:.3f}' for t in on):>40}")
    print(f"overhead ratio (on / off): {m_on / m_off:.3f}")


if __name__ == "__main__":
    main()
