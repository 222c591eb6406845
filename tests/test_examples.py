"""examples/ run end to end: record, info, every analysis that applies, resume, torchrun, sweep.

Each example is recorded small (fewer samples and epochs through --set), so the suite stays fast;
the configs themselves are validated as shipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import StopAt, run_cli
from test_distributed import sets, torchrun

from gentrace.analyses.registry import REGISTRY
from gentrace.core import config
from gentrace.store.reader import StoreReader
from gentrace.training import run

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

SMALL = {
    "vit_digits": [
        "data.n_train=48",
        "data.n_test=40",
        "model.options={ patch = 4, dim = 16, depth = 1, heads = 2, hidden = 16 }",
        "train.epochs=2",
        "train.batch_size=16",
        "record.grad_moments.samples=24",
        "record.activations.probe=16",
        "record.checkpoint_every_s=0",
        # the attention's key bias has an exactly zero gradient; Adam divides its rounding noise by its own
        # size and walks it by lr per step, differently in 1 and 2 processes: SGD keeps it where it is
        "train.optimizer='sgd'",
        "train.lr=0.05",
    ],
    "folder_dataset": ["data.n_train=25", "train.epochs=2", "record.checkpoint_every_s=0", "data.options.size=8"],
    "diabetes_residual": ["data.n_train=60", "data.n_test=40", "train.epochs=3", "record.checkpoint_every_s=0"],
}
# torchrun, resume and sweep on the two examples the issue names; all three get record, info and analyses
HEAVY = ["vit_digits", "folder_dataset"]


def write_folder(root: Path, per_class: int = 30, tests: int = 15) -> None:
    """A tiny ImageFolder of 16x16 grey PNGs: class `bright` brighter on the left half, `dark` on the right."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", tests)):
        for label, side in (("bright", 0), ("dark", 1)):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (16, 16)).astype(np.uint8)
                pixels[:, side * 8 : side * 8 + 8] += 150
                Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_folder(root)
    return root


def overrides(name: str, images: Path) -> list[str]:
    extra = [f"data.options.root='{images}'"] if name == "folder_dataset" else []
    return [*SMALL[name], *extra]


def cfg_of(name: str, images: Path) -> config.RunConfig:
    return config.load(EXAMPLES / f"{name}.toml", overrides(name, images))


@pytest.mark.parametrize("name", list(SMALL))
def test_the_shipped_example_config_is_valid(name: str) -> None:
    cfg = config.load(EXAMPLES / f"{name}.toml")
    assert (EXAMPLES / f"{name}.toml").read_text().startswith("#")  # says what it is and how to run it
    assert cfg.model.arch.startswith(str(EXAMPLES)) or cfg.data.name.startswith(str(EXAMPLES))


@pytest.mark.parametrize("name", list(SMALL))
def test_record_info_and_every_analysis_that_applies(name: str, images: Path, tmp_path: Path) -> None:
    store = tmp_path / f"{name}.zarr"
    done = run_cli("record", EXAMPLES / f"{name}.toml", "--out", store, "-q", *sets(overrides(name, images)))
    assert done.returncode == 0, done.stderr
    assert run_cli("info", store).returncode == 0
    reader = StoreReader(store)
    ran = []
    for entry in REGISTRY.values():
        if not entry.suggestions(reader):  # the analyses `record` suggests for this store
            continue
        table = entry.run(reader)
        assert len(table), entry.name
        ran.append(entry.name)
    expected = {"gsnr", "lipschitz", "paths"} | ({"trajectory"} if name != "folder_dataset" else set())
    assert expected <= set(ran)


@pytest.mark.parametrize("name", HEAVY)
def test_interrupt_then_resume_equals_uninterrupted(name: str, images: Path, tmp_path: Path) -> None:
    cfg = cfg_of(name, images)
    ref = run.record(cfg, tmp_path / "ref.zarr", device="cpu")
    with pytest.raises(run.Interrupted):
        run.record(cfg, tmp_path / "cut.zarr", device="cpu", observers=[StopAt(3)])
    run.record(None, tmp_path / "cut.zarr", device="cpu", resume=True)
    a, b = StoreReader(ref), StoreReader(tmp_path / "cut.zarr")
    assert b.status == "complete"
    for paths in a.streams().values():
        for path in paths:
            np.testing.assert_array_equal(a.array(path), b.array(path), err_msg=path)


@pytest.mark.slow
@pytest.mark.parametrize("name", HEAVY)
def test_two_processes_equal_one(name: str, images: Path, tmp_path: Path) -> None:
    cfg = cfg_of(name, images)
    one = run.record(cfg, tmp_path / "one.zarr", device="cpu")
    torchrun(tmp_path, str(EXAMPLES / f"{name}.toml"), *sets(overrides(name, images)), "--out", "two.zarr")
    a, b = StoreReader(one), StoreReader(tmp_path / "two.zarr")
    assert a.streams() == b.streams()
    assert (a.attrs["processes"], b.attrs["processes"]) == (1, 2)
    for paths in a.streams().values():
        for path in paths:
            x, y = a.array(path), b.array(path)
            if x.dtype.kind == "f":
                # two processes sum each row's samples in another order: float32 rounding of the largest terms
                scale = float(np.nanmax(np.abs(x))) if x.size and np.isfinite(x).any() else 1.0
                np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5 * scale, err_msg=path)
            else:
                np.testing.assert_array_equal(x, y, err_msg=path)


@pytest.mark.parametrize("name", HEAVY)
def test_a_sweep_over_model_options(name: str, images: Path, tmp_path: Path) -> None:
    grid = "model.options.dim=8,16" if name == "vit_digits" else "model.options.channels=4,8"
    done = run_cli(
        "sweep", EXAMPLES / f"{name}.toml", "--grid", grid, "-o", tmp_path / "sw", "-q", *sets(overrides(name, images))
    )
    assert done.returncode == 0, done.stderr
    points = json.loads((tmp_path / "sw" / "sweep.json").read_text())["points"]
    assert len(points) == 2
    for point in points:
        assert StoreReader(tmp_path / "sw" / point["store"]).status == "complete"
