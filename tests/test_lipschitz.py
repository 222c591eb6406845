"""Lipschitz analysis: batched input-gradient norms against per-point float64 autograd and the closed form."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from gentrace.analyses import lipschitz
from gentrace.analyses.replay import Replay
from gentrace.core import config
from gentrace.core.config import ModelConfig
from gentrace.core.errors import AnalysisInputError, MissingStreamError
from gentrace.store.reader import StoreReader
from gentrace.task.models import build_model
from gentrace.training import run

RTOL, ATOL = 1e-4, 1e-6  # float32 batched values vs float64 references


def _batchnorm_cnn(k: int) -> nn.Module:
    """A small conv net with BatchNorm (resnet-like blocks without the cost): `[B, 3, 8, 8] -> [B, k]`."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16, k),
    )


# (id, model: a model config or a builder of out_dim, input shape, outputs)
CASES: list[tuple[str, ModelConfig | Callable[[int], nn.Module], tuple[int, ...], int]] = [
    ("mlp-1out", ModelConfig(arch="mlp", hidden=(16, 16, 16)), (5,), 1),
    ("mlp-3out", ModelConfig(arch="mlp", hidden=(16, 16)), (5,), 3),
    ("cnn-4out", ModelConfig(arch="cnn", hidden=(12,), channels=4), (1, 8, 8), 4),
    ("cnn-1out-3ch", ModelConfig(arch="cnn", hidden=(8,), channels=3), (3, 6, 10), 1),
    ("batchnorm-cnn-3out", _batchnorm_cnn, (3, 8, 8), 3),
]


def _brute(model: nn.Module, x: torch.Tensor, jacobian: bool) -> np.ndarray:
    """One point at a time, float64: the gradient of the selected output, or the full Jacobian's spectral norm."""
    m64 = copy.deepcopy(model).double().eval()
    out = []
    for xi in x.double():
        xi = xi[None].clone().requires_grad_(True)
        f = m64(xi).reshape(-1)
        if jacobian:
            rows = [torch.autograd.grad(f[k], xi, retain_graph=True)[0].reshape(-1) for k in range(len(f))]
            out.append(torch.linalg.matrix_norm(torch.stack(rows), ord=2).item())
        else:
            c = 0 if len(f) == 1 else int(f.argmax())
            out.append(torch.autograd.grad(f[c], xi)[0].norm().item())
    return np.array(out)


