"""Wall time of per-sample gradient moments vs a plain training step, gentrace beside its peers.

On one batch of each model, these variants run alternately in one process, `--repeats` times
each after a warm-up (medians reported, machines are noisy; the order rotates every repeat):

- plain: forward + backward of the mean cross-entropy, parameter gradients computed (a training step);
- gentrace sums: `MomentsEngine(model, signs=False)` through `probe_moments` (summed loss,
  `backward_for_moments`): per-parameter sum and sum of squares of the per-sample gradients;
- gentrace all four: `MomentsEngine(model)`: sum, sumsq and the sign counts pos, neg;
- BackPACK SumGradSquared: sum of squared per-sample gradients of the summed loss (sumsq only);
- torch.func vmap: every per-sample gradient of the batch materialized by vmap over grad, then
  reduced to sum, sumsq, pos, neg;
- Opacus grad_sample: `GradSampleModule` per-sample gradients, reduced the same way.

Models (SPEC section 2): the MLP 784-512-512-10 and the 2-block CNN (16 channels, hidden 128) on
28x28 inputs, and the small vision transformer of examples/vit_digits.py (a model factory: 4x4
patches, 49 tokens + a class token, dim 32, 2 blocks of LayerNorm, 4-head attention and a GELU MLP).
Inputs are uniform in [0, 1], like pixel intensities (`data.py` scales digits to
[0, 1]); labels are uniform over 10 classes. Before timing, every variant's moments are checked
against the torch.func reference on the same batch (sums rtol 1e-4, counts exact).

Targets (issue 4, on CPU): gentrace sums <= 1.4x plain, all four <= 2.0x plain, and faster than
BackPACK's SumGradSquared, on mlp and cnn. On the ViT (issue 14): all four <= 3x plain and at least 5x
faster than torch.func vmap.

Usage: python benchmarks/grad_moments.py [--repeats 20] [--threads N] [--models mlp cnn vit] [--batch 128]
[--device cpu|cuda]. The peers are the `bench` extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from gentrace.core.config import ModelConfig
from gentrace.moments.engine import MomentsEngine, probe_moments
from gentrace.task.models import build_model

INSTALL_HINT = "not installed (pip install -e '.[bench]')"
INPUT_SHAPE = (1, 28, 28)
CLASSES = 10
VIT = Path(__file__).resolve().parents[1] / "examples" / "vit_digits.py"
MODELS = {
    "mlp": ModelConfig(arch="mlp", hidden=(512, 512)),
    "cnn": ModelConfig(arch="cnn", channels=16, hidden=(128,)),
    "vit": ModelConfig(
        arch=f"{VIT}:vit", init="default", options={"patch": 4, "dim": 32, "depth": 2, "heads": 4, "hidden": 64}
    ),
}
WARMUP = 3
RTOL = 1e-4
TARGETS = (  # (what, variant, compared with, largest ratio allowed)
    ("gentrace sums <= 1.4x plain", "gentrace sums", "plain", 1.4),
    ("gentrace all four <= 2.0x plain", "gentrace all four", "plain", 2.0),
    ("gentrace sums faster than BackPACK", "gentrace sums", "BackPACK SumGradSquared", 1.0),
    ("gentrace all four faster than BackPACK", "gentrace all four", "BackPACK SumGradSquared", 1.0),
)
TARGETS_OF = {
    "vit": (
        ("gentrace all four <= 3x plain", "gentrace all four", "plain", 3.0),
        ("gentrace all four >= 5x faster than vmap", "gentrace all four", "torch.func vmap", 0.2),
    ),
}

# parameter name -> {"sum", "sumsq", "pos", "neg"} -> [*shape]; a variant fills what it computes
Quantities = dict[str, dict[str, torch.Tensor]]


class Unavailable(Exception):
    """A peer that cannot run here; the message says why."""


@dataclass
class Variant:
    """One way to compute the quantities: `step()` is timed, `read(step())` gives its quantities."""

    name: str
    step: Callable[[], Any]
    read: Callable[[Any], Quantities]


def reduce(g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Moments of materialized per-sample gradients g [B, *shape]; float64 sums as gentrace accumulates."""
    return {
        "sum": g.sum(0, dtype=torch.float64),
        "sumsq": g.square().sum(0, dtype=torch.float64),
        "pos": (g > 0).sum(0),
        "neg": (g < 0).sum(0),
    }


def per_sample_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Variant:
    net = copy.deepcopy(model)

    def step() -> None:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()

    return Variant("plain", step, lambda _: {})


def gentrace(model: nn.Module, x: torch.Tensor, y: torch.Tensor, signs: bool) -> Variant:
    net = copy.deepcopy(model)
    engine = MomentsEngine(net, signs=signs)
    engine.install()  # the hooks live as long as this copy of the model

    def read(moments: Any) -> Quantities:
        wanted = ("sum", "sumsq", "pos", "neg") if signs else ("sum", "sumsq")
        return {name: {q: getattr(t, q) for q in wanted} for name, t in moments.tensors.items()}

    name = "gentrace all four" if signs else "gentrace sums"
    return Variant(name, lambda: probe_moments(engine, net, x, y, per_sample_loss, batch_size=len(x)), read)


def backpack_sgs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Variant:
    try:
        from backpack import backpack, extend
        from backpack.extensions import SumGradSquared
    except ImportError as exc:
        raise Unavailable(INSTALL_HINT) from exc
    net = extend(copy.deepcopy(model))

    def step() -> Quantities:
        net.zero_grad(set_to_none=True)
        with backpack(SumGradSquared()):
            # summed loss: BackPACK squares the gradients of the per-sample losses as they appear in it
            F.cross_entropy(net(x), y, reduction="sum").backward()
        return {name: {"sumsq": p.sum_grad_squared} for name, p in net.named_parameters()}

    return Variant("BackPACK SumGradSquared", step, lambda q: q)


