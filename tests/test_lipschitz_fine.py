"""`lipschitz_fine`: the local Lipschitz constant at the sampled points, measured inside the training step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gentrace.core import config
from gentrace.store.reader import StoreReader
from gentrace.task.models import build_model
from gentrace.training import run


def _grad_norm(model: torch.nn.Module, x: torch.Tensor, pick_argmax: bool) -> np.ndarray:
    """Brute force: one autograd call per point, float64."""
    model = model.double().eval()
    out = []
    for xi in x.double():
        xi = xi[None].requires_grad_(True)
        f = model(xi)[0]
        value = f[f.argmax()] if pick_argmax else f.sum()
        (g,) = torch.autograd.grad(value, [xi])
        out.append(g.norm().item())
    return np.array(out)


CASES = [
    ("cos2d-mse-bs1", ["data.name='cos2d'", "data.dim=10", "train.batch_size=1", "model.hidden=[16, 16]"], 1, False),
    ("cos2d-mse-bs5", ["data.name='cos2d'", "data.dim=10", "train.batch_size=5", "model.hidden=[16, 16]"], 5, False),
    ("digits-ce-bs4", ["data.name='digits'", "train.batch_size=4", "model.hidden=[16]"], 4, True),
]


@pytest.mark.parametrize(("overrides", "batch", "argmax"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_values_equal_autograd_per_point(tmp_path: Path, overrides: list[str], batch: int, argmax: bool) -> None:
    cfg = config.load(
        None,
        [
            "data.n_train=20",
            "data.n_test=10",
            "train.epochs=2",
            "train.replicates=2",
            "record.lipschitz_fine.every_steps=1",
            "record.grad_moments.every_epochs=0",
            "record.activations.every_epochs=0",
            *overrides,
        ],
    )
    trainer, _, data = run.prepare(cfg, torch.device("cpu"))
    reader = StoreReader(run.record(cfg, tmp_path / "s", device="cpu"))
    spe = reader.attrs["steps_per_epoch"]
    assert np.array_equal(reader.array("lipschitz_fine/step"), np.arange(1, 2 * spe + 1))
    out_dim = 1 if data.num_classes == 0 else data.num_classes
    for epoch in (0, 1):
        row = epoch * spe  # the first step of the epoch runs at the parameters of snapshot `epoch`
        idx = trainer.order(epoch)[:, :batch]
        for m in range(2):
            model = build_model(cfg.model, data.input_shape, out_dim)
            state = {n: torch.from_numpy(reader.array(f"params/{n}")[epoch, m]) for n in reader.tensor_names("params")}
            model.load_state_dict(state)
            expected = _grad_norm(model, data.x_train[m][idx[m]], argmax)
            assert reader.array("lipschitz_fine/mean")[row, m] == pytest.approx(expected.mean(), rel=1e-4)
            assert reader.array("lipschitz_fine/max")[row, m] == pytest.approx(expected.max(), rel=1e-4)
