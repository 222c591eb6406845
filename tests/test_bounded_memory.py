"""Analyses read the store in chunks: gsnr, paths and mi run under a memory cap far below the store's size.

tests/drivers/capped_analyses.py sets RLIMIT_DATA (private writable memory, which is what NumPy
arrays and zarr's decode buffers take; torch's shared libraries do not count) to the process's use
after a warm-up plus HEADROOM_MIB, then runs each analysis on a store whose every big array is
larger than that headroom (2.6 GiB logical in all). The same process then loads each array whole
with StoreReader.array and must get MemoryError: an analysis that read whole arrays would fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ENV
from synthetic_store import Size, write_store

DRIVER = Path(__file__).parent / "drivers" / "capped_analyses.py"
HEADROOM_MIB = 320  # measured peaks above the warm process: gsnr ~200 MiB, paths and mi less
WARM = Size(rows=3, params=65536, probes=64, units=8192, n_test=4096, n_train=1024)
# each row: grad 8 MiB per moment array, bits 8 MiB (64 probes x 2**20 units), test predictions 8 MiB
BIG = Size(rows=56, params=2**21, probes=64, units=2**20, n_test=2**22, n_train=2**16)


@pytest.mark.slow
def test_analyses_run_under_a_cap_smaller_than_every_big_array(tmp_path: Path) -> None:
    big_arrays = {"gsnr": "grad/w/sum", "paths": "acts/l0/bits", "mi": "preds/test"}
    for path in big_arrays.values():
        assert BIG.logical_bytes()[path] > 1.3 * HEADROOM_MIB * 2**20, path  # the cap bites for each
    warm, big = write_store(tmp_path / "warm.zarr", WARM), write_store(tmp_path / "big.zarr", BIG)
    done = subprocess.run(
        [sys.executable, str(DRIVER), str(warm), str(big), str(HEADROOM_MIB)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=1800,  # ~6 min on a quiet 2-core machine; a safety net for a loaded one, not a measurement
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["rows"] == {"gsnr": BIG.rows, "paths": BIG.rows - 1, "mi": BIG.rows}, result
    assert result["control"] == dict.fromkeys(big_arrays, "MemoryError"), result
