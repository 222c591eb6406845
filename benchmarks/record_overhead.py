"""Wall time of training with every stream recorded vs with recording off, side by side.

Three variants of the same config run alternately in one process, `--repeats` times each
(medians reported, machines are noisy):

- off: the bare training loop (no probe, no store);
- probes only: every probe runs (evaluations, host copies, checkpoints) but rows are dropped
  instead of written, which separates the cost of *what* is recorded from the cost of writing it;
- on: `gentrace record` as users run it (store creation, background writer, final resize);
- plain loop: the same training written as a user's own loop (its own batches, optimizer, data order);
- plain loop + Run: that loop recording through `gentrace.Run` with the config's [record] table
  (the quick start's cadence by default): the overhead a user of the library API pays.

Usage: python benchmarks/record_overhead.py [CONFIG] [--repeats 3] [--device cpu] [--set KEY=VALUE ...]
       [--preset cnn] [--root DIR]
(no CONFIG: the quick start). `--preset cnn`: the 2-block CNN (channels 16, fc 128) on 10,000 MNIST-format
images (random pixels and labels, written by this script in torchvision's idx format), batch 128, 3
epochs, gradient moments on 1,000 samples, predictions and metrics every epoch.
Targets (issue 16): on / probes only <= 1.10; on / off <= 2.0 (quick start), <= 1.6 (cnn).

`--streams`: each stream's cost (time inside its probe during probes-only runs) beside its floor
(`floors`: its arithmetic timed alone, warm). The grad stream's floor is also timed beside each of its
rows in those same runs (`_grad_floor`: hooks that keep the operands, forward + backward, the moment
arithmetic), so both sides see the same caches and the same load: on a shared VM the warm floor of a
tight loop is a floor no probe that runs once an epoch, between training steps, can reach.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import struct
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import gentrace
from gentrace.core import config
from gentrace.moments import conv
from gentrace.moments.linear import count_dtype, count_mm
from gentrace.record.grad_moments import probe_batch
from gentrace.store import rootmeta, schema
from gentrace.task.data import build_data
from gentrace.task.models import build_model
from gentrace.training.loop import Trainer
from gentrace.training.run import prepare, record, resolve_device


class DropRows:
    """Stands in for the store writer: takes every row and keeps none."""

    def start(self) -> None:
        pass

    def put(self, block: object) -> None:
        pass


def _train_time(cfg: config.RunConfig, device: str, probes: bool, only: tuple[str, ...] = ()) -> float:
    """Set-up and training, as `on` times them (`record` builds the data and models too).

    `only`: keep just these probes (rows dropped), to time one stream's cost.
    """
    t0 = time.perf_counter()
    trainer, recorder, _ = prepare(cfg, resolve_device(device))
    if only:
        recorder.probes[:] = [p for p in recorder.probes if p.name in only]
    if probes or only:
        recorder.attach(DropRows())  # type: ignore[arg-type]
    else:
        recorder.probes.clear()
    with recorder:
        trainer.run(recorder)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_off(cfg: config.RunConfig, device: str) -> float:
    return _train_time(cfg, device, probes=False)


def time_probes_only(cfg: config.RunConfig, device: str) -> float:
    return _train_time(cfg, device, probes=True)


def time_on(cfg: config.RunConfig, device: str, root: Path, i: int) -> float:
    t0 = time.perf_counter()
    record(cfg, root / f"on-{i}.zarr", device=device)
    return time.perf_counter() - t0


def time_plain_loop(cfg: config.RunConfig, device: str, store: Path | None) -> float:
    """A user's own loop over the config's data, model and SGD; with `store`, recorded by gentrace.Run."""
    dev = resolve_device(device)
    m = cfg.train.replicates
    data = build_data(cfg.data, m)
    net = build_model(cfg.model, data.input_shape, data.num_classes or 1)
    models = [copy.deepcopy(net).to(dev) for _ in range(m)]
    opt = torch.optim.SGD(
        [p for model in models for p in model.parameters()], lr=cfg.train.lr, momentum=cfg.train.momentum
    )
    order = Trainer(cfg, data, models)  # the data order and lr decay of gentrace's own loop
    x, y = data.x_train.to(dev), data.y_train.to(dev)
    batch = cfg.train.batch_size or cfg.data.n_train
    steps = math.ceil(cfg.data.n_train / batch)
    run = None
    if store is not None:
        trains = [(data.x_train[i], data.y_train[i]) for i in range(m)]
        run = gentrace.Run(
            store,
            models,
            train=trains,
            test=(data.x_test, data.y_test),
            record=config.to_dict(cfg.record),
            epochs=cfg.train.epochs,
            steps_per_epoch=steps,
            optimizer=opt,
            overwrite=True,
        )
    t0 = time.perf_counter()
    if run is not None:
        run.__enter__()
    for epoch in range(cfg.train.epochs):
        for group in opt.param_groups:
            group["lr"] = order.lr_at(epoch)
        perm = order.order(epoch).to(dev)
        for start in range(0, cfg.data.n_train, batch):
            idx = perm[:, start : start + batch]
            xs = [x[i][idx[i]] for i in range(m)]
            ys = [y[i][idx[i]] for i in range(m)]
            opt.zero_grad(set_to_none=True)
            losses = [torch.nn.functional.cross_entropy(model(xs[i]), ys[i]) for i, model in enumerate(models)]
            torch.stack(losses).sum().backward()
            opt.step()
            if run is not None:
                run.step(losses, ys)
    if run is not None:
        run.__exit__(None, None, None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


CNN_PRESET = [
    "name='cnn-mnist'",
    "data.name='mnist'",
    "data.n_train=10000",
    "data.n_test=2000",
    "model.arch='cnn'",
    "model.channels=16",
    "model.hidden=[128]",
    "train.batch_size=128",
    "train.epochs=3",
    "train.replicates=1",
    "train.lr_decay={every_epochs=0}",
    "record.grad_moments.samples=1000",
]


def write_mnist_format(root: Path, n_train: int = 10000, n_test: int = 2000) -> None:
    """Random 28x28 uint8 images and labels 0..9 as torchvision's MNIST idx files under root/MNIST/raw."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, array in (
            ("images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
            ("labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8)),
        ):
            header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
            (raw / f"{prefix}-{kind}").write_bytes(header + array.tobytes())


# Streams timed alone (the metrics and predictions probes share one evaluation, so they go together).
GROUPS = {
    "metrics + preds": (schema.METRICS.name, schema.PREDS.name),
    "grad": (schema.GRAD.name,),
    "acts": (schema.ACTS.name,),
    "params": (schema.PARAMS.name,),
    "params_fine": (schema.PARAMS_FINE.name,),
    "metrics_fine": (schema.METRICS_FINE.name,),
    "lipschitz_fine": (schema.LIPSCHITZ_FINE.name,),
}


def probe_seconds(cfg: config.RunConfig, device: str) -> tuple[dict[str, float], float | None]:
    """Seconds spent inside each stream's probe (all its calls) during one probes-only run, by GROUPS.

    Timed inside the probes rather than as (run with it) - (run without): a stream costing 0.05 s of a
    0.5 s run is below the run-to-run noise of a loaded 2-core machine. Also returns the grad stream's
    floor timed beside each of its rows in the same run (`_grad_floor`), None without that stream.
    """
    trainer, recorder, data = prepare(cfg, resolve_device(device))
    recorder.attach(DropRows())  # type: ignore[arg-type]
    spent: dict[str, float] = {}
    grad_floor = _grad_floor(cfg, trainer, recorder, data, device)
    floor = {"s": 0.0, "rows": 0}
    for probe in recorder.probes:
        group = next((g for g, names in GROUPS.items() if probe.name in names), probe.name)
        rows_at = probe.steps if group == "grad" and grad_floor is not None else set()  # type: ignore[attr-defined]
        for method in ("at_step", "after_step", "before_backward", "after_backward", "flush"):
            original = getattr(probe, method)

            def timed(
                *args: object, _original: object = original, _group: str = group, _rows: object = rows_at
            ) -> object:
                # the grad floor beside each grad row: before it on even rows, after it on odd ones, so
                # neither side always finds the caches the other warmed
                beside = _original.__name__ == "at_step" and args[0] in _rows  # type: ignore[attr-defined, operator]
                first = beside and floor["rows"] % 2 == 0
                if first:
                    floor["s"] += grad_floor()  # type: ignore[misc]
                t0 = time.perf_counter()
                result = _original(*args)  # type: ignore[operator]
                result = list(result) if result is not None else result  # generators run here
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                spent[_group] = spent.get(_group, 0.0) + time.perf_counter() - t0
                if beside:
                    if not first:
                        floor["s"] += grad_floor()  # type: ignore[misc]
                    floor["rows"] += 1
                return result

            setattr(probe, method, timed)
    with recorder:
        trainer.run(recorder)
    return spent, (floor["s"] if grad_floor is not None else None)


def _fwd_bwd(trainer: Trainer, data: object, samples: int) -> Callable[[int], None]:
    """Replicate m's forward + backward with parameter gradients over its first `samples` training samples,
    in the probe's own batches (`probe_batch`: larger ones are cheaper per sample)."""
    models, x, y = trainer.models, trainer.data.x_train, trainer.data.y_train
    regression = not data.num_classes  # type: ignore[attr-defined]
    loss_fn = torch.nn.functional.mse_loss if regression else torch.nn.functional.cross_entropy
    step = probe_batch(x[0])

    def fwd_bwd(m: int) -> None:
        for i in range(0, samples, step):
            models[m].zero_grad()
            out_m = models[m](x[m][i : min(i + step, samples)])
            target = y[m][i : min(i + step, samples)]
            loss_fn(out_m.squeeze(-1) if regression else out_m, target).backward()

    return fwd_bwd


def _grad_floor(
    cfg: config.RunConfig, trainer: Trainer, recorder: object, data: object, device: str
) -> Callable[[], float] | None:
    """One grad row's floor, timed where the row is taken (during training, as the probe runs).

    Per replicate, in eval mode as the probe: `_fwd_bwd` with hooks that keep each layer's input and
    output gradient (the least any implementation needs to get at them), then `_moment_arithmetic` on
    those operands, timed together: nothing of it runs on caches or memory another pass warmed, as the
    probe's rows do not. The parameters' gradients and the models' modes are put back, so training goes
    on as it would. None: no probe-source grad stream.
    """
    probe = next((p for p in recorder.probes if p.name == schema.GRAD.name), None)  # type: ignore[attr-defined]
    if probe is None or cfg.record.grad_moments.source != "probe":
        return None
    fwd_bwd = _fwd_bwd(trainer, data, probe.samples)

    def one(model: torch.nn.Module, m: int) -> None:
        for mod, a, d in _layer_operands([model], lambda _: fwd_bwd(m)):
            _moment_arithmetic(mod, a, d)

    def row() -> float:
        seconds = 0.0
        for m, model in enumerate(trainer.models):
            grads = [p.grad for p in model.parameters()]
            was_training = model.training
            model.eval()
            t0 = time.perf_counter()
            one(model, m)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            model.train(was_training)
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g
        return seconds

    return row


FLOOR_REPEATS = 5


def _timed(fn: object, device: str) -> float:
    """Seconds of `fn()`: the median of FLOOR_REPEATS calls (a floor timed once is as noisy as the machine)."""
    seconds = []
    for _ in range(FLOOR_REPEATS):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def _layer_operands(
    models: list[torch.nn.Module], fwd_bwd: Callable[[int], None]
) -> list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]:
    """(module, input, output gradient) of every nn.Linear and nn.Conv2d in one forward + backward of each replicate."""
    captured: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] = []
    inputs: dict[torch.nn.Module, torch.Tensor] = {}
    for m, model in enumerate(models):
        handles = []
        for module in model.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                handles.append(module.register_forward_hook(lambda mod, a, out: inputs.__setitem__(mod, a[0].detach())))
                handles.append(
                    module.register_full_backward_hook(
                        lambda mod, gin, gout: captured.append((mod, inputs[mod], gout[0].detach()))
                    )
                )
        with warnings.catch_warnings():  # "full backward hook is firing ... no inputs require gradients": expected
            warnings.simplefilter("ignore")
            fwd_bwd(m)
        for handle in handles:
            handle.remove()
    return captured


