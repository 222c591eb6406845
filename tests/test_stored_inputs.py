"""`record.inputs`: the inputs stored in `data/x_train`, `data/x_test`, read back by the analyses that need them.

A store with its inputs gives the analyses the same inputs (so the same tables) as one whose data set
is rebuilt from the config; a store of data and a model given in code (`data.name = "own"`,
`model.arch = "own"`, as gentrace.Run writes) is analysed with the network passed as `model=`, and
without it (or without stored inputs) the error names the fix. Large static arrays are chunked by rows.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from conftest import one_error_line
from torch import nn
from typer.testing import CliRunner

from gentrace.analyses import lipschitz, mi, replay
from gentrace.analyses.replay import Replay
from gentrace.cli import output
from gentrace.cli.app import app
from gentrace.core import config
from gentrace.core.errors import AnalysisInputError
from gentrace.store import rootmeta, schema
from gentrace.store.reader import StoreReader
from gentrace.store.writer import create_store
from gentrace.task import budget
from gentrace.task.data import build_data
from gentrace.task.losses import output_dim, resolve_loss
from gentrace.task.models import build_model
from gentrace.training import run

# digits (8x8 images: the cnn references apply), two replicates, params and predictions only
TINY = [
    "data.n_train=40",
    "data.n_test=30",
    "model.hidden=[16]",
    "train.epochs=2",
    "train.batch_size=16",
    "train.replicates=2",
    "record.checkpoint_every_s=0",
    "record.params_fine.every_steps=0",
    "record.grad_moments.every_epochs=0",
    "record.activations.every_epochs=0",
]
INPUT_ARRAYS = (schema.DATA.x_train, schema.DATA.x_test)


def _without_inputs(store: Path, copy: Path) -> Path:
    shutil.copytree(store, copy)
    for path in INPUT_ARRAYS:
        shutil.rmtree(copy / path)
    return copy


def _as_own(store: Path) -> Path:
    """Rewrite the store's config as gentrace.Run writes it for data, a model and an optimizer given in code."""
    raw = StoreReader(store).config
    raw["data"]["name"] = raw["model"]["arch"] = raw["train"]["optimizer"] = config.OWN
    raw["model"] = {k: v for k, v in raw["model"].items() if k not in ("hidden", "channels", "dropout")}
    rootmeta.update_attrs(store, {"config": config.to_dict(config.from_dict(raw))})
    return store


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`inputs` (record.inputs = true), `rebuilt` (the same store without its inputs) and their `own` versions.

    Every copy is made before any analysis runs (an mi reference cached in one store would travel).
    """
    root = tmp_path_factory.mktemp("inputs")
    inputs = run.record(config.load(None, [*TINY, "record.inputs=true"]), root / "inputs.zarr", device="cpu")
    rebuilt = _without_inputs(inputs, root / "rebuilt.zarr")
    own = _as_own(shutil.copytree(inputs, root / "own.zarr"))
    own_bare = _as_own(_without_inputs(inputs, root / "own-bare.zarr"))
    return {"inputs": inputs, "rebuilt": rebuilt, "own": own, "own-bare": own_bare}


def _network(reader: StoreReader, seed: int) -> nn.Module:
    """The run's architecture as a user's own object: built with another seed (the snapshots replace its values)."""
    cfg = config.load(None, TINY)
    k = int(reader.attrs["num_classes"])
    model = build_model(
        dataclasses.replace(cfg.model, seed=seed),
        tuple(reader.attrs["input_shape"]),
        output_dim(resolve_loss(str(reader.attrs["loss"]), k), k),
    )
    return model.requires_grad_(False)


def _cli(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _csv(table: pd.DataFrame, tmp_path: Path) -> str:
    out = tmp_path / "table.csv"
    output.write(table, "csv", out)
    return out.read_text()


# -- writing ----------------------------------------------------------------------------------------
def test_the_stored_inputs_are_the_built_data_set(stores: dict[str, Path]) -> None:
    reader = StoreReader(stores["inputs"])
    cfg = config.from_dict(reader.config)
    data = build_data(cfg.data, cfg.train.replicates)
    x_train, x_test = reader.array(schema.DATA.x_train), reader.array(schema.DATA.x_test)
    assert x_train.shape == (2, 40, 1, 8, 8)
    assert x_test.shape == (30, 1, 8, 8)
    assert x_train.dtype == x_test.dtype == np.float32
    np.testing.assert_array_equal(x_train, data.x_train.numpy())
    np.testing.assert_array_equal(x_test, data.x_test.numpy())
    assert reader.lazy(schema.DATA.x_train).attrs["gentrace_codec"] == "float"
    plain = run.static_arrays(data, config.RecordConfig())
    assert not set(INPUT_ARRAYS) & set(plain)
    assert set(run.static_arrays(data, cfg.record)) == set(plain) | set(INPUT_ARRAYS)


def test_the_store_estimate_counts_the_inputs(stores: dict[str, Path]) -> None:
    cfg = config.from_dict(StoreReader(stores["inputs"]).config)
    without = dataclasses.replace(cfg, record=dataclasses.replace(cfg.record, inputs=False))
    (part,) = [p for p in budget.store_parts(cfg) if p not in budget.store_parts(without)]
    assert "record.inputs" in part.what
    on_disk = sum(f.stat().st_size for path in INPUT_ARRAYS for f in (stores["inputs"] / path).rglob("*"))
    assert 0 < part.nbytes <= on_disk
    assert part.nbytes == (2 * 40 + 30) * 64 * 4 // budget.INT_COMPRESSION  # digits pixels compress like integers


# -- reading ----------------------------------------------------------------------------------------
def test_the_stored_data_set_equals_the_rebuilt_one(stores: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    rebuilt = Replay(StoreReader(stores["rebuilt"])).data()

    def refused(*_: object) -> None:
        raise AssertionError("a store with its inputs was rebuilt from the config")

    monkeypatch.setattr(replay, "build_data", refused)
    stored = Replay(StoreReader(stores["inputs"])).data()
    for field in dataclasses.fields(stored):
        got, want = getattr(stored, field.name), getattr(rebuilt, field.name)
        if isinstance(want, torch.Tensor):
            assert got.dtype == want.dtype, field.name
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        elif isinstance(want, np.ndarray):
            assert got.dtype == want.dtype, field.name
            np.testing.assert_array_equal(got, want)
        else:
            assert got == want, field.name


def test_lipschitz_is_the_same_with_stored_inputs(stores: dict[str, Path]) -> None:
    stored = lipschitz.run(StoreReader(stores["inputs"]), quantiles=(0.5, 1.0), device="cpu")
    rebuilt = lipschitz.run(StoreReader(stores["rebuilt"]), quantiles=(0.5, 1.0), device="cpu")
    assert len(stored) == 3 * 2 * 4  # snapshots x replicates x point sets
    pd.testing.assert_frame_equal(stored, rebuilt, check_exact=True)


@pytest.mark.parametrize("reference", ["linear", "fit-linear", "cnn2"])
def test_mi_references_are_the_same_with_stored_inputs(stores: dict[str, Path], reference: str) -> None:
    stored = mi.run(StoreReader(stores["inputs"]), reference, cache=False)
    rebuilt = mi.run(StoreReader(stores["rebuilt"]), reference, cache=False)
    pd.testing.assert_frame_equal(stored, rebuilt, check_exact=True)


# -- data and a model given in code ----------------------------------------------------------------
def test_lipschitz_with_the_given_model_equals_the_command_line(stores: dict[str, Path], tmp_path: Path) -> None:
    reader = StoreReader(stores["own"])
    net = _network(reader, seed=123)
    net.register_buffer("scale", torch.ones(1), persistent=False)  # in no checkpoint: the copy keeps its own
    before = {n: p.clone() for n, p in net.named_parameters()}
    given = lipschitz.run(reader, "all", device="cpu", model=net)
    code, stdout, stderr = _cli("analyze", "lipschitz", stores["inputs"], "--device", "cpu")
    assert code == 0, stderr
    assert _csv(given, tmp_path) == stdout
    for name, p in net.named_parameters():  # the user's network is copied, never loaded itself
        torch.testing.assert_close(p, before[name], rtol=0, atol=0)


def test_a_store_of_a_model_given_in_code_needs_it(stores: dict[str, Path]) -> None:
    code, stdout, stderr = _cli("analyze", "lipschitz", stores["own"], "--device", "cpu")
    assert code == 2
    line = one_error_line(stderr)
    assert "model.arch = 'own'" in line
    assert 'factory="package.module:function"' in line
    assert f"gentrace.analyses.lipschitz.run(StoreReader({str(stores['own'])!r}), model=net)" in line
    assert not stdout


def test_data_given_in_code_needs_its_inputs_stored(stores: dict[str, Path]) -> None:
    reader = StoreReader(stores["own-bare"])
    fix = r"own-bare\.zarr: data\.name = 'own' .*lipschitz .*record\.inputs = true"
    with pytest.raises(AnalysisInputError, match=fix):
        lipschitz.run(reader, device="cpu", model=_network(reader, seed=0))
    code, _, stderr = _cli("analyze", "mi", stores["own-bare"])
    assert code == 2
    line = one_error_line(stderr)
    assert "data.name = 'own'" in line
    assert "mi cannot rebuild" in line
    assert "record.inputs = true (in the record table given to gentrace.Run)" in line


def test_mi_of_data_given_in_code_reads_the_stored_inputs(stores: dict[str, Path]) -> None:
    own = mi.run(StoreReader(stores["own"]), "linear", cache=False)
    pd.testing.assert_frame_equal(own, mi.run(StoreReader(stores["rebuilt"]), "linear", cache=False), check_exact=True)


def test_the_budget_check_skips_data_and_a_model_given_in_code(stores: dict[str, Path], tmp_path: Path) -> None:
    budget.check(config.from_dict(StoreReader(stores["own"]).config), tmp_path / "x.zarr")  # sized once built


def test_a_given_model_of_other_tensors_is_refused(stores: dict[str, Path]) -> None:
    reader = StoreReader(stores["own"])
    net = _network(reader, seed=0)
    with pytest.raises(AnalysisInputError, match=r"the given model's parameter 0\.\S+ has no snapshot"):
        Replay(reader, model=nn.Sequential(net)).model()  # every name gains a prefix `0.`
    with pytest.raises(AnalysisInputError, match=r"the store's snapshots hold params/\S+, which the given model lacks"):
        Replay(reader, model=nn.Sequential(*list(net.children())[:-1])).model()  # no last layer


# -- chunks of large static arrays ------------------------------------------------------------------
def test_large_static_arrays_are_chunked_by_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schema, "CHUNK_TARGET_BYTES", 1024)
    rng = np.random.default_rng(0)
    static = {
        schema.DATA.x_train: rng.standard_normal((2, 100, 8), dtype=np.float32),  # a row (one replicate): 3200 B
        schema.DATA.x_test: rng.standard_normal((50, 8), dtype=np.float32),  # 1600 B, 32 B a row
        schema.DATA.train_index: np.arange(200, dtype=np.int64).reshape(2, 100),  # 1600 B
        schema.DATA.test_index: np.arange(50, dtype=np.int64),  # 400 B: one chunk, as before
    }
    create_store(tmp_path / "s.zarr", {}, [], static).close("complete")
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    chunks = {path: group[path].chunks for path in static}  # type: ignore[union-attr]
    assert chunks == {
        schema.DATA.x_train: (1, 25, 8),  # one row is too large: split into blocks of samples
        schema.DATA.x_test: (32, 8),
        schema.DATA.train_index: (1, 100),
        schema.DATA.test_index: (50,),
    }
    files = {path: len([f for f in (tmp_path / "s.zarr" / path).iterdir() if f.name != "zarr.json"]) for path in static}
    assert files == {
        schema.DATA.x_train: 8,
        schema.DATA.x_test: 2,
        schema.DATA.train_index: 2,
        schema.DATA.test_index: 1,
    }
    reader = StoreReader(tmp_path / "s.zarr")
    for path, values in static.items():
        np.testing.assert_array_equal(reader.array(path), values)


def test_static_chunks_at_the_real_limit() -> None:
    """CIFAR-10 sized inputs: chunks of whole samples up to 4 MiB; the small arrays stay one chunk."""

    def spec(path: str, shape: tuple[int, ...], dtype: type = np.float32) -> schema.ArraySpec:
        return schema.static_array(path, np.broadcast_to(np.zeros((), dtype), shape))  # no memory

    x_test = spec(schema.DATA.x_test, (10_000, 3, 32, 32))
    assert x_test.chunks() == (341, 3, 32, 32)  # 341 x 12 KiB <= 4 MiB
    assert x_test.codec == "float"
    x_train = spec(schema.DATA.x_train, (1, 50_000, 3, 32, 32)).chunks()
    assert (x_train[0], x_train[2:]) == (1, (3, 32, 32))
    assert x_train[1] * 3 * 32 * 32 * 4 <= schema.CHUNK_TARGET_BYTES
    labels = spec(schema.DATA.labels_train, (1, 50_000), np.int16)
    assert (labels.chunks(), labels.codec) == ((1, 50_000), "index")