def torch_func(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Variant:
    net = copy.deepcopy(model)
    params = {name: p.detach() for name, p in net.named_parameters()}
    buffers = dict(net.named_buffers())

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(net, (p, buffers), (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))

    def step() -> Quantities:
        return {name: reduce(g) for name, g in per_sample(params, x, y).items()}

    return Variant("torch.func vmap", step, lambda q: q)


def opacus_gsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Variant:
    try:
        from opacus import GradSampleModule
    except ImportError as exc:
        raise Unavailable(INSTALL_HINT) from exc
    net = copy.deepcopy(model)
    wrapped = GradSampleModule(net, loss_reduction="sum")

    def step() -> Quantities:
        wrapped.zero_grad(set_to_none=True)  # also drops grad_sample, which Opacus would accumulate
        F.cross_entropy(wrapped(x), y, reduction="sum").backward()
        return {name: reduce(p.grad_sample) for name, p in net.named_parameters()}

    return Variant("Opacus grad_sample", step, lambda q: q)


BUILDERS: list[tuple[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], Variant]]] = [
    ("plain", plain),
    ("gentrace sums", lambda m, x, y: gentrace(m, x, y, signs=False)),
    ("gentrace all four", lambda m, x, y: gentrace(m, x, y, signs=True)),
    ("BackPACK SumGradSquared", backpack_sgs),
    ("torch.func vmap", torch_func),
    ("Opacus grad_sample", opacus_gsm),
]
PEERS = {"BackPACK SumGradSquared", "torch.func vmap", "Opacus grad_sample"}


def check(variants: list[Variant], reference: Quantities) -> None:
    """Every variant's quantities equal the torch.func reference: sums to rtol, counts exactly."""
    for v in variants:
        got = v.read(v.step())
        if v.name != "plain" and got.keys() != reference.keys():
            raise AssertionError(f"{v.name}: parameters {sorted(got)} != {sorted(reference)}")
        for name, quantities in got.items():
            for q, value in quantities.items():
                ref = reference[name][q]
                if q in ("pos", "neg"):
                    # entries whose exact gradient is 0 (an attention key bias) hold rounding noise of any sign
                    sumsq = reference[name]["sumsq"].double()
                    real = sumsq > 1e-12 * float(sumsq.max())
                    torch.testing.assert_close(
                        value.long()[real], ref.long()[real], rtol=0, atol=0, msg=f"{v.name} {name} {q}"
                    )
                else:
                    # entries of the sum that cancel to ~0 differ by float32 rounding of the large terms
                    atol = RTOL * float(ref.abs().max())
                    torch.testing.assert_close(
                        value.double(), ref.double(), rtol=RTOL, atol=atol, msg=f"{v.name} {name} {q}"
                    )


def time_step(step: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def bench_model(arch: str, batch: int, repeats: int, device: torch.device) -> tuple[dict[str, list[float]], list[str]]:
    """Times (s) of every variant that runs, and a line per variant that does not."""
    model = build_model(MODELS[arch], INPUT_SHAPE, CLASSES).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, *INPUT_SHAPE, generator=gen).to(device)
    y = torch.randint(0, CLASSES, (batch,), generator=gen).to(device)
    variants, skipped = [], []
    for name, build in BUILDERS:
        try:
            variant = build(model, x, y)
            if name in PEERS:
                variant.step()  # a peer that breaks on this torch is reported, not fatal
            variants.append(variant)
        except Unavailable as exc:
            skipped.append(f"{arch:<6}{name:<26}{exc}")
        except Exception as exc:
            if name not in PEERS:
                raise
            skipped.append(f"{arch:<6}{name:<26}failed: {type(exc).__name__}: {exc}")
    reference = torch_func(model, x, y)
    check(variants, reference.read(reference.step()))
    print(f"{arch}: checked {', '.join(v.name for v in variants if v.name != 'plain')} against torch.func vmap")
    for v in variants:
        for _ in range(WARMUP):
            v.step()
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(repeats):
        k = r % len(variants)  # rotate the order so no variant always runs after the same one
        for v in variants[k:] + variants[:k]:
            times[v.name].append(time_step(v.step, device))
    return times, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mlp", "cnn", "vit"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    # BackPACK and Opacus hook modules whose inputs need no gradient (the first layer); harmless here
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, batch {args.batch}, {args.repeats} repeats after {WARMUP} warm-up")
    results = {arch: bench_model(arch, args.batch, args.repeats, device) for arch in args.models}

    print(f"\n{'model':<6}{'variant':<26}{'median ms':>10}{'ratio to plain':>16}{'min ms':>9}")
    medians: dict[str, dict[str, float]] = {}
    for arch, (times, skipped) in results.items():
        med = medians[arch] = {name: statistics.median(t) for name, t in times.items()}
        for name, t in times.items():
            print(f"{arch:<6}{name:<26}{1e3 * med[name]:>10.2f}{med[name] / med['plain']:>16.2f}{1e3 * min(t):>9.2f}")
        for line in skipped:
            print(line)

    print(f"\n{'model':<6}{'target':<40}{'ratio':>7}  verdict")
    for arch, med in medians.items():
        for what, variant, base, limit in TARGETS_OF.get(arch, TARGETS):
            if variant not in med or base not in med:
                print(f"{arch:<6}{what:<40}{'-':>7}  n/a ({base if base not in med else variant} did not run)")
                continue
            ratio = med[variant] / med[base]
            print(f"{arch:<6}{what:<40}{ratio:>7.2f}  {'PASS' if ratio <= limit else 'MISS'}")


if __name__ == "__main__":
    main()
