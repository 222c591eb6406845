"""Analysis throughput in GB/s of array data read: in-process vs a local dask.distributed cluster, side by side.

A synthetic store (tests/synthetic_store.py: grad, acts and preds streams written straight through
the store writer, values that compress well so the store writes fast) is analyzed by

- in-process: `plan.local`, the tasks one after the other (what `gentrace analyze ...` does);
- dask local: `dask_backend.frames` on a LocalCluster of one single-threaded worker process per core
  (what `--dask local` starts); cluster start-up is reported apart, not timed;
- dask threads: the same on a LocalCluster of threads in this process (processes=False).

GB/s = logical (uncompressed) bytes of the arrays the analysis reads / wall time: gsnr --by layer
reads grad/w/{sum,sumsq,pos,neg}; paths --kind cross reads acts/l0/bits; mi reads preds/test and
preds/train. The store is in the page cache (just written), so this measures decoding and compute,
not the disk. Every variant's table must equal the in-process one exactly. Median of --repeats.

Usage: python benchmarks/scale.py [--big] [--rows N] [--repeats 3] [--workers N] [--keep DIR].
The default store (~0.5 GB logical) runs in well under 2 minutes on 2 cores; --big writes ~2.7 GB.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from synthetic_store import Size, write_store  # noqa: E402

from gentrace.analyses import dask_backend, gsnr, mi, paths  # noqa: E402
from gentrace.analyses import plan as chunks  # noqa: E402
from gentrace.store.reader import StoreReader  # noqa: E402

SMALL = Size(rows=24, params=2**20, probes=64, units=2**18, n_test=2**20, n_train=2**15)
BIG = Size(rows=56, params=2**21, probes=64, units=2**20, n_test=2**22, n_train=2**16)
ANALYSES: dict[str, tuple[Callable[[StoreReader, int], chunks.Plan], list[str]]] = {
    "gsnr": (lambda r, _: gsnr.plan(r, "layer"), [f"grad/w/{k}" for k in gsnr.KINDS]),
    "paths": (lambda r, n: paths.plan(r, kind="cross", device="cpu", parts=n), ["acts/l0/bits"]),
    "mi": (lambda r, n: mi.plan(r, parts=n), ["preds/test", "preds/train"]),
}


def timed(run: Callable[[], pd.DataFrame], repeats: int) -> tuple[float, pd.DataFrame]:
    times, table = [], pd.DataFrame()
    for _ in range(repeats):
        start = time.perf_counter()
        table = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", action="store_true", help="a ~2.7 GB store instead of ~0.5 GB")
    parser.add_argument("--rows", type=int, default=None, help="recorded rows (overrides the size's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="dask workers (default: cores)")
    parser.add_argument("--keep", type=Path, default=None, help="write the store here and keep it")
    args = parser.parse_args()
    size = BIG if args.big else SMALL
    if args.rows:
        size = Size(**{**size.__dict__, "rows": args.rows})
    from dask.distributed import Client, LocalCluster

    with tempfile.TemporaryDirectory() as tmp:
        path = (args.keep or Path(tmp)) / "scale.zarr"
        start = time.perf_counter()
        write_store(path, size)
        reader = StoreReader(path)
        total = sum(reader.logical_bytes(p) for _, arrays in ANALYSES.values() for p in arrays)
        print(f"store: {path} ({total / 1e9:.2f} GB logical in the arrays read, written in "
              f"{time.perf_counter() - start:.1f} s); {os.cpu_count()} cores, {args.workers} dask workers, "
              f"median of {args.repeats}")  # fmt: skip
        results: dict[str, dict[str, float]] = {}
        start = time.perf_counter()
        with (
            LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None) as procs,
            Client(procs) as on_procs,
            LocalCluster(
                n_workers=args.workers, threads_per_worker=1, processes=False, dashboard_address=None
            ) as threads,
            Client(threads) as on_threads,
        ):
            print(f"cluster start-up (both clusters): {time.perf_counter() - start:.1f} s\n")
            for name, (make_plan, arrays) in ANALYSES.items():
                nbytes = sum(reader.logical_bytes(p) for p in arrays)
                here_s, here = timed(lambda mp=make_plan: _concat(chunks.local(mp(reader, 1))), args.repeats)
                row = {"GB": nbytes / 1e9, "in-process": nbytes / here_s / 1e9}
                for label, client in (("dask local", on_procs), ("dask threads", on_threads)):
                    parts = dask_backend.parts(client)
                    there_s, there = timed(
                        lambda mp=make_plan, c=client, n=parts: _concat(dask_backend.frames(mp(reader, n), c)),
                        args.repeats,
                    )
                    pd.testing.assert_frame_equal(there, here, check_exact=True)
                    row[label] = nbytes / there_s / 1e9
                results[name] = row
    _print(results)


def _concat(frames: Any) -> pd.DataFrame:
    return pd.concat(list(frames), ignore_index=True)


def _print(results: dict[str, dict[str, float]]) -> None:
    header = (
        f"{'analysis':<9}{'GB read':>9}{'in-process':>13}{'dask local':>13}{'dask threads':>14}"
        f"{'local/in-proc':>15}{'threads/in-proc':>17}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<9}{r['GB']:>9.3f}{r['in-process']:>9.3f} GB/s{r['dask local']:>8.3f} GB/s"
            f"{r['dask threads']:>9.3f} GB/s{r['dask local'] / r['in-process']:>14.2f}x"
            f"{r['dask threads'] / r['in-process']:>16.2f}x"
        )


if __name__ == "__main__":
    main()
