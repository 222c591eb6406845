"""gentrace.Run: a user's own training loop recorded into the store `gentrace record` writes.

- a plain loop with the Trainer's model, data order, optimizer and seed gives the store of
  `gentrace record`, array by array (every stream; M = 2 models side by side, so osgr works);
- a kill between two of the user's checkpoints, then `resume=True` + `load_state_dict`, gives the
  store of an uninterrupted run;
- faults inside the `with` block mark the store and re-raise; misuse is one GentraceError line.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import DRIVERS, ENV, store_attrs

import gentrace
from gentrace.core import config
from gentrace.core.errors import ConfigError, GentraceError, TrainingDiverged
from gentrace.store import schema
from gentrace.store.reader import StoreReader
from gentrace.task.data import build_data
from gentrace.task.models import build_model
from gentrace.training.loop import Trainer
from gentrace.training.run import record

SETS = [
    "data.name=sinusoid",
    "data.dim=10",
    "data.n_train=60",
    "data.n_test=40",
    "model.hidden=[16]",
    "train.lr=0.1",
    "train.momentum=0.9",
    "train.batch_size=20",
    "train.epochs=3",
    "train.replicates=2",
    "train.lr_decay={every_epochs=2, factor=0.5}",
    "record.checkpoint_every_s=0",
    "record.eval_every_steps=1",
    "record.lipschitz_fine.every_steps=2",
    "record.params_fine.every_steps=1",
    "record.predictions.every_steps=2",
]
CADENCES = {
    "probe": ["record.grad_moments.every_steps=2"],
    "train-batches": ["record.grad_moments.source=train-batches", "record.grad_moments.every_steps=4"],
}


def stream_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every committed array of every stream, plus the labels of `data/`."""
    reader = StoreReader(path)
    out = {p: reader.array(p) for paths in reader.streams().values() for p in paths}
    for name in (schema.DATA.labels_train, schema.DATA.labels_test):
        out[name] = reader.array(name)
    return out


def assert_same_stores(a: Path, b: Path) -> None:
    left, right = stream_arrays(a), stream_arrays(b)
    assert sorted(left) == sorted(right)
    for path in left:
        x, y = left[path], right[path]
        assert x.shape == y.shape, path
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-7, err_msg=path)
        else:
            np.testing.assert_array_equal(x, y, err_msg=path)


def plain_loop(cfg: config.RunConfig, out: Path, **kwargs: Any) -> Path:
    """The Trainer's run written as a user writes a loop: its data order, SGD, lr decay, summed replicate losses."""
    m = cfg.train.replicates
    data = build_data(cfg.data, m)
    net = build_model(cfg.model, data.input_shape, 2)
    models = [copy.deepcopy(net) for _ in range(m)]
    params = [p for model in models for p in model.parameters()]
    opt = torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum)
    trainer = Trainer(cfg, data, models)  # for its data order only (`order(epoch)`)
    steps = math.ceil(cfg.data.n_train / cfg.train.batch_size)
    trains = [(data.x_train[i], data.y_train[i]) for i in range(m)]
    run = gentrace.Run(
        out,
        models,
        train=trains,
        test=(data.x_test, data.y_test),
        record=config.to_dict(cfg.record),
        epochs=cfg.train.epochs,
        steps_per_epoch=steps,
        optimizer=opt,
        **kwargs,
    )
    with run:
        for epoch in range(cfg.train.epochs):
            for group in opt.param_groups:
                group["lr"] = trainer.lr_at(epoch)
            order = trainer.order(epoch)
            for start in range(0, cfg.data.n_train, cfg.train.batch_size):
                idx = order[:, start : start + cfg.train.batch_size]
                xs = [data.x_train[i][idx[i]] for i in range(m)]
                ys = [data.y_train[i][idx[i]] for i in range(m)]
                opt.zero_grad(set_to_none=True)
                losses = [torch.nn.functional.cross_entropy(model(xs[i]), ys[i]) for i, model in enumerate(models)]
                sum(losses).backward()  # type: ignore[union-attr]
                opt.step()
                run.step(losses, ys)
    return out