def _moment_arithmetic(module: torch.nn.Module, a: torch.Tensor, delta: torch.Tensor) -> None:
    """What the moments add to a layer's backward (SPEC section 4), written out here, not the engine's rule.

    nn.Linear: sum_i g_i is the backward's own weight gradient, so only sumsq = (D^2)^T (A^2) and the sign
    counts (one count GEMM [sign(D) | |sign(D)|]^T sign(A) after a ReLU, two otherwise, as exact int8 or
    float GEMMs, whichever `count_mm` finds faster here), plus the bias's column sums of D^2 and the signs.
    nn.Conv2d: every sample's weight gradient (the convolution's own weight-gradient kernel, per sample)
    reduced into sum, sumsq and the counts; no GEMM identity avoids forming them.
    """
    if isinstance(module, torch.nn.Conv2d):
        conv.moments(module, a, delta)
        return
    bias = module.bias is not None
    d2 = delta.square()
    d2.T @ a.square()
    if bias:
        d2.sum(0)
    if not a.numel() or a.amin().item() >= 0:
        sign_d = delta.sign().to(count_dtype(delta))
        left = torch.cat([sign_d, sign_d.abs()], dim=1)
        count_mm(left.T, a.sign())
        if bias:  # the bias's counts are the sign stack's column sums
            left.sum(0, dtype=torch.int32)
    else:
        sign_d = delta.sign()
        abs_d = sign_d.abs()
        count_mm(sign_d.T, a.sign()), count_mm(abs_d.T, a.sign().abs())
        if bias:
            sign_d.sum(0), abs_d.sum(0)