def _closed_form_jacobian(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """W_L S_L ... S_1 W_1 of the active pattern at x [D], in float64: the exact Jacobian [K, D] of a ReLU MLP."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    h, jac = x.double(), torch.eye(len(x), dtype=torch.float64)
    for i, layer in enumerate(linears):
        w, b = layer.weight.double(), layer.bias.double()
        h, jac = w @ h + b, w @ jac
        if i + 1 < len(linears):
            active = (h > 0).double()  # S = diag of the ReLU on/off pattern
            h, jac = h * active, active[:, None] * jac
    return jac


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def case(request: pytest.FixtureRequest) -> tuple[nn.Module, torch.Tensor]:
    _, spec, shape, k = request.param
    model = (build_model(spec, shape, k) if isinstance(spec, ModelConfig) else spec(k)).eval()
    gen = torch.Generator().manual_seed(2)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            # eval mode uses the running statistics: make them (and the affine part) non-trivial
            module.running_mean.normal_(0.0, 0.5, generator=gen)
            module.running_var.uniform_(0.5, 2.0, generator=gen)
            module.weight.data.uniform_(0.5, 1.5, generator=gen)
            module.bias.data.normal_(0.0, 0.5, generator=gen)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            for p in module.parameters():  # non-zero biases, so the active pattern varies over points
                p.data.normal_(0.0, 0.5, generator=gen)
    x = torch.randn((9, *shape), generator=torch.Generator().manual_seed(0))
    return model, x


@pytest.mark.parametrize("jacobian", [False, True], ids=["grad", "jacobian"])
@pytest.mark.parametrize("chunk", [4, None], ids=["chunk4", "auto"])
def test_batched_equals_per_point_autograd(
    case: tuple[nn.Module, torch.Tensor], jacobian: bool, chunk: int | None
) -> None:
    model, x = case
    got = lipschitz.input_gradient_norms(model, x, jacobian=jacobian, chunk=chunk).numpy()
    np.testing.assert_allclose(got, _brute(model, x, jacobian), rtol=RTOL, atol=ATOL)


def test_mlp_closed_form_active_pattern() -> None:
    model = build_model(ModelConfig(arch="mlp", hidden=(16, 16, 16)), (6,), 3).eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    x = torch.randn(31, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        jacs = torch.stack([_closed_form_jacobian(model, xi) for xi in x])  # [N, K, D]
        predicted = model(x).argmax(1)
    grad_norm = jacs[torch.arange(len(x)), predicted].norm(dim=1).numpy()
    spectral = torch.linalg.matrix_norm(jacs, ord=2).numpy()
    np.testing.assert_allclose(lipschitz.input_gradient_norms(model, x).numpy(), grad_norm, rtol=RTOL, atol=ATOL)
    got = lipschitz.input_gradient_norms(model, x, jacobian=True).numpy()
    np.testing.assert_allclose(got, spectral, rtol=RTOL, atol=ATOL)


def test_batching_does_not_mix_points() -> None:
    """A chunk of 7 gives each point the value it gets alone (eval mode: BatchNorm uses running statistics)."""
    model = _batchnorm_cnn(4).eval()
    x = torch.randn(7, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    for jacobian in (False, True):
        together = lipschitz.input_gradient_norms(model, x, jacobian=jacobian)
        alone = torch.cat([lipschitz.input_gradient_norms(model, x[i : i + 1], jacobian=jacobian) for i in range(7)])
        torch.testing.assert_close(together, alone, rtol=RTOL, atol=ATOL)


def test_spectral_norm_both_shapes() -> None:
    jac = torch.randn(5, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    want = torch.linalg.matrix_norm(jac, ord=2)
    torch.testing.assert_close(lipschitz.spectral_norm(jac), want)
    torch.testing.assert_close(lipschitz.spectral_norm(jac.transpose(1, 2)), want)  # K > D: the D x D Gram


def test_empty_and_auto_chunk() -> None:
    model = build_model(ModelConfig(arch="cnn", hidden=(8,), channels=2), (1, 8, 8), 3).eval()
    assert lipschitz.input_gradient_norms(model, torch.zeros(0, 1, 8, 8)).shape == (0,)
    assert lipschitz.auto_chunk(torch.zeros(0, 1, 28, 28)) == lipschitz.CHUNK_ELEMENTS["cpu"] // 784
    assert lipschitz.auto_chunk(torch.zeros(3, 10)) == lipschitz.CHUNK_ELEMENTS["cpu"] // 10


def test_groups_of() -> None:
    assert lipschitz.groups_of("all") == ("train", "test", "far-gaussian", "far-midpoint")
    assert lipschitz.groups_of(["far", "train"]) == ("train", "far-gaussian", "far-midpoint")
    assert lipschitz.groups_of({"far-midpoint", "test"}) == ("test", "far-midpoint")
    for bad in ("nowhere", ["train", "near"], []):
        with pytest.raises(AnalysisInputError, match="where must be one of"):
            lipschitz.groups_of(bad)


def test_quantiles_equal_numpy() -> None:
    v = np.random.default_rng(0).exponential(size=101)
    qs = (0.1, 0.25, 0.5, 0.9, 1.0, 0.0)
    df = lipschitz.compute({"train": v, "far-midpoint": v[:0]}, 8, 2, 1, qs)
    assert list(df.columns) == [
        "step",
        "epoch",
        "replicate",
        "where",
        "q10",
        "q25",
        "q50",
        "q90",
        "max",
        "min",
        "mean",
        "n",
    ]
    row = df.iloc[0]
    np.testing.assert_allclose(row[["q10", "q25", "q50", "q90", "max", "min"]].to_numpy(float), np.quantile(v, qs))
    assert row["mean"] == pytest.approx(v.mean())
    assert (row["n"], row["step"], row["epoch"], row["replicate"]) == (101, 8, 2, 1)
    assert df.iloc[1]["n"] == 0
    assert np.isnan(df.iloc[1]["q50"])


@pytest.mark.parametrize("bad", [(1.5,), (-0.1,), (0.5, 0.5)])
def test_bad_quantiles(bad: tuple[float, ...]) -> None:
    with pytest.raises(AnalysisInputError, match="quantiles"):
        lipschitz.quantile_columns(bad)


def test_far_points() -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((400, 3)) @ np.array([[2.0, 0, 0], [1, 0.5, 0], [0, 0, 0.0]]) + 5).astype(np.float32)
    far = lipschitz.far_points(x, (0, 0))
    again = lipschitz.far_points(x, (0, 0))
    assert all(np.array_equal(far[k], again[k]) for k in far)
    gauss, mid = far["far-gaussian"], far["far-midpoint"]
    assert gauss.shape == mid.shape == x.shape
    assert gauss.dtype == np.float32
    # mean of the data, covariance scaled by FAR_SCALE^2 (loose: 400 samples); the constant axis stays constant
    np.testing.assert_allclose(gauss.mean(0), x.mean(0), atol=1.0)
    cov = np.cov(x, rowvar=False)
    np.testing.assert_allclose(np.cov(gauss, rowvar=False), lipschitz.FAR_SCALE**2 * cov, rtol=0.3, atol=0.5)
    np.testing.assert_allclose(gauss[:, 2], x[0, 2], atol=1e-5)
    # every midpoint is the midpoint of two distinct training points
    x, mid = x[:50], lipschitz.far_points(x[:50], (0, 1))["far-midpoint"]
    pair_mid = (x[:, None] + x[None]) / 2
    np.fill_diagonal(pair_mid[..., 0], np.inf)
    dist = np.abs(pair_mid - mid[:, None, None]).max(-1)
    assert (dist.reshape(len(mid), -1).min(1) < 1e-5).all()


# -- on a recorded store --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = config.load(
        None,
        [
            "data.n_train=40",
            "data.n_test=30",
            "model.hidden=[16,16]",
            "train.epochs=2",
            "train.replicates=2",
            "train.batch_size=16",
            "record.params.every_epochs=1",
        ],
    )
    return run.record(cfg, tmp_path_factory.mktemp("lip") / "digits.zarr", device="cpu")


def test_run_columns_and_rows(store: Path) -> None:
    reader = StoreReader(store)
    df = lipschitz.run(reader, device="cpu")
    assert list(df.columns) == ["step", "epoch", "replicate", "where", "q10", "q50", "q90", "max", "mean", "n"]
    steps = reader.array("params/step")
    assert len(df) == len(steps) * 2 * 4
    assert list(df["where"].iloc[:4]) == ["train", "test", "far-gaussian", "far-midpoint"]
    assert list(df.loc[df["where"] == "test", "n"].unique()) == [30]
    assert list(df.loc[df["where"] != "test", "n"].unique()) == [40]
    np.testing.assert_array_equal(df["epoch"], df["step"] // reader.attrs["steps_per_epoch"])
    far = lipschitz.run(reader, "far", quantiles=(0.5,), device="cpu")
    assert list(far.columns) == ["step", "epoch", "replicate", "where", "q50", "mean", "n"]
    assert set(far["where"]) == {"far-gaussian", "far-midpoint"}


def test_run_computes_only_the_requested_sets(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reader = StoreReader(store)
    sizes: list[int] = []
    norms = lipschitz.input_gradient_norms

    def counting(model: nn.Module, x: torch.Tensor, **kw: object) -> torch.Tensor:
        sizes.append(len(x))
        return norms(model, x, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(lipschitz, "input_gradient_norms", counting)
    df = lipschitz.run(reader, ("train", "far"), quantiles=(0.5,), device="cpu")
    assert list(df["where"].iloc[:3]) == ["train", "far-gaussian", "far-midpoint"]
    assert len(df) == len(sizes) == len(reader.array("params/step")) * 2 * 3
    assert 30 not in sizes  # the 30 test points are never evaluated
    whole = lipschitz.run(reader, "all", quantiles=(0.5,), device="cpu")
    pd.testing.assert_frame_equal(df, whole[whole["where"] != "test"].reset_index(drop=True))


@pytest.mark.parametrize("jacobian", [False, True], ids=["grad", "jacobian"])
def test_run_equals_brute_force_on_the_stored_snapshot(store: Path, jacobian: bool) -> None:
    reader = StoreReader(store)
    df = lipschitz.run(reader, "train", quantiles=(0.1, 0.5, 1.0), jacobian=jacobian, device="cpu")
    g, m = 1, 1  # second snapshot, second replicate
    cfg = config.from_dict(reader.config)
    model = build_model(cfg.model, tuple(reader.attrs["input_shape"]), int(reader.attrs["num_classes"]))
    model.load_state_dict({n: torch.from_numpy(reader.array(f"params/{n}")[g, m]) for n, _ in model.named_parameters()})
    per_point = _brute(model.eval(), Replay(reader).inputs("train", m), jacobian)
    row = df[(df["step"] == reader.array("params/step")[g]) & (df["replicate"] == m)].iloc[0]
    want = [*np.quantile(per_point, (0.1, 0.5, 1.0)), per_point.mean()]
    np.testing.assert_allclose(row[["q10", "q50", "max", "mean"]].to_numpy(float), want, rtol=RTOL)


def test_errors(store: Path, tmp_path: Path) -> None:
    with pytest.raises(AnalysisInputError, match="where must be one of"):
        lipschitz.run(StoreReader(store), "nowhere")
    cfg = config.load(
        None,
        ["data.n_train=20", "data.n_test=10", "model.hidden=[4]", "train.epochs=1", "record.params.every_epochs=0"],
    )
    bare = StoreReader(run.record(cfg, tmp_path / "bare.zarr", device="cpu"))
    with pytest.raises(MissingStreamError, match=r"record\.params\.every_epochs"):
        lipschitz.run(bare, device="cpu")
