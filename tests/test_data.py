"""build_data: every data set, shapes, determinism, subsets, label noise, tasks, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_torchvision import FakeSplits, write_fake_cifar10, write_fake_mnist

from gentrace.core.config import DataConfig
from gentrace.core.errors import ConfigError, DataError
from gentrace.task.data import (
    BALL_SINUSOID_AMPLITUDE,
    BALL_SINUSOID_OMEGA,
    Dataset,
    build_data,
    cos2d_map,
    sinusoid_directions,
)

SYNTHETIC = ["sinusoid", "ball-sinusoid", "cos2d", "product", "sparse-noise"]
IMAGES = ["digits", "mnist", "fashion-mnist", "cifar10"]
REGRESSION = {"cos2d", "product"}
SHAPES = {
    "sinusoid": (7,),
    "ball-sinusoid": (2,),
    "cos2d": (7,),
    "product": (2,),
    "sparse-noise": (7,),
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "fashion-mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("torchvision")
    write_fake_mnist(root, folder="MNIST", seed=1)
    write_fake_mnist(root, folder="FashionMNIST", seed=2)
    write_fake_cifar10(root, seed=3)
    return root


@pytest.fixture(scope="module")
def fakes(fake_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, FakeSplits]:
    # the same seeds write the same arrays again: return what the files hold, for comparisons
    other = tmp_path_factory.mktemp("again")
    return {
        "mnist": write_fake_mnist(other, folder="MNIST", seed=1),
        "fashion-mnist": write_fake_mnist(other, folder="FashionMNIST", seed=2),
        "cifar10": write_fake_cifar10(other, seed=3),
    }


def make(name: str, root: Path, **kw: object) -> DataConfig:
    base: dict[str, object] = {"name": name, "root": str(root), "n_train": 10, "n_test": 12, "dim": 7}
    base.update(kw)
    return DataConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", SYNTHETIC + IMAGES)
def test_shapes_and_dtypes(name: str, fake_root: Path) -> None:
    ds = build_data(make(name, fake_root), replicates=2)
    shape = SHAPES[name]
    assert ds.input_shape == shape
    assert ds.x_train.shape == (2, 10, *shape)
    assert ds.x_test.shape == (12, *shape)
    assert ds.x_train.dtype == ds.x_test.dtype == torch.float32
    y_dtype = torch.float32 if name in REGRESSION else torch.int64
    assert ds.y_train.dtype == ds.y_test.dtype == y_dtype
    assert ds.y_train.shape == (2, 10)
    assert ds.y_test.shape == (12,)
    assert ds.train_index.shape == (2, 10)
    assert ds.train_index.dtype == ds.test_index.dtype == np.int64
    assert ds.test_index.shape == (12,)
    assert ds.noise_mask.shape == (2, 10)
    assert ds.noise_mask.dtype == bool
    assert not ds.noise_mask.any()
    if name in REGRESSION:
        assert ds.num_classes == 0
    else:
        assert ds.num_classes == (10 if name in IMAGES else 2)
        assert int(ds.y_train.min()) >= 0
        assert int(ds.y_train.max()) < ds.num_classes
    if name in IMAGES:
        assert float(ds.x_train.min()) >= 0.0
        assert float(ds.x_train.max()) <= 1.0


def same(a: Dataset, b: Dataset) -> bool:
    return (
        torch.equal(a.x_train, b.x_train)
        and torch.equal(a.y_train, b.y_train)
        and torch.equal(a.x_test, b.x_test)
        and torch.equal(a.y_test, b.y_test)
        and np.array_equal(a.train_index, b.train_index)
        and np.array_equal(a.noise_mask, b.noise_mask)
    )


@pytest.mark.parametrize("name", SYNTHETIC + IMAGES)
def test_deterministic_given_seed(name: str, fake_root: Path) -> None:
    noise = 0.0 if name in REGRESSION else 0.3
    a = build_data(make(name, fake_root, label_noise=noise, seed=4), 2)
    b = build_data(make(name, fake_root, label_noise=noise, seed=4), 2)
    c = build_data(make(name, fake_root, label_noise=noise, seed=5), 2)
    assert same(a, b)
    assert not torch.equal(a.x_train, c.x_train)


@pytest.mark.parametrize("name", SYNTHETIC + IMAGES)
def test_replicate_data_does_not_depend_on_replicate_count(name: str, fake_root: Path) -> None:
    noise = 0.0 if name in REGRESSION else 0.5
    one = build_data(make(name, fake_root, label_noise=noise), 1)
    three = build_data(make(name, fake_root, label_noise=noise), 3)
    assert torch.equal(one.x_train[0], three.x_train[0])
    assert torch.equal(one.y_train[0], three.y_train[0])
    np.testing.assert_array_equal(one.noise_mask[0], three.noise_mask[0])
    assert torch.equal(one.x_test, three.x_test)


@pytest.mark.parametrize("name", IMAGES)
def test_replicate_subsets_are_disjoint(name: str, fake_root: Path) -> None:
    ds = build_data(make(name, fake_root, n_train=15, n_test=20), 3)
    flat = ds.train_index.ravel()
    assert len(np.unique(flat)) == flat.size
    assert len(np.unique(ds.test_index)) == ds.test_index.size
    if name == "digits":  # one pool for train and test
        assert not np.intersect1d(flat, ds.test_index).size


def test_synthetic_indices_are_pool_positions() -> None:
    ds = build_data(make("sinusoid", Path(".")), 3)
    np.testing.assert_array_equal(ds.train_index, np.arange(30).reshape(3, 10))
    np.testing.assert_array_equal(ds.test_index, np.arange(12))


@pytest.mark.parametrize("name", ["sinusoid", "sparse-noise", "digits", "mnist", "cifar10"])
@pytest.mark.parametrize("noise", [0.25, 1.0])
def test_label_noise(name: str, noise: float, fake_root: Path) -> None:
    clean = build_data(make(name, fake_root, n_train=20), 2)
    noisy = build_data(make(name, fake_root, n_train=20, label_noise=noise), 2)
    assert torch.equal(clean.x_train, noisy.x_train)  # noise touches labels only
    assert torch.equal(clean.y_test, noisy.y_test)  # test labels are never noised
    assert (noisy.noise_mask.sum(axis=1) == round(noise * 20)).all()  # exactly round(p n) per replicate
    changed = (clean.y_train != noisy.y_train).numpy()
    assert not (changed & ~noisy.noise_mask).any()
    assert int(noisy.y_train.min()) >= 0
    assert int(noisy.y_train.max()) < noisy.num_classes


def test_label_noise_replaces_by_uniform_classes() -> None:
    clean = build_data(make("digits", Path("."), n_train=1000, n_test=100), 1)
    noisy = build_data(make("digits", Path("."), n_train=1000, n_test=100, label_noise=1.0), 1)
    assert noisy.noise_mask.all()
    counts = np.bincount(noisy.y_train.numpy().ravel(), minlength=10)
    assert counts.min() > 60  # uniform over 10 classes: 100 expected each
    agree = float((clean.y_train == noisy.y_train).float().mean())
    assert 0.05 < agree < 0.16  # a random class equals the true one 1 time in 10


def test_label_noise_rejected_for_regression() -> None:
    with pytest.raises(ConfigError, match="label_noise"):
        build_data(make("cos2d", Path("."), label_noise=0.1), 1)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_torchvision_pixels_and_labels_match_files(name: str, fake_root: Path, fakes: dict[str, FakeSplits]) -> None:
    ds = build_data(make(name, fake_root, n_train=12, n_test=30), 2)
    fake = fakes[name]
    np.testing.assert_array_equal((ds.x_train.numpy() * 255).round(), fake.x_train[ds.train_index])
    np.testing.assert_array_equal(ds.y_train.numpy(), fake.y_train[ds.train_index])
    np.testing.assert_array_equal((ds.x_test.numpy() * 255).round(), fake.x_test[ds.test_index])
    np.testing.assert_array_equal(ds.y_test.numpy(), fake.y_test[ds.test_index])
    np.testing.assert_array_equal(ds.test_index, np.arange(30))  # the whole test split, in order


def test_digits_match_sklearn() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ds = build_data(make("digits", Path(".")), 2)
    np.testing.assert_allclose(ds.x_train.numpy()[:, :, 0], bunch.images[ds.train_index] / 16.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train.numpy(), bunch.target[ds.train_index])
    np.testing.assert_array_equal(ds.y_test.numpy(), bunch.target[ds.test_index])


TASKS = [
    ("digits", "0to4-vs-5to9", [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]),
    ("mnist", "0to4-vs-5to9", [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]),
    ("fashion-mnist", "first5-vs-last5", [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]),
    ("cifar10", "first5-vs-last5", [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]),
    # airplane automobile bird cat deer dog frog horse ship truck: animals 0, objects 1
    ("cifar10", "animals-vs-objects", [1, 1, 0, 0, 0, 0, 0, 0, 1, 1]),
    ("cifar10", "dog-vs-airplane", [0, -1, -1, -1, -1, 1, -1, -1, -1, -1]),
]


@pytest.mark.parametrize(("name", "task", "mapping"), TASKS, ids=[f"{n}-{t}" for n, t, _ in TASKS])
def test_tasks_relabel(name: str, task: str, mapping: list[int], fake_root: Path, fakes: dict[str, FakeSplits]) -> None:
    ds = build_data(make(name, fake_root, task=task, n_train=5, n_test=6), 2)
    multi = build_data(make(name, fake_root, n_train=5, n_test=6), 2)
    assert ds.num_classes == 2
    if name == "digits":
        original, original_test = multi.y_train.numpy(), multi.y_test.numpy()
        np.testing.assert_array_equal(ds.train_index, multi.train_index)
    else:
        original, original_test = fakes[name].y_train[ds.train_index], fakes[name].y_test[ds.test_index]
    table = np.array(mapping)
    assert (table[original] >= 0).all()  # dropped classes never appear
    np.testing.assert_array_equal(ds.y_train.numpy(), table[original])
    np.testing.assert_array_equal(ds.y_test.numpy(), table[original_test])


def test_sinusoid_labels_follow_formula() -> None:
    cfg = make("sinusoid", Path("."), dim=20, n_train=500, n_test=50)
    ds = build_data(cfg, 2)
    w, w2 = sinusoid_directions(cfg)
    assert abs(w @ w2) < 1e-12
    np.testing.assert_allclose([w @ w, w2 @ w2], [1.0, 1.0])
    x = ds.x_train.reshape(-1, 20).double().numpy()
    expected = (x @ w + np.sin(x @ w2) > 0).astype(np.int64)
    np.testing.assert_array_equal(ds.y_train.reshape(-1).numpy(), expected)
    assert 0.4 < expected.mean() < 0.6
    assert abs(float(ds.x_train.std()) - 1.0) < 0.05


def test_cos2d_is_an_isometric_embedding_of_the_square() -> None:
    cfg = make("cos2d", Path("."), dim=10, freq=0.75, n_train=40, n_test=30)
    ds = build_data(cfg, 2)
    q = cos2d_map(cfg)
    np.testing.assert_allclose(q.T @ q, np.eye(2), atol=1e-12)
    for x, y in ((ds.x_train.reshape(-1, 10), ds.y_train.reshape(-1)), (ds.x_test, ds.y_test)):
        x64 = x.double().numpy()
        u = x64 @ q  # the square coordinates back
        np.testing.assert_allclose(u @ q.T, x64, atol=1e-6)  # x lies in the embedded plane
        assert (u > -1e-6).all()
        assert (u < 1 + 1e-6).all()
        expected = np.cos(2 * np.pi * 0.75 * u[:, 0]) * np.cos(2 * np.pi * 0.75 * u[:, 1])
        np.testing.assert_allclose(y.numpy(), expected, atol=1e-5)
        dist_x = np.linalg.norm(x64[:, None] - x64[None], axis=-1)
        dist_u = np.linalg.norm(u[:, None] - u[None], axis=-1)
        np.testing.assert_allclose(dist_x, dist_u, atol=1e-5)


def test_product_targets() -> None:
    ds = build_data(make("product", Path("."), n_train=500, n_test=50), 1)
    x, y = ds.x_train[0].double(), ds.y_train[0].double()
    assert (x.abs() <= 1).all()
    eps = y - x[:, 0] * x[:, 1]
    assert float(eps.abs().max()) <= 0.01 + 1e-6
    assert float(eps.abs().max()) > 0.005  # the noise is there


def test_sparse_noise_structure() -> None:
    ds = build_data(make("sparse-noise", Path("."), dim=50, n_train=2000, n_test=10), 1)
    x, y = ds.x_train[0].numpy(), ds.y_train[0].numpy()
    assert set(np.unique(np.abs(x[:, 0]))) == {1.0}
    rest = x[:, 1:]
    assert (rest.sum(axis=1) == 1).all()
    assert ((rest == 0) | (rest == 1)).all()
    assert len(np.unique(rest.argmax(axis=1))) > 40  # k spread over the other coordinates
    sign_y = 2 * y - 1
    accuracy = float((np.sign(x[:, 0]) == sign_y).mean())  # eta = -1 with probability 0.1
    assert 0.87 < accuracy < 0.93
    assert 0.45 < y.mean() < 0.55


def test_ball_sinusoid_has_builtin_label_noise() -> None:
    ds = build_data(make("ball-sinusoid", Path("."), n_train=4000, n_test=2000), 1)
    for x, y in ((ds.x_train[0].numpy(), ds.y_train[0].numpy()), (ds.x_test.numpy(), ds.y_test.numpy())):
        assert (np.linalg.norm(x, axis=1) <= 1 + 1e-6).all()
        assert np.linalg.norm(x, axis=1).mean() == pytest.approx(2 / 3, abs=0.03)  # uniform in the disk
        clean = x[:, 1] > BALL_SINUSOID_AMPLITUDE * np.sin(BALL_SINUSOID_OMEGA * x[:, 0])
        assert 0.07 < float((clean != y).mean()) < 0.13
    assert not ds.noise_mask.any()  # built-in noise is part of the task, not label noise


def test_digits_too_many_samples() -> None:
    with pytest.raises(ConfigError, match=r"data\.n_train = 900 .* 1797.*train\.replicates"):
        build_data(make("digits", Path("."), n_train=900, n_test=100), 2)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_torchvision_too_many_samples(name: str, fake_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.n_train = 40 .*160"):
        build_data(make(name, fake_root, n_train=40), 4)
    with pytest.raises(ConfigError, match=r"data\.n_test = 31"):
        build_data(make(name, fake_root, n_test=31), 1)


def test_filtered_pool_sizes_are_checked(fake_root: Path) -> None:
    # the fake train split holds 10 airplanes and 10 dogs
    build_data(make("cifar10", fake_root, task="dog-vs-airplane", n_train=20, n_test=6), 1)
    with pytest.raises(ConfigError, match=r"data\.n_train = 21 .*dog-vs-airplane"):
        build_data(make("cifar10", fake_root, task="dog-vs-airplane", n_train=21, n_test=6), 1)


@pytest.mark.parametrize(
    ("name", "where"),
    [("mnist", "MNIST/raw"), ("fashion-mnist", "FashionMNIST/raw"), ("cifar10", "cifar-10-batches-py")],
)
def test_missing_files_say_where(name: str, where: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found under") as info:
        build_data(make(name, tmp_path / "empty"), 1)
    message = str(info.value)
    assert str(tmp_path / "empty" / where) in message
    assert "data.download = true" in message
    assert "\n" not in message


def test_root_expands_user(fake_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(fake_root.parent))
    ds = build_data(make("mnist", Path("~") / fake_root.name), 1)
    assert ds.x_train.shape == (1, 10, 1, 28, 28)


def test_corrupt_cifar_batch(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3"):
        build_data(make("cifar10", tmp_path), 1)


def test_dataset_is_frozen() -> None:
    ds = build_data(make("product", Path(".")), 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.num_classes = 3  # type: ignore[misc]
