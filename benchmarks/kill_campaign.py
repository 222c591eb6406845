"""A random SIGKILL campaign on `record` and `record --resume` (issue 12): tried / survived / lost.

Each trial records the TINY test config (tests/conftest.py) and SIGKILLs it, then checks what a user
would: `gentrace info` works, plain zarr reads of the committed rows hold no fill value (NaN / -1),
and `record --resume` (repeated until it finishes) reaches the uninterrupted run array by array.
Half of the trials also kill the *resume* itself within its first moments after it opened the
store (when it cuts the store back to its checkpoint), found by watching the root zarr.json for the
resume's `writer_process`, then a random 0-60 ms later.

The first kill falls uniformly between the creation of the store's root zarr.json and the end of an
uninterrupted run. A trial is `survived` when all checks pass, `lost` when a committed row reads a fill value or the
final store differs from the reference, and `broken` when info or resume fails.

Usage: python benchmarks/kill_campaign.py [--trials 20] [--seed 0] [--tree PATH]
`--tree` runs another checkout's gentrace (for example the code before a fix) with this script.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE / "tests"))
from conftest import tiny_config  # noqa: E402 - the tests' TINY config is the campaign's run


def cli(tree: Path, *args: object) -> list[str]:
    return [
        sys.executable,
        "-c",
        f"import sys; sys.path.insert(0, {str(tree)!r}); from gentrace.cli.app import main; main()",
    ] + [str(a) for a in args]


def attrs(store: Path) -> dict:
    try:
        return json.loads((store / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return {}


def fill_in_committed(store: Path) -> list[str]:
    """Arrays whose committed rows hold a fill value (read with plain zarr)."""
    a = attrs(store)
    root = zarr.open_group(store, mode="r")
    bad = []
    for stream, paths in a.get("streams", {}).items():
        rows = int(a.get("committed", {}).get(stream, 0))
        for path in paths:
            values = np.asarray(root[path][:rows])
            if (
                values.dtype.kind == "f"
                and np.isnan(values).any()
                or values.dtype.kind in "iu"
                and (values == -1).any()
            ):
                bad.append(path)
    return bad


def equal_to(store: Path, reference: Path) -> bool:
    a, r = attrs(store), attrs(reference)
    if a.get("committed") != r.get("committed") or a.get("status") != "complete":
        return False
    s_root, r_root = zarr.open_group(store, mode="r"), zarr.open_group(reference, mode="r")
    for stream, paths in r.get("streams", {}).items():
        rows = int(r["committed"][stream])
        for path in paths:
            if not np.array_equal(np.asarray(s_root[path][:rows]), np.asarray(r_root[path][:rows]), equal_nan=True):
                return False
    return True


def wait_for_store(proc: subprocess.Popen, store: Path) -> None:
    """Until the store's root zarr.json exists (or the process ended)."""
    while proc.poll() is None and not (store / "zarr.json").exists():
        time.sleep(0.002)


def kill_after(proc: subprocess.Popen, delay: float) -> None:
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def trial(tree: Path, cfg: Path, store: Path, reference: Path, rng: random.Random, record_s: float) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        cli(tree, "record", cfg, "--out", store, "--quiet"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_store(proc, store)
    kill_after(proc, rng.uniform(0.0, record_s))  # anywhere from store creation to the final close
    if rng.random() < 0.5 and (store / "zarr.json").exists():
        before = attrs(store).get("writer_process")
        resume = subprocess.Popen(
            cli(tree, "record", "--resume", "--out", store, "--quiet"),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while resume.poll() is None and attrs(store).get("writer_process") == before and time.monotonic() < deadline:
            time.sleep(0.002)
        kill_after(resume, rng.uniform(0.0, 0.06))
    if not store.exists():
        return "survived"  # killed before anything was written: nothing to lose
    info = subprocess.run(cli(tree, "info", store), env=env, capture_output=True, text=True)
    if info.returncode != 0:
        return "broken"
    if fill_in_committed(store):
        return "lost"
    for _ in range(3):  # a store killed before its first snapshot may need --overwrite on older code
        done = subprocess.run(
            cli(tree, "record", "--resume", "--out", store, "--quiet"), env=env, capture_output=True, text=True
        )
        if done.returncode == 0:
            break
        if "--overwrite" in done.stderr:
            done = subprocess.run(
                cli(tree, "record", cfg, "--overwrite", "--out", store, "--quiet"),
                env=env,
                capture_output=True,
                text=True,
            )
            break
    if done.returncode != 0:
        return "broken"
    return "survived" if equal_to(store, reference) else "lost"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tree", type=Path, default=HERE)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cfg = tiny_config(tmp)
        reference = tmp / "reference.zarr"
        proc = subprocess.Popen(
            cli(args.tree, "record", cfg, "--out", reference, "--quiet"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_store(proc, reference)
        t0 = time.perf_counter()
        assert proc.wait() == 0
        record_s = time.perf_counter() - t0  # from the store's creation to the end of the run
        counts = {"survived": 0, "lost": 0, "broken": 0}
        for i in range(args.trials):
            store = tmp / f"trial-{i}.zarr"
            outcome = trial(args.tree, cfg, store, reference, rng, record_s)
            counts[outcome] += 1
            print(f"trial {i + 1}/{args.trials}: {outcome}", file=sys.stderr, flush=True)
            shutil.rmtree(store, ignore_errors=True)
        print(
            f"tree {args.tree}: tried {args.trials}, survived {counts['survived']}, lost {counts['lost']}, "
            f"broken {counts['broken']} (the store lives {record_s:.1f} s in an uninterrupted run)"
        )


if __name__ == "__main__":
    main()