def floors(cfg: config.RunConfig, device: str) -> dict[str, float]:
    """Each stream's arithmetic, timed in this run: what recording it cannot cost less than.

    - metrics + preds: one no-grad forward over every evaluated sample (each replicate's training set and
      the test set) at the training batch size, per evaluation;
    - grad (probe source): one forward + backward with parameter gradients over the moment samples, per row
      and replicate (the moments themselves come on top of it);
    - grad + moment GEMMs: that, plus the arithmetic the moments cannot avoid (`_moment_arithmetic`: for
      nn.Linear the sumsq and sign-count GEMMs, for nn.Conv2d the per-sample gradients and their
      reductions), timed on the real operands of that pass;
    - acts: one no-grad forward over the probe samples, per row;
    - params, params_fine: a host copy of the recorded tensors, per row.
    """
    trainer, recorder, data = prepare(cfg, resolve_device(device))
    probes = {p.name: p for p in recorder.probes}
    models, x = trainer.models, trainer.data.x_train
    batch = trainer.batch
    out: dict[str, float] = {}

    def forward_all(inputs: torch.Tensor, m: int) -> None:
        with torch.no_grad():
            for i in range(0, len(inputs), batch):
                models[m](inputs[i : i + batch])

    if schema.METRICS.name in probes:
        evaluations = len(probes[schema.METRICS.name].steps)
        one = sum(
            _timed(lambda m=m: (forward_all(x[m], m), forward_all(trainer.data.x_test, m)), device)
            for m in range(len(models))
        )
        out["metrics + preds"] = evaluations * one
    if schema.GRAD.name in probes and cfg.record.grad_moments.source == "probe":
        probe = probes[schema.GRAD.name]
        fwd_bwd = _fwd_bwd(trainer, data, probe.samples)  # type: ignore[attr-defined]
        out["grad"] = len(probe.steps) * sum(_timed(lambda m=m: fwd_bwd(m), device) for m in range(len(models)))
        captured = _layer_operands(models, fwd_bwd)
        if captured:
            gemms = _timed(lambda: [_moment_arithmetic(mod, a, d) for mod, a, d in captured], device)
            out["grad + moment GEMMs"] = out["grad"] + len(probe.steps) * gemms
    if schema.ACTS.name in probes:
        probe = probes[schema.ACTS.name]
        count = len(probe.x)  # type: ignore[attr-defined]
        out["acts"] = len(probe.steps) * _timed(lambda: forward_all(x[0][:count], 0), device)
    for name in (schema.PARAMS.name, schema.PARAMS_FINE.name):
        if name in probes:
            probe = probes[name]
            tensors = [dict(m.named_parameters())[t] for m in models for t in probe.names]  # type: ignore[attr-defined]
            copy_once = _timed(
                lambda tensors=tensors: [t.detach().to("cpu", copy=True).numpy() for t in tensors], device
            )
            out[name] = len(probe.steps) * copy_once
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--streams", action="store_true", help="each stream's cost beside its floor")
    parser.add_argument("--no-plain", action="store_true", help="skip the two plain-loop variants")
    parser.add_argument("--preset", choices=["cnn"], default=None, help="the CNN config on MNIST-format files")
    parser.add_argument("--root", type=Path, default=Path("."), help="where the stores are written (default .)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of every variant (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data_root = tempfile.TemporaryDirectory(dir=args.root, prefix=".bench-data-")
    # every variant trains with the same thread count (`on` would otherwise choose its own: train.threads)
    overrides = [f"train.threads={torch.get_num_threads()}", *args.overrides]
    if args.preset == "cnn":
        write_mnist_format(Path(data_root.name))
        overrides = [*CNN_PRESET, f"data.root='{data_root.name}'", *overrides]
    cfg = config.load(args.config, overrides)
    times: dict[str, list[float]] = {"off": [], "probes only": [], "on": [], "plain loop": [], "plain loop + Run": []}
    throughput: list[float] = []  # the `on` stores' writer: MiB handed over / busy s (as `gentrace info` shows)
    per_cpu: list[float] = []  # ... and / the CPU seconds its threads used
    # stores go where users put them (under the current directory, as runs/ does), not into /tmp: on
    # some machines /tmp creates files ~30x slower (0.75 ms vs 0.02 ms here), which a user never sees
    with tempfile.TemporaryDirectory(dir=args.root, prefix=".bench-") as tmp:
        time_off(cfg, args.device)  # warm-up: allocator, kernels, data set cache
        for i in range(args.repeats):
            times["off"].append(time_off(cfg, args.device))
            times["probes only"].append(time_probes_only(cfg, args.device))
            times["on"].append(time_on(cfg, args.device, Path(tmp), i))
            writer = rootmeta.read(Path(tmp) / f"on-{i}.zarr")["attributes"]["writer"]
            throughput.append(writer["bytes"] / 2**20 / writer["busy_s"])
            per_cpu.append(writer["bytes"] / 2**20 / writer["cpu_s"])
            if not args.no_plain:
                times["plain loop"].append(time_plain_loop(cfg, args.device, None))
                times["plain loop + Run"].append(time_plain_loop(cfg, args.device, Path(tmp) / f"run-{i}.zarr"))
        per_stream: dict[str, list[float]] = {}
        in_run: list[float] = []  # the grad floor timed beside each row of those runs
        if args.streams:
            for _ in range(args.repeats):
                spent, beside = probe_seconds(cfg, args.device)
                for group, seconds in spent.items():
                    per_stream.setdefault(group, []).append(seconds)
                if beside is not None:
                    in_run.append(beside)
            floor = floors(cfg, args.device)
    times = {k: v for k, v in times.items() if v}
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"config: {cfg.name} ({cfg.model.arch} on {cfg.data.name}, {cfg.train.epochs} epochs, "
        f"{cfg.train.replicates} replicates), device {args.device}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'variant':<18}{'median s':>10}{'ratio to off':>14}   runs")
    for name, values in times.items():
        runs = " ".join(f"{t:.3f}" for t in values)
        print(f"{name:<18}{medians[name]:>10.3f}{medians[name] / medians['off']:>14.3f}   {runs}")
    # A ratio of medians, and the median of each repeat's own ratio (its variants ran back to back, so a
    # machine that slows down for a while slows both sides of that repeat's ratio alike).
    for label, top, bottom in (
        ("overhead ratio (on / off)", "on", "off"),
        ("probes ratio (probes only / off)", "probes only", "off"),
        ("writer ratio (on / probes only)", "on", "probes only"),
    ):
        paired = statistics.median(t / b for t, b in zip(times[top], times[bottom], strict=True))
        print(f"{label}: {medians[top] / medians[bottom]:.3f} (median of per-repeat ratios {paired:.3f})")
    runs = " ".join(f"{t:.0f}" for t in throughput)
    print(f"writer throughput (MiB handed over / busy s, `on` runs): {statistics.median(throughput):.0f}   {runs}")
    runs = " ".join(f"{t:.0f}" for t in per_cpu)
    print(f"writer throughput (MiB handed over / CPU s of its threads): {statistics.median(per_cpu):.0f}   {runs}")
    if args.streams:
        print(f"{'stream':<18}{'cost s':>10}{'floor s':>10}{'cost / floor':>14}   (cost: time inside its probe)")
        for group, values in per_stream.items():
            cost = statistics.median(values)
            low = floor.get(group)
            ratio = f"{cost / low:>14.2f}" if low else f"{'-':>14}"
            print(f"{group:<18}{cost:>10.3f}{(low if low is not None else float('nan')):>10.3f}{ratio}")
            gemms = floor.get(f"{group} + moment GEMMs")
            if gemms:
                print(f"{'  + moment arith.':<18}{cost:>10.3f}{gemms:>10.3f}{cost / gemms:>14.2f}")
            if group == "grad" and in_run:
                # the same floor timed beside each row, in the same runs: same caches, same load
                pairs = [c / f for c, f in zip(values, in_run, strict=True)]
                low = statistics.median(in_run)
                print(
                    f"{'  ... in the run':<18}{cost:>10.3f}{low:>10.3f}{cost / low:>14.2f}   "
                    f"per run: {' '.join(f'{r:.2f}' for r in pairs)}"
                )
    if "plain loop" in medians:
        plain = medians["plain loop + Run"] / medians["plain loop"]
        print(f"own-loop overhead ratio (plain loop + gentrace.Run / plain loop): {plain:.3f}")


if __name__ == "__main__":
    main()
