"""Reference classifiers L of the `mi` analysis, fitted once per store and cached in it.

Nakkiran et al. 2019 (shared/papers/sgd-increasing-complexity-mutual-information.txt):

- `linear`: the best linear classifier (section 3, "we compare the classifier f_t output by SGD to a
  linear classifier l"): multinomial logistic regression (scikit-learn, L2 with C = 1, inputs
  standardized on the training set) on replicate m's training samples and their stored labels.
- `fit-linear`: the linear classifier that best fits f_T0 (section 3, task iii): the same logistic
  regression fitted to the network's predicted classes on replicate m's training samples at T0, the
  first recorded step where I(F_t;Y) >= I(L;Y) of the `linear` reference on the test split; the last
  recorded step when training never gets there.
- `cnnK` (K = 2, 4, 6): a K-layer CNN trained on the final model's labels (section 4, "the models g_i
  are trained on the images labeled by f_infinity"): K blocks conv3x3(p) - ReLU with p =
  `model.channels` of the run, a 2x2 max-pool after every second block while the image is at least
  2 pixels wide, then global average pooling and one linear layer. Trained with Adam (lr 1e-3, batch
  128, CNN_EPOCHS epochs, cross-entropy) on replicate m's training inputs labelled by the network's
  predictions at the last recorded step; seeded by `model.seed`. Image data only.

The inputs are the stored ones (`record.inputs`), or the data set rebuilt from the stored config and
checked against the stored `data/train_index` and `data/test_index` (gentrace.analyses.replay), so the
reference predicts exactly the samples the run's predictions cover. Each reference is stored as
`derived/mi/<reference>/<split>` [M, n_split] int16 (gentrace.store.schema.mi_reference_array) with
attrs naming the step it was fitted on; a cached array whose step no longer matches the store (a
resumed run) is recomputed.

Caching. The arrays are written with plain zarr while holding the store's writer lock (StoreLock),
so they never race a live `record`. When the lock is held by a live run, or the store directory is
not writable, the reference is computed and used but not cached (a read-only store still works;
re-analysis then refits).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn
from zarr.storage import LocalStore

from gentrace.analyses import information
from gentrace.analyses.replay import Replay
from gentrace.core.config import from_dict
from gentrace.core.errors import AnalysisInputError, StoreError
from gentrace.store import schema
from gentrace.store.lock import StoreLock
from gentrace.store.reader import StoreReader

REFERENCES = ("linear", "fit-linear", "cnn2", "cnn4", "cnn6")
LOGISTIC_C = 1.0
CNN_EPOCHS = 30
CNN_BATCH = 128
CNN_LR = 1e-3


class ConvK(nn.Sequential):
    """K-layer CNN reference: K x (conv3x3-ReLU), max-pool after every second layer, GAP, linear.

    `[B, C, H, W] -> [B, out_dim]`.
    """

    def __init__(self, k: int, in_channels: int, width: int, size: int, out_dim: int) -> None:
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(k):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            channels = width
            if i % 2 == 1 and size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, out_dim)]
        super().__init__(*layers)


# -- fitting ------------------------------------------------------------------------------------
def fit_linear(x: np.ndarray, y: np.ndarray, x_eval: list[np.ndarray]) -> list[np.ndarray]:
    """Logistic regression fitted to (x [n, d], y [n]); predicted classes of each array in x_eval."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = np.unique(y)
    if len(classes) == 1:  # nothing to separate: the best fit is the constant
        return [np.full(len(e), classes[0], dtype=np.int64) for e in x_eval]
    model = make_pipeline(StandardScaler(), LogisticRegression(C=LOGISTIC_C, max_iter=2000))
    model.fit(x, y)
    return [np.asarray(model.predict(e), dtype=np.int64) for e in x_eval]


