"""Pairwise path overlap of 2000 probes x 100,000 ReLU units: gentrace's kernel vs the naive way, side by side.

The Gram matrix G = P P^T [probes, probes] of packed bitmasks (the heart of every `analyze paths`
kind) computed by:

- naive: np.unpackbits of the whole matrix to float64, then one float64 matmul (x @ x.T);
- gentrace int8 <device>: `bits.pairwise_dot(method="int8")`: blocks of units unpacked to int8,
  torch `_int_mm` (int8 x int8 -> int32), only the row blocks on and above the diagonal;
- gentrace float32 cpu: `bits.pairwise_dot(method="float32")`: the same blocks through NumPy's sgemm.

Each variant runs in its own subprocess (so its peak memory is its own): one warm-up on a small
input, then `--repeats` timed runs on the full input (median and min reported). Peak memory is the
rise of the process's peak RSS (VmHWM, reset before the timed runs) above the RSS that the input,
the imports and the warm-up already held; on a GPU also torch.cuda.max_memory_allocated. Every variant's
result must equal the naive one exactly (compared by a digest of the int64 matrix).

Usage: python benchmarks/paths.py [--probes 2000] [--units 100000] [--repeats 3]
[--device auto|cpu|cuda] [--threads N]. Target (issue 5): gentrace >= 10x naive.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

TARGET = 10.0


def make_bits(probes: int, units: int, seed: int = 0) -> np.ndarray:
    """Random paths with half the units on, packed: [probes, ceil(units / 8)] uint8 (pad bits 0)."""
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, size=(probes, -(-units // 8)), dtype=np.uint8)
    if units % 8:
        packed[:, -1] &= np.uint8((1 << (units % 8)) - 1)
    return packed


def naive(bits: np.ndarray, units: int) -> np.ndarray:
    x = np.unpackbits(bits, axis=-1, count=units, bitorder="little").astype(np.float64)
    return x @ x.T


def variant_fn(name: str, device: str) -> Any:
    if name == "naive":
        return naive
    from gentrace.analyses import bits

    method = "int8" if name == "int8" else "float32"
    return lambda b, units: bits.pairwise_dot(b, device=device, method=method)


def memory_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc (Linux) or else getrusage."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status.read().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return peak, peak


def reset_peak() -> None:
    """Set the peak RSS to the current RSS (Linux >= 4.0); ru_maxrss cannot be reset and survives exec."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def child(args: argparse.Namespace) -> None:
    """Time one variant in this (fresh) process; print one JSON line."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    fn = variant_fn(args.variant, args.device)
    cuda = args.device.startswith("cuda") and args.variant == "int8"
    bits = make_bits(args.probes, args.units)
    fn(make_bits(64, 4096, seed=1), 4096)  # warm-up: imports, kernel selection, thread pools
    if cuda:
        import torch

        fn(bits, args.units)  # cuBLASLt picks its algorithm on the first full-size call
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset_peak()
    before = memory_mib()[0]
    times, result = [], None
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = fn(bits, args.units)
        times.append(time.perf_counter() - start)
    assert result is not None
    digest = hashlib.sha256(np.ascontiguousarray(result, dtype=np.int64).tobytes()).hexdigest()
    out = {
        "times": times,
        "peak_rss_rise_mib": memory_mib()[1] - before,
        "peak_rss_mib": memory_mib()[1],
        "digest": digest,
        "input_mib": bits.nbytes / 2**20,
    }
    if cuda:
        import torch

        out["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def run_variant(variant: str, device: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--device", device]
    cmd += ["--probes", str(args.probes), "--units", str(args.units), "--repeats", str(args.repeats)]
    cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{variant} on {device} failed:\n{done.stderr}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=2000)
    parser.add_argument("--units", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: cuda when available)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="naive", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    plan = [("naive", "cpu"), ("int8", "cpu"), ("float32", "cpu")]
    if device != "cpu":
        plan.insert(1, ("int8", device))
    cpu = torch.get_num_threads() if not args.threads else args.threads
    gpu = f", {torch.cuda.get_device_name(torch.device(device))}" if device != "cpu" else ""
    print(
        f"pairwise overlap (Gram matrix), {args.probes} probes x {args.units} units, "
        f"median of {args.repeats}; {cpu} CPU threads{gpu}"
    )
    results = {}
    for variant, dev in plan:
        results[variant, dev] = run_variant(variant, dev, args)
        print(f"  ran {variant} on {dev}", file=sys.stderr, flush=True)
    base = statistics.median(results["naive", "cpu"]["times"])
    reference = results["naive", "cpu"]["digest"]
    header = f"{'variant':28s} {'median s':>9s} {'min s':>8s} {'speedup':>8s} {'peak RSS rise MiB':>18s}"
    header += f" {'GPU peak MiB':>13s} exact"
    print(header)
    print("-" * len(header))
    for (variant, dev), r in results.items():
        name = "naive unpackbits+f64 matmul" if variant == "naive" else f"gentrace {variant} {dev}"
        median = statistics.median(r["times"])
        gpu_peak = f"{r['gpu_peak_mib']:13.0f}" if "gpu_peak_mib" in r else f"{'-':>13s}"
        print(
            f"{name:28s} {median:9.3f} {min(r['times']):8.3f} {base / median:7.1f}x "
            f"{r['peak_rss_rise_mib']:18.0f} {gpu_peak} {'yes' if r['digest'] == reference else 'NO'}"
        )
    best_name, best = min(
        ((f"gentrace {v} {d}", statistics.median(r["times"])) for (v, d), r in results.items() if v != "naive"),
        key=lambda item: item[1],
    )
    verdict = "met" if base / best >= TARGET else "NOT met"
    print(f"target gentrace >= {TARGET:.0f}x naive: {verdict} ({best_name}: {base / best:.1f}x)")
    if any(r["digest"] != reference for r in results.values()):
        raise SystemExit("a variant's result differs from the naive float64 matmul")


if __name__ == "__main__":
    main()
