"""The store writer alone: a real run's rows replayed into a fresh store, no training beside it.

The config's run is trained once with every probe on, its rows captured instead of written; then
the same blocks are handed to a new store's writer `--repeats` times. Printed per repeat and as
medians: the bytes handed over, the writer's busy time (what `gentrace info` reports), its
throughput (bytes / busy), the process CPU the writer's threads used (all of it counts against a
training loop sharing the cores), the chunk files written, and the commits.

Usage: python benchmarks/writer_throughput.py [CONFIG] [--repeats 5] [--set KEY=VALUE ...] [--root DIR]
       [--preset cnn]  (record_overhead.py's CNN config on MNIST-format files it writes)
       [--profile FILE]  (cProfile of the writer thread over one more replay, pstats format)
(no CONFIG: the quick start). Target (issue 16): throughput >= 200 MiB/s on a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import statistics
import tempfile
import time
from pathlib import Path

from record_overhead import CNN_PRESET, write_mnist_format

from gentrace.core import config
from gentrace.store import rootmeta
from gentrace.store.writer import RowBlock, create_store
from gentrace.training.run import prepare, resolve_device, run_attrs, static_arrays


class Capture:
    """Stands in for the store writer: keeps every block (the probes hand over fresh arrays)."""

    def __init__(self) -> None:
        self.blocks: list[RowBlock] = []

    def start(self) -> None:
        pass

    def put(self, block: RowBlock) -> None:
        self.blocks.append(block)


def capture(cfg: config.RunConfig) -> tuple[list[RowBlock], dict, dict, list]:
    trainer, recorder, data = prepare(cfg, resolve_device("cpu"))
    static = {**static_arrays(data, cfg.record), **recorder.static()}
    attrs = run_attrs(cfg, data, resolve_device("cpu"), trainer.loss, trainer.timeline, trainer.dist.world)
    streams = list(recorder.streams())
    sink = Capture()
    recorder.attach(sink)  # type: ignore[arg-type]
    with recorder:
        trainer.run(recorder)
    return sink.blocks, attrs, static, streams


def replay(
    blocks: list[RowBlock], attrs: dict, static: dict, streams: list, root: Path, profile: Path | None = None
) -> dict:
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        path = Path(tmp) / "replay.zarr"
        writer = create_store(path, attrs, copy.deepcopy(streams), static)
        files_before = sum(1 for _ in path.rglob("c*") if _.is_file())
        if profile is not None:  # the writer thread's own work (chunk files are written by its pool)
            run, profiler = writer._run, cProfile.Profile()
            writer._run = lambda: profiler.runcall(run)  # type: ignore[method-assign]
        cpu0, t0 = time.process_time(), time.perf_counter()
        writer.start()
        for block in blocks:
            writer.put(block)
        writer.close("complete")
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        if profile is not None:
            profiler.dump_stats(profile)
        meta = rootmeta.read(path)["attributes"]["writer"]
        files = sum(1 for _ in path.rglob("c*") if _.is_file()) - files_before
    mib = meta["bytes"] / 2**20
    busy = meta["busy_s"]
    return {"MiB": mib, "busy_s": busy, "MiB/s": mib / busy, "cpu_s": cpu, "wall_s": wall, "files": files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--preset", choices=["cnn"], default=None, help="record_overhead.py's CNN config")
    args = parser.parse_args()
    overrides = list(args.overrides)
    data_root = tempfile.TemporaryDirectory(dir=args.root, prefix=".bench-data-")
    if args.preset == "cnn":
        write_mnist_format(Path(data_root.name))
        overrides = [*CNN_PRESET, f"data.root='{data_root.name}'", *overrides]
    cfg = config.load(args.config, overrides)
    blocks, attrs, static, streams = capture(cfg)
    print(f"{len(blocks)} blocks captured from {cfg.name}")
    rows = [replay(blocks, attrs, static, streams, args.root) for _ in range(args.repeats)]
    keys = list(rows[0])
    print(",".join(["repeat", *keys]))
    for i, row in enumerate(rows):
        print(",".join([str(i), *(f"{row[k]:.4g}" for k in keys)]))
    print(",".join(["median", *(f"{statistics.median(r[k] for r in rows):.4g}" for k in keys)]))
    if args.profile:
        replay(blocks, attrs, static, streams, args.root, profile=args.profile)
        print(f"profile of one more replay: {args.profile}")


if __name__ == "__main__":
    main()
