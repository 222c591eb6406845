"""Run configuration (SPEC section 2): the quick start, `--set` forms, round trips, errors naming the key."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gentrace.core.config import (
    QUICKSTART_TOML,
    LrDecay,
    RunConfig,
    from_dict,
    is_regression,
    load,
    to_dict,
    to_toml,
)
from gentrace.core.errors import ConfigError

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_configs"
SAMPLE_CONFIGS = sorted(SAMPLE_DIR.glob("*.toml"))


def get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def replace(cfg: RunConfig, dotted: str, value: Any) -> RunConfig:
    """A copy of `cfg` with one (dotted) field changed, bypassing validation."""
    head, _, rest = dotted.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: replace(getattr(cfg, head), rest, value)})


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


# -- the quick start and round trips --------------------------------------------------------------


def test_load_none_is_the_quick_start() -> None:
    cfg = load(None)
    assert cfg.name == "quickstart"
    # Every key the quick-start TOML sets comes through unchanged; the rest are the defaults.
    for key, value in flatten(tomllib.loads(QUICKSTART_TOML)).items():
        assert flatten(to_dict(cfg))[key] == value, key
    assert cfg.data.name == "digits"
    assert cfg.model.hidden == (128, 128)
    assert cfg.train.replicates == 2
    assert cfg.train.lr_decay == LrDecay(every_epochs=15, factor=0.1)
    assert not is_regression(cfg.data)
    assert load(None) == cfg  # a fresh parse each time, never a shared mutable dict


CONFIGS = [
    pytest.param(load(None), id="quickstart"),
    pytest.param(RunConfig(), id="defaults"),
    pytest.param(
        load(
            None,
            [
                "data.name=cos2d",
                "data.dim=10",
                "data.freq=0.25",
                "train.loss=mse",
                "train.batch_size=0",
                "train.optimizer=adam",
                "train.weight_decay=5e-4",
                'model.freeze=["0."]',
                "model.init=default",
                'record.params.names=["0.weight", "0.bias"]',
                "record.params_fine.every_steps=0",
                'record.predictions.splits=["test"]',
                "record.checkpoint_every_s=0",
            ],
        ),
        id="regression-adam-full-batch",
    ),
    pytest.param(
        load(None, ["data.name=cifar10", "data.task=dog-vs-airplane", "model.arch=resnet18", "train.loss=bce"]),
        id="cifar-binary-resnet",
    ),
    pytest.param(
        replace(load(None), "data.root", 'C:\\data\\"quoted" μ σ\tx'),
        id="string-with-backslash-quote-unicode-tab",
    ),
    pytest.param(replace(load(None), "data.root", "line one\nline two"), id="string-with-newline"),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_to_dict_from_dict_round_trip(cfg: RunConfig) -> None:
    raw = to_dict(cfg)
    assert from_dict(raw) == cfg
    # The store keeps the resolved config as JSON (root attrs); resume reads it back from there.
    assert from_dict(json.loads(json.dumps(raw))) == cfg


@pytest.mark.parametrize("cfg", CONFIGS)
def test_to_toml_round_trip(cfg: RunConfig, tmp_path: Path) -> None:
    path = tmp_path / "written.toml"
    path.write_text(to_toml(cfg))
    assert load(path) == cfg


def test_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    path = tmp_path / "my-experiment.toml"
    path.write_text("[train]\nepochs = 3\n")
    cfg = load(path)
    assert cfg.name == "my-experiment"
    assert cfg.train.epochs == 3
    assert load(path, ["name=other"]).name == "other"
    (tmp_path / "empty.toml").write_text("")
    assert load(tmp_path / "empty.toml") == RunConfig(name="empty")


# -- --set --------------------------------------------------------------------------------------

# (id, --set items applied to the quick start, dotted attribute, expected value)
OVERRIDES: list[tuple[str, list[str], str, Any]] = [
    ("integer", ["data.n_train=2000"], "data.n_train", 2000),
    ("float", ["train.lr=0.1"], "train.lr", 0.1),
    ("integer-for-float", ["train.lr=1"], "train.lr", 1.0),
    ("exponent", ["train.weight_decay=5e-4"], "train.weight_decay", 5e-4),
    ("quoted-string", ['data.root="/data/mnist"'], "data.root", "/data/mnist"),
    ("bare-word-path", ["data.root=/data/mnist"], "data.root", "/data/mnist"),
    ("bare-word-home", ["data.root=~/data sets/mnist"], "data.root", "~/data sets/mnist"),
    ("bare-word-choice", ["data.name=mnist"], "data.name", "mnist"),
    ("bare-word-with-dashes", ["data.task=0to4-vs-5to9"], "data.task", "0to4-vs-5to9"),
    ("value-with-equals-sign", ["data.root=/a=b"], "data.root", "/a=b"),
    ("spaces-around", [" train.lr = 0.2 "], "train.lr", 0.2),
    ("boolean", ["data.download=true"], "data.download", True),
    ("list", ["model.hidden=[256, 256]"], "model.hidden", (256, 256)),
    ("empty-list", ["model.freeze=[]"], "model.freeze", ()),
    ("list-of-strings", ['model.freeze=["0.", "2."]'], "model.freeze", ("0.", "2.")),
    ("inline-table", ["train.lr_decay={every_epochs=5, factor=0.5}"], "train.lr_decay", LrDecay(5, 0.5)),
    ("inline-table-missing-key", ["train.lr_decay={every_epochs=5}"], "train.lr_decay", LrDecay(5, 0.1)),
    ("nested-key", ["record.params.every_epochs=2"], "record.params.every_epochs", 2),
    ("nested-key-keeps-siblings", ["train.lr_decay.factor=0.5"], "train.lr_decay", LrDecay(15, 0.5)),
    ("union-literal", ["record.params.names=all"], "record.params.names", "all"),
    ("union-list", ['record.params.names=["0.weight"]'], "record.params.names", ("0.weight",)),
    ("top-level-key", ["name=sweep-1"], "name", "sweep-1"),
    ("later-override-wins", ["train.lr=0.1", "train.lr=0.3"], "train.lr", 0.3),
    ("zero-means-never", ["record.params.every_epochs=0"], "record.params.every_epochs", 0),
    ("full-batch", ["train.batch_size=0"], "train.batch_size", 0),
    ("activations-layers-relu", ["record.activations.layers=relu"], "record.activations.layers", "relu"),
    ("activations-layers-gates", ["record.activations.layers=gates"], "record.activations.layers", "gates"),
    ("activations-layers-list", ['record.activations.layers=["1", "3"]'], "record.activations.layers", ("1", "3")),
    (
        "activations-layers-empty-when-off",
        ["record.activations={every_epochs=0, layers=[]}"],
        "record.activations.layers",
        (),
    ),
]


@pytest.mark.parametrize(("overrides", "key", "expected"), [pytest.param(*c[1:], id=c[0]) for c in OVERRIDES])
def test_set_forms(overrides: list[str], key: str, expected: Any) -> None:
    value = get(load(None, overrides), key)
    assert value == expected
    assert type(value) is type(expected)


def test_set_applies_on_top_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "base.toml"
    path.write_text('[data]\nname = "sinusoid"\ndim = 20\n\n[train]\nlr = 0.5\n')
    cfg = load(path, ["data.dim=30", "model.hidden=[8]"])
    assert (cfg.data.name, cfg.data.dim, cfg.train.lr, cfg.model.hidden) == ("sinusoid", 30, 0.5, (8,))


# Valid combinations the cross-field checks must let through.
VALID: list[tuple[str, list[str]]] = [
    ("binary-digits", ["data.task=0to4-vs-5to9", "train.loss=bce"]),
    ("binary-mnist-first5", ["data.name=mnist", "data.task=first5-vs-last5"]),
    ("binary-cifar", ["data.name=cifar10", "data.task=animals-vs-objects"]),
    ("bce-on-two-class-synthetic", ["data.name=sinusoid", "train.loss=bce"]),
    ("regression-mse", ["data.name=product", "train.loss=mse"]),
    ("regression-auto", ["data.name=cos2d"]),
    ("random-labels", ["data.label_noise=1.0"]),
    ("momentum-one", ["train.momentum=1.0"]),
    ("cnn-on-images", ["model.arch=cnn", "model.channels=4"]),
    ("vgg-on-fashion", ["data.name=fashion-mnist", "model.arch=vgg11"]),
    ("cnn-without-hidden", ["model.arch=cnn", "model.hidden=[]"]),
    ("eval-every-steps", ["record.eval_every_steps=10"]),
]


@pytest.mark.parametrize("overrides", [pytest.param(c[1], id=c[0]) for c in VALID])
def test_valid_combinations_load(overrides: list[str]) -> None:
    load(None, overrides)


# -- errors name the key path ----------------------------------------------------------------------

# (id, --set items applied to the quick start, regex the error message must contain)
ERRORS: list[tuple[str, list[str], str]] = [
    # unknown keys at every level
    ("unknown-top-level-key", ["bogus=1"], r"unknown config key bogus\b"),
    ("unknown-section", ["optim.lr=1"], r"unknown config key optim\b"),
    ("unknown-key-in-section", ["train.lrr=0.1"], r"unknown config key train\.lrr\b.*lr"),
    # the closest known name, where one is close (difflib), before the list
    ("close-key", ["train.lrr=0.1"], r"unknown config key train\.lrr; did you mean `lr`\? known keys here: optim"),
    ("close-section", ["trian.lr=0.1"], r"unknown config key trian; did you mean `train`\? known keys here"),
    ("no-close-key", ["bogus=1"], r"unknown config key bogus; known keys here"),
    ("close-choice", ["train.optimizer=adma"], r"'adma' is not allowed; did you mean `adam`\? choose one of: sgd"),
    ("close-arch", ["model.arch=mpl"], r"model\.arch = 'mpl' is not allowed; did you mean `mlp`\? choose one of"),
    ("close-data-set", ["data.name=digit"], r"data\.name = 'digit' is not allowed; did you mean `digits`\?"),
    ("unknown-key-in-inline-table", ["train.lr_decay.every=2"], r"unknown config key train\.lr_decay\.every\b"),
    ("unknown-key-in-nested-table", ["record.params.every=2"], r"unknown config key record\.params\.every\b"),
    ("unknown-key-in-set-table", ["train.lr_decay={every=5}"], r"unknown config key train\.lr_decay\.every\b"),
    ("section-given-a-value", ["train=1"], r"train must be a table"),
    ("nested-table-given-a-value", ["record.params=2"], r"record\.params must be a table"),
    ("set-into-a-value", ["train.lr.x=1"], r"train\.lr is a value, not a table"),
    # wrong types
    ("bool-for-int", ["data.n_train=true"], r"data\.n_train must be an integer"),
    ("float-for-int", ["data.n_train=1.5"], r"data\.n_train must be an integer"),
    ("string-for-int", ['train.epochs="10"'], r"train\.epochs must be an integer"),
    ("str-for-float", ['train.lr="fast"'], r"train\.lr must be a number"),
    ("bare-word-for-float", ["train.lr=fast"], r"train\.lr must be a number"),
    ("bool-for-float", ["train.lr=true"], r"train\.lr must be a number"),
    ("int-for-bool", ["data.download=1"], r"data\.download must be true or false"),
    ("int-for-str", ["data.root=5"], r"data\.root must be a string"),
    ("scalar-for-list", ["model.hidden=256"], r"model\.hidden must be a list"),
    ("list-item-string", ['model.hidden=[256, "wide"]'], r"model\.hidden\[1\] must be an integer"),
    ("list-item-bool", ["model.hidden=[true]"], r"model\.hidden\[0\] must be an integer"),
    ("list-item-int-for-str", ["model.freeze=[0]"], r"model\.freeze\[0\] must be a string"),
    # Literal choices
    ("unknown-data-set", ["data.name=imagenet"], r"data\.name = 'imagenet' is not allowed; choose one of: sinusoid"),
    ("unknown-optimizer", ["train.optimizer=rmsprop"], r"train\.optimizer = 'rmsprop' is not allowed.*sgd \| adam"),
    ("unknown-arch", ["model.arch=transformer"], r"model\.arch = 'transformer' is not allowed"),
    ("unknown-loss", ["train.loss=hinge"], r"train\.loss = 'hinge' is not allowed"),
    ("bool-for-literal", ["train.loss=true"], r"train\.loss = True is not allowed"),
    ("literal-in-list", ['record.predictions.splits=["val"]'], r"record\.predictions\.splits\[0\] = 'val'"),
    ("union-neither", ["record.params.names=5"], r"record\.params\.names"),
    ("activations-layers-unknown-word", ["record.activations.layers=gelu"], r"layers = 'gelu'.*relu \| gates"),
    ("activations-layers-not-a-list", ["record.activations.layers=3"], r"record\.activations\.layers must be a list"),
    ("activations-layers-item", ["record.activations.layers=[3]"], r"record\.activations\.layers\[0\] must be a str"),
    # ranges
    ("negative-lr", ["train.lr=-0.1"], r"train\.lr = -0\.1 is impossible; it must be > 0"),
    ("zero-lr", ["train.lr=0"], r"train\.lr = 0\.0 is impossible; it must be > 0"),
    ("nan-lr", ["train.lr=nan"], r"train\.lr = nan"),
    ("momentum-above-1", ["train.momentum=1.5"], r"train\.momentum = 1\.5 is impossible; it must be <= 1"),
    ("negative-momentum", ["train.momentum=-0.5"], r"train\.momentum = -0\.5 is impossible"),
    ("label-noise-above-1", ["data.label_noise=1.5"], r"data\.label_noise = 1\.5 is impossible"),
    ("negative-label-noise", ["data.label_noise=-0.1"], r"data\.label_noise = -0\.1 is impossible"),
    ("zero-epochs", ["train.epochs=0"], r"train\.epochs = 0 is impossible; it must be >= 1"),
    ("zero-n-train", ["data.n_train=0"], r"data\.n_train = 0 is impossible"),
    ("negative-batch-size", ["train.batch_size=-1"], r"train\.batch_size = -1 is impossible"),
    ("zero-replicates", ["train.replicates=0"], r"train\.replicates = 0 is impossible"),
    ("dropout-above-1", ["model.dropout=1.5"], r"model\.dropout = 1\.5 is impossible"),
    ("zero-decay-factor", ["train.lr_decay.factor=0"], r"train\.lr_decay\.factor = 0\.0 is impossible"),
    ("negative-every-epochs", ["record.params.every_epochs=-1"], r"record\.params\.every_epochs = -1 is impossible"),
    ("negative-every-steps", ["record.params_fine.every_steps=-2"], r"record\.params_fine\.every_steps = -2"),
    ("zero-freq", ["data.freq=0"], r"data\.freq = 0\.0 is impossible"),
    ("dim-1", ["data.dim=1"], r"data\.dim = 1 is impossible"),
    # cross-field checks
    (
        "binary-task-on-wrong-image-set",
        ["data.task=animals-vs-objects"],
        r"data\.task = 'animals-vs-objects' does not apply to data\.name = 'digits'; it applies to: cifar10",
    ),
    ("binary-task-on-synthetic-set", ["data.name=sinusoid", "data.task=0to4-vs-5to9"], r"data\.task = '0to4-vs-5to9'"),
    ("mse-on-classes", ["train.loss=mse"], r"train\.loss = 'mse' needs a regression set"),
    ("cross-entropy-on-regression", ["data.name=cos2d", "train.loss=cross_entropy"], r"train\.loss = 'cross_entropy'"),
    ("bce-on-regression", ["data.name=product", "train.loss=bce"], r"train\.loss = 'bce'"),
    ("bce-on-ten-classes", ["train.loss=bce"], r"train\.loss = 'bce' needs two classes.*data\.task"),
    ("label-noise-on-regression", ["data.name=product", "data.label_noise=0.5"], r"data\.label_noise"),
    ("cnn-on-vector-data", ["data.name=sinusoid", "model.arch=cnn"], r"model\.arch = 'cnn' needs image data"),
    ("resnet-on-regression-data", ["data.name=cos2d", "model.arch=resnet18"], r"model\.arch = 'resnet18'"),
    ("mlp-without-hidden", ["model.hidden=[]"], r"model\.hidden is empty"),
    ("zero-width", ["model.hidden=[128, 0]"], r"model\.hidden = \[128, 0\] is impossible"),
    ("name-with-slash", ["name=runs/a"], r"name = 'runs/a'"),
    ("blank-name", ['name=" "'], r"name = ' '"),
    ("activations-layers-empty", ["record.activations.layers=[]"], r"record\.activations\.layers = \[\] names no"),
    # malformed --set
    ("set-without-equals", ["train.lr"], r"--set 'train\.lr': expected KEY=VALUE"),
    ("set-without-key", ["=0.1"], r"expected KEY=VALUE"),
    ("set-with-empty-key-part", ["train..lr=0.1"], r"expected KEY=VALUE"),
    ("set-with-trailing-dot", ["train.=0.1"], r"expected KEY=VALUE"),
]


@pytest.mark.parametrize(("overrides", "message"), [pytest.param(*c[1:], id=c[0]) for c in ERRORS])
def test_errors_name_the_key_path(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(None, overrides)
    assert re.search(message, str(info.value)), str(info.value)
    assert info.value.exit_code == 2


def test_errors_in_a_file_name_the_key_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[train]\nlr = "fast"\n')
    with pytest.raises(ConfigError, match=r"train\.lr must be a number"):
        load(path)
    path.write_text("[record.params]\nevery_epoch = 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key record\.params\.every_epoch\b"):
        load(path)


# (id, file content or None for no file, regex the message must contain; {path} is the file)
FILE_ERRORS: list[tuple[str, bytes | None, str]] = [
    ("missing-file", None, r"config file {path} does not exist"),
    ("bad-toml", b"[train]\nlr = = 0.1\n", r"{path} is not valid TOML"),
    ("unclosed-table", b"[train\nlr = 0.1\n", r"{path} is not valid TOML"),
    ("duplicate-key", b"[train]\nlr = 0.1\nlr = 0.2\n", r"{path} is not valid TOML"),
    ("not-utf8", b"\x80\x81\xfe binary, e.g. a .pt file given by mistake", r"{path}"),
]


@pytest.mark.parametrize(("content", "message"), [pytest.param(*c[1:], id=c[0]) for c in FILE_ERRORS])
def test_unreadable_config_files(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "run.toml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert re.search(message.format(path=re.escape(str(path))), str(info.value)), str(info.value)


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path))):
        load(tmp_path)


# -- shipped sample configs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    SAMPLE_CONFIGS or [None],
    ids=[p.name for p in SAMPLE_CONFIGS] or ["no-sample-configs-yet-quickstart-via-to_toml"],
)
def test_sample_configs_load(path: Path | None, tmp_path: Path) -> None:
    """Every file in sample_configs/ loads (new files are picked up); without any, the quick start as TOML."""
    if path is None:
        path = tmp_path / "quickstart.toml"
        path.write_text(to_toml(load(None)))
    else:
        # STYLE: each sample config opens with a comment saying what it reproduces and how long it runs.
        assert path.read_text().lstrip().startswith("#"), f"{path.name} does not open with a comment"
    cfg = load(path)
    again = tmp_path / "again.toml"
    again.write_text(to_toml(cfg))
    assert load(again) == cfg
