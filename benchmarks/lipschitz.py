"""Input-gradient norms of 10,000 points: gentrace's batched routine vs a per-point autograd loop.

Networks (gentrace.task.models.build_model, eval mode, parameters frozen):

- mlp: the 5-layer ReLU MLP of sample_configs/bth-cos2d.toml (input dim 10, 4 hidden layers of 128,
  one output): the gradient of the single output. 50k multiply-adds per point.
- cnn: the 2-block cnn (16 channels, hidden 128) on 1x28x28 inputs with 10 outputs: the gradient of
  the predicted-class logit. 670k multiply-adds per point forward, about as many backward.

Variants:

- per-point loop: for each point, a forward on a batch of 1 and `torch.autograd.grad` of the selected
  output (what the BTH code does at every sampled point); with `--jacobian`, K such gradients per point
  and `torch.linalg.matrix_norm(ord=2)` of the stacked [K, D] Jacobian;
- gentrace: `lipschitz.input_gradient_norms` (chunks of `auto_chunk` points, one backward per chunk,
  K with `--jacobian`).

First both variants run once on all points, untimed (the warm-up), and their values are compared: they
must agree to rtol 1e-4 on all but 1% of the points (float32 logits of a batch and of one point differ
in the last bits, so a near-tied predicted class may flip). Then `--repeats` timed rounds alternate the
two variants (the order flips every round, so drift from other load hits both); the table gives the
median times, the ratio of the medians, the ratio of the fastest runs (least disturbed by other load on
a shared machine) and the range of the per-round ratios.

Why the cnn gains less than the mlp on a CPU: the loop pays a fixed ~0.1-0.2 ms of Python and dispatch
per point. For the mlp that is nearly all of its cost, so batching removes it; for the cnn the per-point
arithmetic (~2.7 MFLOP forward and backward) costs about as much again and batching cannot remove it, so
the ratio is bounded by (overhead + arithmetic at batch 1) / (arithmetic at batch B): 3-4x on the 2-core
CPU this was written on (mlp ~40x). On a GPU the loop is bound by kernel launches (~30 per point), so the
ratio should be far larger there (not measured yet).

Usage: python benchmarks/lipschitz.py [--points 10000] [--repeats 9] [--jacobian] [--device auto|cpu|cuda].
Thread count: torch's default (OMP_NUM_THREADS if set), printed in the header. Target (issue 6):
gentrace >= 20x the per-point loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from gentrace.analyses import lipschitz
from gentrace.core.config import ModelConfig
from gentrace.task.models import build_model

TARGET = 20.0
NETWORKS: dict[str, tuple[ModelConfig, tuple[int, ...], int]] = {
    "mlp 5x128 (dim 10)": (ModelConfig(arch="mlp", hidden=(128, 128, 128, 128)), (10,), 1),
    "cnn 2-block (28x28)": (ModelConfig(arch="cnn", hidden=(128,), channels=16), (1, 28, 28), 10),
}


def per_point(model: nn.Module, x: torch.Tensor, jacobian: bool) -> torch.Tensor:
    """The obvious way: one forward and one backward (K for the Jacobian) per point."""
    out = torch.empty(len(x), device=x.device)
    for i in range(len(x)):
        xi = x[i : i + 1].detach().requires_grad_(True)
        f = model(xi).reshape(-1)  # [K]
        if jacobian:
            rows = [torch.autograd.grad(f[k], xi, retain_graph=k + 1 < len(f))[0].reshape(-1) for k in range(len(f))]
            out[i] = torch.linalg.matrix_norm(torch.stack(rows), ord=2)
        else:
            c = 0 if len(f) == 1 else int(f.argmax())
            out[i] = torch.autograd.grad(f[c], xi)[0].norm()
    return out


def seconds(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Wall time of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds, each running both variants")
    parser.add_argument("--jacobian", action="store_true", help="also time the Jacobian spectral norm (K > 1 nets)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: cuda when available)")
    args = parser.parse_args()
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"{args.points} points, {args.repeats} rounds, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"{os.cpu_count()} cpus), load average at start {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    print(
        "\n| network | output | per-point loop (s) | gentrace (s) | speed-up (medians) | best / best | per-round range "
        f"| target >= {TARGET:g}x | values differing | max rel. diff |"
    )
    print("|---|---|---:|---:|---:|---:|---:|:---:|---:|---:|", flush=True)
    for label, (cfg, shape, k) in NETWORKS.items():
        model = build_model(cfg, shape, k).to(device).eval()
        model.requires_grad_(False)
        x = torch.randn((args.points, *shape), generator=torch.Generator().manual_seed(0)).to(device)
        for jacobian in (False, True) if args.jacobian and k > 1 else (False,):
            variants = {
                "loop": lambda m=model, x=x, j=jacobian: per_point(m, x, j),
                "gentrace": lambda m=model, x=x, j=jacobian: lipschitz.input_gradient_norms(m, x, jacobian=j),
            }
            want, got = (variants[v]().cpu().numpy() for v in ("loop", "gentrace"))  # untimed: warm-up and check
            close = np.isclose(got, want, rtol=1e-4, atol=1e-6)
            differ = int((~close).sum())
            if differ > args.points // 100:
                raise SystemExit(f"{label}: {differ} of {args.points} values differ between the two variants")
            max_rel = float((np.abs(got - want) / np.abs(want).clip(1e-12))[close].max())
            times: dict[str, list[float]] = {"loop": [], "gentrace": []}
            for r in range(args.repeats):
                for v in ("loop", "gentrace") if r % 2 == 0 else ("gentrace", "loop"):
                    times[v].append(seconds(variants[v], device))
            ratios = [a / b for a, b in zip(times["loop"], times["gentrace"], strict=True)]
            loop_s, fast_s = statistics.median(times["loop"]), statistics.median(times["gentrace"])
            ratio, best = loop_s / fast_s, min(times["loop"]) / min(times["gentrace"])
            output = "||J||_2 (K=10)" if jacobian else ("df/dx" if k == 1 else "df_c/dx, c = argmax")
            print(  # row by row, so a slow run shows progress
                f"| {label} | {output} | {loop_s:.3f} | {fast_s:.4f} | {ratio:.1f}x | {best:.1f}x "
                f"| {min(ratios):.1f}-{max(ratios):.1f}x | {'yes' if ratio >= TARGET else 'NO'} | {differ} "
                f"| {max_rel:.1e} |",
                flush=True,
            )
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
