"""Users' own model and data factories (`model.arch` / `data.name` = an import path): record, replay, resume, sweep.

Every bad plug-in is one `error:` line naming the key, exit 2, and no store.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import StopAt, one_error_line, run_cli

from gentrace.analyses import gsnr, lipschitz
from gentrace.core import config
from gentrace.core.errors import ConfigError
from gentrace.store import schema
from gentrace.store.reader import StoreReader
from gentrace.training import run

FACTORIES = '''
import numpy as np
import torch
from torch import nn


class Tokens(nn.Module):
    """Not a Sequential: a learned offset on the model itself, LayerNorm, GELU."""

    def __init__(self, d, k, width):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(width))
        self.inp = nn.Linear(d, width)
        self.norm = nn.LayerNorm(width)
        self.act = nn.GELU()
        self.out = nn.Linear(width, k)

    def forward(self, x):
        return self.out(self.act(self.norm(self.inp(x.flatten(1)) + self.offset)))


def net(input_shape, num_outputs, width=8):
    return Tokens(int(np.prod(input_shape)), num_outputs, width)


def blobs(n=300, classes=3, floats=False):
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, n)
    x = rng.standard_normal((n, 5)).astype(np.float32) + y[:, None]
    if floats:
        y = x.sum(1).astype(np.float32)
    return (x[:200], y[:200]), (x[200:], y[200:])


class Pairs(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return torch.as_tensor(self.x[i]), int(self.y[i])


def as_datasets():
    (a, b), (c, d) = blobs()
    return Pairs(a, b), Pairs(c, d)


def broken(**options):
    raise ValueError("the archive is corrupt")


def not_a_module(input_shape, num_outputs, **options):
    return "a string"


def one_split():
    return blobs()[0]


def mismatched():
    (a, b), (c, d) = blobs()
    return (a, b), (c[:, :4], d)


def text_labels():
    (a, b), (c, d) = blobs()
    return (a, b.astype(str)), (c, d.astype(str))


def short_labels():
    (a, b), (c, d) = blobs()
    return (a, b[:10]), (c, d)
'''

CONFIG = """
name = "mine"
[data]
name = "factories.py:blobs"
n_train = 60
n_test = 50
[model]
arch = "factories.py:net"
options = {{ width = 8 }}
seed = 3
[train]
epochs = 2
batch_size = 20
replicates = 2
lr = 0.1
[record]
eval_every_steps = 1
checkpoint_every_s = 0
params = {{ every_epochs = 1, names = "all" }}
params_fine = {{ every_steps = 1, names = ["first_layer.bias"] }}
predictions = {{ every_epochs = 1, splits = ["train", "test"] }}
grad_moments = {{ every_epochs = 1 }}
activations = {{ every_epochs = 0 }}
{extra}
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A researcher's folder: the factories' file and a config naming it by a relative path."""
    (tmp_path / "factories.py").write_text(FACTORIES)
    (tmp_path / "run.toml").write_text(CONFIG.format(extra=""))
    return tmp_path


def load(project: Path, *overrides: str) -> config.RunConfig:
    return config.load(project / "run.toml", list(overrides))


def test_a_file_factory_records_every_stream_and_the_store_names_it(project: Path) -> None:
    path = run.record(load(project), project / "s.zarr", device="cpu")
    reader = StoreReader(path)
    assert reader.status == "complete"
    recorded = reader.attrs["factories"]
    assert recorded["model.arch"]["factory"] == f"{project / 'factories.py'}:net"  # made absolute
    assert recorded["model.arch"]["options"] == {"width": 8}
    assert recorded["data.name"]["file"] == str(project / "factories.py")
    assert len(recorded["data.name"]["sha256"]) == 64
    assert "hidden" not in reader.config["model"]  # built-in-only keys do not apply
    assert set(reader.tensor_names(schema.PARAMS.name)) == {
        "offset", "inp.weight", "inp.bias", "norm.weight", "norm.bias", "out.weight", "out.bias"
    }  # fmt: skip
    assert reader.tensor_names(schema.PARAMS_FINE.name) == ["inp.bias"]  # first_layer: not the model's own offset
    assert set(gsnr.run(reader, by="layer")["layer"]) == set(reader.tensor_names(schema.PARAMS.name))
    # the model's own offset is added to inp's output: per sample, their gradients are the same
    g = reader.array(schema.GRAD.moment("offset", "sumsq"))
    np.testing.assert_allclose(g, reader.array(schema.GRAD.moment("inp.bias", "sumsq")), rtol=1e-5)
    table = lipschitz.run(reader, where="train")  # rebuilt through the same factory
    assert len(table) == 3 * 2
    assert (table["n"] == 60).all()


def test_the_factory_keeps_its_own_init_unless_model_init_is_given(project: Path) -> None:
    assert load(project).model.init == "default"
    assert load(project, "model.init=xavier_uniform").model.init == "xavier_uniform"
    from gentrace.task.models import build_model

    own = build_model(load(project).model, (5,), 3)
    xavier = build_model(load(project, "model.init=xavier_uniform").model, (5,), 3)
    assert not np.allclose(own.inp.bias.detach().numpy(), 0.0)  # nn.Linear's default init
    np.testing.assert_array_equal(xavier.inp.bias.detach().numpy(), 0.0)
    again = build_model(load(project).model, (5,), 3)  # model.seed applies
    np.testing.assert_array_equal(own.inp.weight.detach().numpy(), again.inp.weight.detach().numpy())


def test_a_module_factory_and_map_style_datasets(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.delitem(sys.modules, "factories", raising=False)
    cfg = load(project, "data.name='factories:as_datasets'", "model.arch='factories:net'")
    path = run.record(cfg, project / "m.zarr", device="cpu")
    reader = StoreReader(path)
    assert reader.attrs["factories"]["data.name"]["factory"] == "factories:as_datasets"
    assert int(reader.attrs["num_classes"]) == 3
    same = run.record(load(project), project / "f.zarr", device="cpu")  # the same samples as the pair form
    np.testing.assert_array_equal(
        reader.array(schema.DATA.train_index), StoreReader(same).array(schema.DATA.train_index)
    )
    np.testing.assert_array_equal(
        reader.array(schema.DATA.labels_train), StoreReader(same).array(schema.DATA.labels_train)
    )


def test_float_labels_are_regression_and_label_noise_applies_to_classes(project: Path) -> None:
    path = run.record(load(project, "data.options={ floats = true }"), project / "r.zarr", device="cpu")
    reader = StoreReader(path)
    assert reader.attrs["loss"] == "mse"
    assert int(reader.attrs["num_classes"]) == 0
    noisy = run.record(load(project, "data.label_noise=0.25"), project / "n.zarr", device="cpu")
    assert StoreReader(noisy).array(schema.DATA.noise_mask).sum(axis=1).tolist() == [15, 15]
    with pytest.raises(ConfigError, match="label_noise applies to class labels only"):
        run.record(load(project, "data.options={ floats = true }", "data.label_noise=0.1"), project / "x", device="cpu")


def test_interrupt_then_resume_equals_uninterrupted(project: Path) -> None:
    cfg = load(project)
    ref = run.record(cfg, project / "ref.zarr", device="cpu")
    with pytest.raises(run.Interrupted):
        run.record(cfg, project / "cut.zarr", device="cpu", observers=[StopAt(4)])
    run.record(None, project / "cut.zarr", device="cpu", resume=True)
    a, b = StoreReader(ref), StoreReader(project / "cut.zarr")
    for paths in a.streams().values():
        for p in paths:
            np.testing.assert_array_equal(a.array(p), b.array(p), err_msg=p)


def test_a_sweep_over_model_options(project: Path) -> None:
    done = run_cli("sweep", project / "run.toml", "--grid", "model.options.width=4,6", "-o", project / "sw", "-q")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((project / "sw" / "sweep.json").read_text())
    assert len(manifest["points"]) == 2
    widths = sorted(
        StoreReader(project / "sw" / p["store"]).config["model"]["options"]["width"] for p in manifest["points"]
    )
    assert widths == [4, 6]


def test_analyses_warn_once_when_the_factory_source_changed(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = run.record(load(project), project / "s.zarr", device="cpu")
    with (project / "factories.py").open("a") as f:
        f.write("\n# edited after recording\n")
    capsys.readouterr()
    lipschitz.run(StoreReader(path), where="train")
    lipschitz.run(StoreReader(path), where="test")
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1
    assert "has changed since the run was recorded" in warned[0]


BAD = [
    (
        "missing-module",
        ["data.name='no_such_module_here:blobs'"],
        "data.name: cannot import module 'no_such_module_here'",
    ),
    ("missing-function", ["model.arch='factories.py:nope'"], "has no function 'nope'"),
    (
        "missing-file",
        ["model.arch='elsewhere/models.py:net'"],
        "does not exist; a relative path is relative to the config",
    ),
    ("factory-raises", ["data.name='factories.py:broken'"], "the factory raised ValueError: the archive is corrupt"),
    ("not-a-module", ["model.arch='factories.py:not_a_module'"], "returned a str, not a torch.nn.Module"),
    ("not-two-splits", ["data.name='factories.py:one_split'"], "the factory must return (train, test)"),
    ("shapes-differ", ["data.name='factories.py:mismatched'"], "both splits need the same input shape"),
    ("text-labels", ["data.name='factories.py:text_labels'"], "give integer classes or float targets"),
    ("labels-short", ["data.name='factories.py:short_labels'"], "give one label per input"),
    (
        "too-few-samples",
        ["data.n_train=150"],
        "needs 300 training samples, but the train split of the factory's data has 200",
    ),
    ("built-in-key", ["model.hidden=[4]"], "model.hidden applies to gentrace's own architectures only"),
    (
        "options-on-built-in",
        ["model.arch='mlp'", "model.options={ width = 3 }"],
        "model.options applies to a model factory",
    ),
    ("no-function-name", ["model.arch='factories.py:'"], "expected 'package.module:function'"),
]


@pytest.mark.parametrize(("case", "overrides", "message"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_plug_in_is_one_line_exit_2_and_no_store(
    project: Path, case: str, overrides: list[str], message: str
) -> None:
    sets = [arg for item in overrides for arg in ("--set", item)]
    done = run_cli("record", project / "run.toml", "--out", project / "bad.zarr", "-q", *sets, cwd=project)
    assert done.returncode == 2, done.stderr
    assert message in one_error_line(done.stderr)
    assert not (project / "bad.zarr").exists()
    assert not (project / "runs").exists()


def test_an_analysis_whose_factory_is_gone_names_it_and_how_to_import_it(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.delitem(sys.modules, "factories", raising=False)
    cfg = load(project, "model.arch='factories:net'")
    path = run.record(cfg, project / "s.zarr", device="cpu")
    (project / "factories.py").rename(project / "moved_away.py")  # the analysis runs where the module is not
    monkeypatch.delitem(sys.modules, "factories", raising=False)
    with pytest.raises(ConfigError, match=r"model.arch: cannot import module 'factories'.*PYTHONPATH"):
        lipschitz.run(StoreReader(path), where="train")
