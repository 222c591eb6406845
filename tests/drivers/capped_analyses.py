"""Run gsnr, paths and mi on a store under a memory cap; print what happened as one JSON line.

usage: python capped_analyses.py WARM_STORE BIG_STORE HEADROOM_MIB

The analyses first run once on WARM_STORE (a small store of the same layout), so imports, torch,
zarr's thread pools and malloc arenas exist before the cap. Then RLIMIT_DATA (private writable
memory: heap and anonymous mappings, not the shared libraries torch maps) is set to what the process
uses now plus HEADROOM_MIB, and each analysis runs on BIG_STORE. As a control, each big array is then
loaded whole with StoreReader.array, which must fail with MemoryError: that proves the cap is below
what an analysis reading whole arrays would need.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable

import pandas as pd

from gentrace.analyses import gsnr, mi, paths
from gentrace.store.reader import StoreReader

ANALYSES: dict[str, Callable[[StoreReader], pd.DataFrame]] = {
    "gsnr": lambda reader: gsnr.run(reader, by="layer"),
    "paths": lambda reader: paths.run(reader, kind="cross", device="cpu"),
    "mi": lambda reader: mi.run(reader, cache=False),
}
BIG_ARRAYS = {"gsnr": "grad/w/sum", "paths": "acts/l0/bits", "mi": "preds/test"}


def data_bytes() -> int:
    """VmData of this process (what RLIMIT_DATA limits), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmData in /proc/self/status")


def main(warm: str, big: str, headroom_mib: int) -> None:
    for analysis in ANALYSES.values():
        analysis(StoreReader(warm))
    base = data_bytes()
    cap = base + headroom_mib * 2**20
    resource.setrlimit(resource.RLIMIT_DATA, (cap, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    reader = StoreReader(big)
    out: dict[str, object] = {"base_mib": base / 2**20, "cap_mib": cap / 2**20, "rows": {}, "seconds": {}}
    for name, analysis in ANALYSES.items():
        start = time.perf_counter()
        try:
            out["rows"][name] = len(analysis(reader))  # type: ignore[index]
        except MemoryError:
            out["rows"][name] = "MemoryError"  # type: ignore[index]
        out["seconds"][name] = round(time.perf_counter() - start, 2)  # type: ignore[index]
    out["peak_data_mib"] = data_bytes() / 2**20
    control: dict[str, object] = {}
    for name, path in BIG_ARRAYS.items():
        try:
            whole = reader.array(path)
            control[name] = f"loaded {whole.nbytes} bytes"
            del whole
        except MemoryError:
            control[name] = "MemoryError"
    out["control"] = control
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