@pytest.mark.parametrize("source", sorted(CADENCES))
def test_plain_loop_store_equals_gentrace_record(tmp_path: Path, source: str) -> None:
    cfg = config.load(None, SETS + CADENCES[source])
    reference = record(cfg, tmp_path / "record.zarr", device="cpu")
    mine = plain_loop(cfg, tmp_path / "own.zarr")
    assert_same_stores(reference, mine)
    attrs = store_attrs(mine)
    assert attrs["status"] == "complete"
    assert attrs["own_loop"]["recorded_by"] == "gentrace.Run"
    assert attrs["total_steps"] == store_attrs(reference)["total_steps"]
    reader = StoreReader(mine)
    assert reader.has(schema.LIPSCHITZ_FINE.name)
    assert reader.committed(schema.GRAD.name) > 0


NETS = Path(__file__).parent / "own_nets.py"


def every_analysis(reader: StoreReader, **library: Any) -> dict[str, int]:
    """Rows of every registered analysis' table at its default options (`library` keywords passed on)."""
    from gentrace.analyses.registry import REGISTRY

    rows = {}
    for name, entry in REGISTRY.items():
        options = {o.name: (o.parse(o.default) if o.parse else o.default) for o in entry.options}
        table = entry.tables(reader, options | (library if name == "lipschitz" else {}))
        frames = [table] if isinstance(table, pd.DataFrame) else list(table)
        rows[name] = sum(len(frame) for frame in frames)
    return rows


def augmented_autocast_loop(out: Path, factory: str | None) -> tuple[Path, list[torch.nn.Module]]:
    """Digits, a small CNN, random crop and flip, bfloat16 autocast on the CPU, two models side by side."""
    from sklearn.datasets import load_digits

    sys.path.insert(0, str(NETS.parent))
    from own_nets import small_cnn

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    y = torch.from_numpy(bunch.target.astype(np.int64))
    train, test = [(x[:80], y[:80]), (x[80:160], y[80:160])], (x[160:220], y[160:220])
    torch.manual_seed(0)
    net = small_cnn((1, 8, 8), 10)
    models = [copy.deepcopy(net), copy.deepcopy(net)]
    opt = torch.optim.SGD([p for m in models for p in m.parameters()], lr=0.05, momentum=0.9)
    record = {
        "checkpoint_every_s": 0,
        "eval_every_steps": 1,
        "inputs": True,
        "lipschitz_fine": {"every_steps": 2},
        "activations": {"probe": 32},
    }
    run = gentrace.Run(
        out, models, train=train, test=test, record=record, epochs=2, steps_per_epoch=4, optimizer=opt, factory=factory
    )
    gen = torch.Generator().manual_seed(0)
    with run:
        for _ in range(2):
            for i in range(4):
                xs, ys = [], []
                for xm, ym in train:
                    xb = torch.nn.functional.pad(xm[i * 20 : (i + 1) * 20], (1, 1, 1, 1))
                    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
                    xb = xb[:, :, dy : dy + 8, dx : dx + 8]  # random crop
                    if torch.rand((), generator=gen) < 0.5:
                        xb = xb.flip(3)  # random horizontal flip
                    xs.append(xb)
                    ys.append(ym[i * 20 : (i + 1) * 20])
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    losses = [torch.nn.functional.cross_entropy(m(xs[k]), ys[k]) for k, m in enumerate(models)]
                sum(losses).backward()  # type: ignore[union-attr]
                opt.step()
                run.step(losses, ys)
    return out, models


def test_augmented_autocast_loop_records_every_stream_and_every_analysis_runs(tmp_path: Path) -> None:
    store, _ = augmented_autocast_loop(tmp_path / "aug.zarr", factory=f"{NETS}:small_cnn")
    reader = StoreReader(store)
    assert set(reader.streams()) == set(schema.STREAMS)
    for stream in schema.STREAMS:
        assert reader.committed(stream) > 0, stream
    rows = every_analysis(reader)
    assert all(count > 0 for count in rows.values()), rows
    # the factory is stored, so the command line rebuilds the network too
    cli = python("-m", "gentrace", "analyze", "lipschitz", store, "--where", "test")
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.startswith("step,")


def test_a_store_without_factory_replays_with_the_model_given_to_the_library(tmp_path: Path) -> None:
    from gentrace.analyses import lipschitz

    store, models = augmented_autocast_loop(tmp_path / "aug.zarr", factory=None)
    table = lipschitz.run(StoreReader(store), where="test", model=models[0])
    assert len(table) > 0
    cli = python("-m", "gentrace", "analyze", "lipschitz", store)
    assert cli.returncode == 2
    lines = cli.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "factory=" in lines[0]
    assert "model=" in lines[0]


