"""`train.threads`: quiet vs beside one busy process, auto vs fixed thread counts, side by side.

Each measurement is a fresh process (auto samples the machine when a run starts) that trains the
config (the quick start, `--epochs` epochs, training only: the probes are cleared) under the count
`train.threads` chooses, and prints its training seconds and the count used. The variants are
interleaved, quiet and busy alternately, `--repeats` times (medians reported; machines are noisy).
"Busy" is one other process spinning on one core for the whole measurement.

Usage: python benchmarks/threads.py [--repeats 5] [--epochs 10] [--set KEY=VALUE ...]
Targets (issue 16): beside one busy process auto takes <= 1.3x its quiet time, and auto's quiet
time is within 10% of the best quiet time of any fixed count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import json, sys, time, torch
from gentrace.core import config
from gentrace.training import threads
from gentrace.training.run import prepare, resolve_device
cfg = config.load(None, sys.argv[1:])
count = threads.choose(cfg.train.threads)
with threads.using(count):
    trainer, recorder, _ = prepare(cfg, resolve_device("cpu"))
    recorder.probes.clear()
    t0 = time.perf_counter()
    with recorder:
        trainer.run(recorder)
    print(json.dumps({"seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}))
"""


def measure(variant: str, overrides: list[str]) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            f"train.threads={variant!r}" if variant == "auto" else f"train.threads={variant}",
            *overrides,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return float(result["seconds"]), int(result["threads"])


def spin() -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "print('spinning', flush=True)\nwhile True: pass"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("spinning")  # it is running: a real event, not a guessed sleep
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    overrides = [f"train.epochs={args.epochs}", *args.overrides]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    fixed = sorted({1, cpus} | ({2} if cpus >= 2 else set()))
    variants = ["auto", *(str(n) for n in fixed)]
    times: dict[tuple[str, str], list[float]] = {}
    counts: dict[tuple[str, str], list[int]] = {}
    measure("1", overrides)  # warm the file cache and imports
    for _ in range(args.repeats):
        for load in ("quiet", "busy"):
            competitor = spin() if load == "busy" else None
            try:
                for variant in variants:
                    seconds, used = measure(variant, overrides)
                    times.setdefault((load, variant), []).append(seconds)
                    counts.setdefault((load, variant), []).append(used)
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
    med = {key: statistics.median(v) for key, v in times.items()}
    best_quiet = min(med[("quiet", v)] for v in variants[1:])
    print(f"# {cpus} CPUs, quick start {args.epochs} epochs, training only, medians of {args.repeats}")
    print(
        f"{'variant':<10}{'quiet s':>10}{'busy s':>10}{'busy/quiet':>12}{'quiet/best':>12}  threads used (quiet | busy)"
    )
    for v in variants:
        q, b = med[("quiet", v)], med[("busy", v)]
        used = f"{sorted(set(counts[('quiet', v)]))} | {sorted(set(counts[('busy', v)]))}"
        print(f"{v:<10}{q:>10.3f}{b:>10.3f}{b / q:>12.2f}{q / best_quiet:>12.2f}  {used}")
    print(
        f"auto: busy / its quiet time = {med[('busy', 'auto')] / med[('quiet', 'auto')]:.2f} (target <= 1.3); "
        f"quiet / best quiet = {med[('quiet', 'auto')] / best_quiet:.2f} (target <= 1.10)"
    )


if __name__ == "__main__":
    main()
