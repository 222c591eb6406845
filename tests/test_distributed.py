"""Recording under torchrun (SPEC section 6): 2 gloo processes on CPU write the store one process writes.

Each case launches `torchrun --standalone --nproc-per-node 2 -m gentrace record` on a tiny config
and compares every stream with an in-process single-process run: float arrays to float32 summation
order (the ranks' gradients are summed by the all-reduce in another order), counts, steps,
predicted classes and activation bitmasks exactly. The sizes are chosen so that batches, the probe
set and the splits do not divide evenly between the two ranks.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import StopAt
from torch import nn

from gentrace.core import config
from gentrace.core.errors import ConfigError
from gentrace.record.ranks import Dist
from gentrace.reporting.summary import render, summarize
from gentrace.store.reader import StoreReader
from gentrace.training import run
from gentrace.training.distributed import check_config

RTOL, ATOL = 1e-5, 1e-6  # float32 values of order 1-10 summed in another order over ~100 samples

BASE = [
    "data.n_train=99",  # batches of 20 (last 19) split 10/10 and 10/9; probe sets 50/49
    "data.n_test=51",
    "train.epochs=3",
    "train.batch_size=20",
    "train.replicates=2",
    "record.checkpoint_every_s=0",
    "record.activations.probe=99",
    "record.lipschitz_fine.every_steps=1",
]

# the synthetic sinusoid set: digits would import scikit-learn in every process (~1 s of CPU each)
CLASSIFY = [*BASE, "data.name='sinusoid'", "data.dim=10", "model.hidden=[16]", "record.grad_moments.every_steps=4"]
# regression, moments from the training batches, resumed under torchrun from a 1-process checkpoint
REGRESS = [
    *BASE,
    "data.name='product'",
    "model.hidden=[16, 16]",
    "record.grad_moments.source='train-batches'",
    "record.grad_moments.every_steps=4",
    "record.grad_moments.every_epochs=0",  # rows at 4, 8, 12: steps 13-15 stay partial in the last checkpoint
]


DRIVERS = Path(__file__).parent / "drivers"


def torchrun(
    tmp_path: Path, *args: str, ok: bool = True, driver: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`gentrace record ARGS` on 2 CPU processes (`driver`: a script and its arguments in place of `-m gentrace`)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [*(driver or ["-m", "gentrace"]), "record", *args, "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert (done.returncode == 0) == ok, done.stderr[-6000:]
    return done


def sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def assert_same(one: Path, two: Path, processes: int = 2) -> None:
    a, b = StoreReader(one), StoreReader(two)
    assert a.streams() == b.streams()
    for paths in a.streams().values():
        for path in paths:
            x, y = a.array(path), b.array(path)
            assert x.shape == y.shape, path
            if x.dtype.kind == "f":
                np.testing.assert_allclose(y, x, rtol=RTOL, atol=ATOL, err_msg=path)
            else:  # steps, sample counts, sign counts, predicted classes, bitmasks
                assert np.array_equal(x, y), path
    assert (a.attrs["processes"], b.attrs["processes"]) == (1, processes)  # the processes that started each run
    assert b.attrs["status"] == "complete"


def test_two_processes_equal_one(tmp_path: Path) -> None:
    one = run.record(config.load(None, CLASSIFY), tmp_path / "one.zarr", device="cpu")
    done = torchrun(tmp_path, *sets(CLASSIFY), "--out", "two.zarr")
    assert_same(one, tmp_path / "two.zarr")
    # rank 0 alone prints: the store path once on stdout, and no progress bar from the other rank
    assert done.stdout.split() == ["two.zarr"]
    assert done.stderr.count("store written") == 1
    assert "error" not in done.stderr
    assert "cpu x 2 processes (torchrun)" in render(summarize(StoreReader(tmp_path / "two.zarr")))


def test_rank_0_store_error_stops_every_rank_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "taken.zarr").mkdir()
    done = torchrun(tmp_path, *sets(CLASSIFY), "--out", "taken.zarr", ok=False)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: taken.zarr already exists; pass --overwrite to replace it or --resume to continue it"]
    assert not any((tmp_path / "taken.zarr").iterdir())


def test_error_on_rank_1_alone_is_printed_with_its_rank(tmp_path: Path) -> None:
    """Data must be readable on every node: rank 1 alone failing to read it says so, under its rank."""
    driver = [str(DRIVERS / "rank_fails.py"), "1"]
    done = torchrun(tmp_path, *sets(CLASSIFY), "--out", "two.zarr", ok=False, driver=driver)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: [rank 1] data.root = 'data/mnist' holds no MNIST files on this node"]


def grad_state(path: Path, step: int) -> list[dict[str, np.ndarray]]:
    """The partial train-batches moments that the checkpoint at `step` carries, per replicate."""
    payload = StoreReader(path).checkpoint(step)
    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    out = []
    for moments in state["extra"]["probes"]["grad"]["moments"]:
        out.append({f"{n}/{f}": getattr(t, f).numpy() for n, t in moments.tensors.items() for f in ("sum", "sign_sum")})
    return out


def test_resume_under_torchrun_with_train_batches(tmp_path: Path) -> None:
    cfg = config.load(None, REGRESS)
    one = run.record(cfg, tmp_path / "one.zarr", device="cpu")
    with pytest.raises(run.Interrupted):
        run.record(cfg, tmp_path / "two.zarr", device="cpu", observers=[StopAt(7)])
    torchrun(tmp_path, "--resume", "--out", "two.zarr", "--quiet")
    assert_same(one, tmp_path / "two.zarr", processes=1)
    # The last checkpoint holds the moments of steps 13-15 from both ranks, not rank 0's share only.
    for left, right in zip(grad_state(one, 15), grad_state(tmp_path / "two.zarr", 15), strict=True):
        assert left.keys() == right.keys()
        for key in left:
            np.testing.assert_allclose(right[key], left[key], rtol=RTOL, atol=ATOL, err_msg=key)


@pytest.mark.parametrize("world", [1, 2, 3, 7])
@pytest.mark.parametrize("n", [0, 1, 5, 20, 99])
def test_shards_cover_in_order(world: int, n: int) -> None:
    pieces = [Dist(r, world).bounds(n) for r in range(world)]
    assert pieces[0][0] == 0
    assert pieces[-1][1] == n
    assert all(hi == lo for (_, hi), (lo, _) in zip(pieces, pieces[1:], strict=False))
    sizes = [hi - lo for lo, hi in pieces]
    assert max(sizes) - min(sizes) <= 1


def test_batchnorm_on_cpu_is_refused() -> None:
    cfg = config.load(None, ["model.arch='cnn'"])
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ConfigError, match=r"model\.arch = 'cnn' has BatchNorm"):
        check_config(cfg, model, torch.device("cpu"))
    assert check_config(cfg, nn.Linear(4, 4), torch.device("cpu")) is not None