def python(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`python ARGS` with this interpreter, to the end, output captured."""
    cmd = [sys.executable, *map(str, args)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, check=False)


def drive(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return python(DRIVERS / "own_loop_driver.py", *args)


def test_kill_between_user_checkpoints_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    full = drive(tmp_path / "full.zarr", tmp_path / "full.pt")
    assert full.returncode == 0, full.stderr
    killed = drive(tmp_path / "cut.zarr", tmp_path / "cut.pt", "--kill-at", 13)
    assert killed.returncode == -9, killed.stderr
    # the store holds rows past the last checkpoint (step 10), which the resume must drop
    assert StoreReader(tmp_path / "cut.zarr").committed(schema.METRICS_FINE.name) == 13
    assert int(torch.load(tmp_path / "cut.pt", weights_only=True)["gentrace"]["step"]) == 10
    resumed = drive(tmp_path / "cut.zarr", tmp_path / "cut.pt", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert store_attrs(tmp_path / "cut.zarr")["status"] == "complete"
    assert_same_stores(tmp_path / "full.zarr", tmp_path / "cut.zarr")


# -- faults and misuse ------------------------------------------------------------------------------


def tiny_run(tmp_path: Path, **kwargs: Any) -> tuple[gentrace.Run, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(24, 4), torch.arange(24) % 3
    options: dict[str, Any] = {"epochs": 2, "steps_per_epoch": 3, "optimizer": opt, "record": {"checkpoint_every_s": 0}}
    options |= kwargs
    run = gentrace.Run(tmp_path / "s.zarr", model, train=(x, y), test=(x[:6], y[:6]), **options)
    return run, model, opt


def one_step(run: gentrace.Run, model: torch.nn.Module, opt: torch.optim.Optimizer, value: float | None = None) -> None:
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    run.step(loss if value is None else torch.tensor(value), y)


def record_steps(
    run: gentrace.Run,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    values: list[float | None],
    then: Any = None,
) -> None:
    """Steps with the batch loss, or the given loss value where not None; then `then()` inside the run."""
    with run:
        for value in values:
            one_step(run, model, opt, value)
        if then is not None:
            then()


def test_step_outside_with_is_one_line_error(tmp_path: Path) -> None:
    run, model, opt = tiny_run(tmp_path)
    with pytest.raises(GentraceError, match=r"outside `with run:`; put the training loop inside"):
        one_step(run, model, opt)


def test_more_steps_than_planned_grow_the_arrays(tmp_path: Path) -> None:
    run, model, opt = tiny_run(tmp_path, record={"checkpoint_every_s": 0, "lipschitz_fine": {"every_steps": 1}})
    with run:
        for _ in range(10):  # 2 epochs x 3 steps planned; 10 steps taken (4 epochs begun)
            one_step(run, model, opt)
    attrs = store_attrs(tmp_path / "s.zarr")
    assert attrs["status"] == "complete"
    assert attrs["total_steps"] == 10
    assert attrs["config"]["train"]["epochs"] == 4
    reader = StoreReader(tmp_path / "s.zarr")
    np.testing.assert_array_equal(reader.array(schema.METRICS_FINE.step), np.arange(1, 11))
    np.testing.assert_array_equal(reader.array(schema.LIPSCHITZ_FINE.step), np.arange(1, 11))
    np.testing.assert_array_equal(reader.array(schema.PARAMS.step), [0, 3, 6, 9])
    assert reader.array(schema.PARAMS.tensor("0.weight")).shape == (4, 1, 8, 4)


def test_parameters_that_change_shape_are_refused(tmp_path: Path) -> None:
    run, model, opt = tiny_run(tmp_path)

    def reshape_and_step() -> None:
        model[2].weight.data = torch.zeros(4, 8)
        run.step()

    with pytest.raises(GentraceError, match=r"parameter 2.weight changed shape from \(3, 8\) to \(4, 8\)"):
        record_steps(run, model, opt, [None], then=reshape_and_step)
    assert store_attrs(tmp_path / "s.zarr")["status"] == "failed"


def test_nan_loss_marks_diverged_or_records_on(tmp_path: Path) -> None:
    run, model, opt = tiny_run(tmp_path)
    with pytest.raises(TrainingDiverged, match=r"the loss became nan at step 2 .*on_nan='continue'"):
        record_steps(run, model, opt, [None, float("nan")])
    attrs = store_attrs(tmp_path / "s.zarr")
    assert attrs["status"] == "diverged"
    assert attrs["committed"][schema.METRICS_FINE.name] == 1  # as `gentrace record`: the NaN step has no row
    run, model, opt = tiny_run(tmp_path, on_nan="continue", overwrite=True)
    record_steps(run, model, opt, [None, None, float("nan"), None, None, None])
    attrs = store_attrs(tmp_path / "s.zarr")
    assert attrs["status"] == "diverged"
    assert attrs["diverged_at_step"] == 3
    assert attrs["committed"][schema.METRICS_FINE.name] == 6


def test_exception_and_interrupt_inside_with_mark_the_store_and_reraise(tmp_path: Path) -> None:
    for error, status in ((RuntimeError("boom"), "failed"), (KeyboardInterrupt(), "interrupted")):
        run, model, opt = tiny_run(tmp_path, overwrite=True)

        def fail(error: BaseException = error) -> None:
            raise error

        with pytest.raises(type(error)):
            record_steps(run, model, opt, [None], then=fail)
        attrs = store_attrs(tmp_path / "s.zarr")
        assert attrs["status"] == status
        assert attrs["committed"][schema.METRICS_FINE.name] == 1


def test_resume_with_another_train_set_length_is_refused(tmp_path: Path) -> None:
    run, model, opt = tiny_run(tmp_path)
    with run:
        one_step(run, model, opt)
        saved = run.state_dict()
    x, y = torch.randn(30, 4), torch.arange(30) % 3
    other = gentrace.Run(
        tmp_path / "s.zarr", model, train=(x, y), test=(x, y), steps_per_epoch=3, optimizer=opt, resume=True
    )
    with pytest.raises(GentraceError, match=r"train set of 24 samples, this run has 30; pass the train set"):
        other.load_state_dict(saved)


def test_resume_without_state_and_accumulation_are_refused(tmp_path: Path) -> None:
    run, model, opt = tiny_run(tmp_path)
    with run:
        one_step(run, model, opt)
    again, model, opt = tiny_run(tmp_path, resume=True)
    with pytest.raises(GentraceError, match=r"call run.load_state_dict\(saved\)"):
        record_steps(again, model, opt, [])
    run, model, opt = tiny_run(
        tmp_path, overwrite=True, record={"grad_moments": {"source": "train-batches", "every_steps": 1}}
    )

    def accumulate() -> None:
        x, y = torch.randn(8, 4), torch.arange(8) % 3
        opt.zero_grad()
        (torch.nn.functional.cross_entropy(model(x), y) + torch.nn.functional.cross_entropy(model(x), y)).backward()

    with pytest.raises(GentraceError, match=r"ran 2 training forwards in one step"):
        record_steps(run, model, opt, [], then=accumulate)


def test_bad_arguments_are_config_errors(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.arange(10) % 3
    with pytest.raises(ConfigError, match=r"pass optimizer= .* or lr="):
        gentrace.Run(tmp_path / "a.zarr", model, train=(x, y), test=(x, y), steps_per_epoch=2)
    with pytest.raises(ConfigError, match=r"loss = 'mse' reads one output; the model has 3"):
        gentrace.Run(tmp_path / "a.zarr", model, train=(x, y), test=(x, y), steps_per_epoch=2, lr=0.1, loss="mse")
    with pytest.raises(ConfigError, match=r"record.grad_moments.source"):
        gentrace.Run(
            tmp_path / "a.zarr",
            model,
            train=(x, y),
            test=(x, y),
            steps_per_epoch=2,
            lr=0.1,
            record={"grad_moments": {"source": "nope"}},
        )
    assert not (tmp_path / "a.zarr").exists()


def test_the_own_loop_example_runs_and_the_cli_analyzes_its_store(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "own_loop.py"
    store = tmp_path / "own.zarr"
    done = python(example, store)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(store)
    assert set(StoreReader(store).streams()) == set(schema.STREAMS)
    for name in ("gsnr", "lipschitz", "trajectory"):
        cli = python("-m", "gentrace", "analyze", name, store)
        assert cli.returncode == 0, cli.stderr
        assert len(cli.stdout.splitlines()) > 1, name  # a header and rows
