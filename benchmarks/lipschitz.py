"""Input-gradient norms of 10,000 points: gentrace's batched routine vs a per-point autograd loop.

Networks (gentrace.models.build_model, eval mode):

- mlp: the 5-layer ReLU MLP of sample_configs/bth-cos2d.toml (input dim 10, 4 hidden layers of 128,
  one output): the gradient of the single output.
- cnn: the 2-block cnn (16 channels, hidden 128) on 1x28x28 inputs with 10 outputs: the gradient of
  the predicted-class logit.

Variants:

- per-point loop: for each point, a forward on a batch of 1 and `torch.autograd.grad` of the selected
  output (what the BTH code does at every sampled point);
- gentrace: `lipschitz.input_gradient_norms` (chunks of CHUNK points, one backward per chunk).

Each variant gets one warm-up run on 64 points, then `--repeats` timed runs on all points (median
reported; the loop defaults to 1 repeat because it is slow). The two results must agree to 1e-4 on
all but 1% of the points (a near-tied predicted class may flip between batch and single-point float32).

Usage: python benchmarks/lipschitz.py [--points 10000] [--repeats 5] [--loop-repeats 1]
[--device auto|cpu|cuda]. Target (issue 6): gentrace >= 20x the per-point loop.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from gentrace.analyses import lipschitz
from gentrace.config import ModelConfig
from gentrace.models import build_model

TARGET = 20.0
NETWORKS: dict[str, tuple[ModelConfig, tuple[int, ...], int]] = {
    "mlp 5x128 (dim 10)": (ModelConfig(arch="mlp", hidden=(128, 128, 128, 128)), (10,), 1),
    "cnn 2-block (28x28)": (ModelConfig(arch="cnn", hidden=(128,), channels=16), (1, 28, 28), 10),
}


def per_point(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The obvious way: one forward and one backward per point."""
    out = torch.empty(len(x), device=x.device)
    for i in range(len(x)):
        xi = x[i : i + 1].detach().requires_grad_(True)
        f = model(xi).reshape(-1)
        c = 0 if len(f) == 1 else int(f.argmax())
        out[i] = torch.autograd.grad(f[c], xi)[0].norm()
    return out


def timed(fn: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Median seconds of `repeats` runs, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    assert result is not None
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-repeats", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: cuda when available)")
    args = parser.parse_args()
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"{args.points} points, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    rows = []
    for label, (cfg, shape, k) in NETWORKS.items():
        model = build_model(cfg, shape, k).to(device).eval()
        model.requires_grad_(False)
        x = torch.randn((args.points, *shape), generator=torch.Generator().manual_seed(0)).to(device)
        per_point(model, x[:64])
        lipschitz.input_gradient_norms(model, x[:64])
        loop_s, want = timed(lambda m=model, x=x: per_point(m, x), args.loop_repeats, device)
        fast_s, got = timed(lambda m=model, x=x: lipschitz.input_gradient_norms(m, x), args.repeats, device)
        # float32 logits of a batch and of one point differ in the last bits, so a near-tied argmax may pick
        # another class: count those points instead of failing
        differ = int((~np.isclose(got.cpu().numpy(), want.cpu().numpy(), rtol=1e-4, atol=1e-6)).sum())
        if differ > args.points // 100:
            raise SystemExit(f"{label}: {differ} of {args.points} values differ between the two variants")
        rows.append((label, loop_s, fast_s, loop_s / fast_s, differ))
    print(f"\n| network | per-point loop (s) | gentrace (s) | speed-up | target >= {TARGET:g}x | values differing |")
    print("|---|---:|---:|---:|:---:|---:|")
    for label, loop_s, fast_s, ratio, differ in rows:
        ok = "yes" if ratio >= TARGET else "NO"
        print(f"| {label} | {loop_s:.3f} | {fast_s:.4f} | {ratio:.0f}x | {ok} | {differ} |")


if __name__ == "__main__":
    main()