def fit_cnn(
    k: int, x: torch.Tensor, y: np.ndarray, x_eval: list[torch.Tensor], width: int, num_classes: int, seed: int
) -> list[np.ndarray]:
    """Train ConvK on (x [n, C, H, W], y [n]) and return the predicted classes of each tensor in x_eval."""
    if x.ndim != 4:
        raise AnalysisInputError(
            f"mi: reference cnn{k} needs image inputs (C, H, W), this data has {tuple(x.shape[1:])}"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ConvK(k, x.shape[1], width, min(x.shape[2], x.shape[3]), num_classes).to(device)
        order = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(net.parameters(), lr=CNN_LR)
        targets = torch.as_tensor(y, dtype=torch.int64)
        for _ in range(CNN_EPOCHS):
            perm = torch.randperm(len(x), generator=order)
            for start in range(0, len(x), CNN_BATCH):
                batch = perm[start : start + CNN_BATCH]
                loss = nn.functional.cross_entropy(net(x[batch].to(device)), targets[batch].to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    net.eval()
    out = []
    with torch.no_grad():
        for e in x_eval:
            parts = [net(e[i : i + 1024].to(device)).argmax(1).cpu() for i in range(0, len(e), 1024)]
            out.append(torch.cat(parts).numpy().astype(np.int64))
    return out


# -- the store side -----------------------------------------------------------------------------
def _target_step(reader: StoreReader, name: str) -> list[int]:
    """The recorded step of the network predictions each replicate's reference is fitted to (-1: none)."""
    steps = reader.array(schema.PREDS.step)
    if name == "linear":
        return [-1] * int(reader.array(schema.DATA.train_index).shape[0])
    if schema.PREDS.split("train") not in reader.streams()[schema.PREDS.name]:
        raise AnalysisInputError(
            f"{reader.path}: reference {name} is fitted to the network's training-set predictions; "
            "record them with record.predictions.splits = ['train', 'test']"
        )
    if name != "fit-linear":
        return [int(steps[-1])] * int(reader.array(schema.DATA.train_index).shape[0])
    linear = reference_predictions(reader, "linear", "test")
    labels = reader.array(schema.DATA.labels_test)
    k = information.check_classification(reader)
    out = []
    for m in range(linear.shape[0]):
        mi_ly = float(information.mutual_information(information.joint_counts([linear[m], labels], k))[0])
        mi_fy = information.mi_fy_by_step(reader, "test", m, labels, len(steps), k)  # row blocks, not the whole array
        t0 = information.first_reaching(mi_fy, mi_ly)
        out.append(int(steps[-1] if t0 is None else steps[t0]))
    return out


def _fit(reader: StoreReader, name: str, fitted_on: list[int]) -> dict[str, np.ndarray]:
    """Fit the reference per replicate; predictions {split: [M, n_split] int64} on both splits."""
    replay = Replay(reader, "mi")
    replay.data()  # read (or rebuilt and checked against the store) before anything is fitted
    k = int(reader.attrs["num_classes"])
    steps = list(np.asarray(reader.array(schema.PREDS.step)))
    train_labels = reader.array(schema.DATA.labels_train)
    out: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for m, step in enumerate(fitted_on):
        if name == "linear":
            target = np.asarray(train_labels[m], dtype=np.int64)
        else:
            row = steps.index(step)
            target = np.asarray(reader.lazy(schema.PREDS.split("train"))[row, m], dtype=np.int64)
        x_train, x_test = replay.inputs("train", m), replay.inputs("test", m)
        if name in ("linear", "fit-linear"):
            x = x_train.flatten(1).numpy()
            train, test = fit_linear(x, target, [x, x_test.flatten(1).numpy()])
        else:
            cfg = from_dict(reader.config)
            train, test = fit_cnn(
                int(name[3:]), x_train, target, [x_train, x_test], cfg.model.channels, k, cfg.model.seed
            )
        out["train"].append(train)
        out["test"].append(test)
    return {split: np.stack(rows) for split, rows in out.items()}


def cached(reader: StoreReader, name: str, split: str, fitted_on: list[int]) -> np.ndarray | None:
    """The cached predictions [M, n] of a reference, or None when absent or fitted on other steps."""
    path = f"{schema.DERIVED_MI_GROUP}/{name}/{split}"
    if not (reader.path / path / "zarr.json").exists():
        return None
    array = reader.lazy(path)
    if array.attrs.get("fitted_on_step") != fitted_on:
        return None
    return np.asarray(array[...], dtype=np.int64)


def write_cache(reader: StoreReader, name: str, fitted_on: list[int], preds: dict[str, np.ndarray]) -> bool:
    """Write the reference into `derived/mi/<name>/<split>` under the writer lock; False when not possible."""
    if not os.access(reader.path, os.W_OK):
        return False
    lock = StoreLock(reader.path)
    try:
        lock.acquire()
    except StoreError:  # a live run holds the store: use the reference without caching it
        return False
    try:
        root = zarr.open_group(LocalStore(reader.path), mode="r+", zarr_format=3)
        attrs: dict[str, Any] = {"reference": name, "fitted_on_step": fitted_on, "gentrace_codec": "count"}
        for split, values in preds.items():
            spec = schema.mi_reference_array(name, split, values.shape[0], values.shape[1], attrs)
            root.create_array(
                spec.path,
                shape=values.shape,
                chunks=spec.chunks(),
                dtype=spec.dtype,
                compressors=schema.CODECS[spec.codec](),
                fill_value=spec.fill_value,
                attributes=dict(spec.attrs),
                overwrite=True,
            )[...] = values.astype(spec.dtype)
    except OSError:
        return False
    finally:
        lock.release()
    return True


def reference_predictions(reader: StoreReader, name: str, split: str, *, cache: bool = True) -> np.ndarray:
    """Predicted classes [M, n_split] int64 of reference `name` on `split`, from the cache or fitted now.

    Raises:
        AnalysisInputError: unknown reference, non-image data for cnnK, missing train predictions.
        StoreError: the rebuilt data set does not match the store.
    """
    if name not in REFERENCES:
        raise AnalysisInputError(f"mi: reference must be one of {', '.join(REFERENCES)} or null, not {name!r}")
    fitted_on = _target_step(reader, name)
    hit = cached(reader, name, split, fitted_on)
    if hit is not None:
        return hit
    preds = _fit(reader, name, fitted_on)
    if cache:
        write_cache(reader, name, fitted_on, preds)
    return preds[split]
