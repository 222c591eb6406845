"""Replay a recorded run offline: the network at a parameter snapshot and the inputs of a split.

The analyses that need the network or the data themselves (lipschitz, the mi references) get them
here and nowhere else:

- the network: the `model` given to `Replay` (a copy of the user's own network, from a library call:
  a store recorded by gentrace.Run with `model.arch = "own"`), else `build_network`, a fresh net of the
  stored config and attrs (gentrace.task.models.build_model with the run's input shape and output
  width); loaded per snapshot with row g of every `params/<tensor>` array and, when the net has
  buffers (BatchNorm running statistics, which the snapshots do not hold), with the buffers of the
  training-state checkpoint taken with that snapshot (gentrace.task.checkpoint);
- the data: `build_dataset`, the stored inputs when the store has them (`record.inputs`: `data/x_train`,
  `data/x_test` with the stored labels and indices), else the data set rebuilt from the stored config
  (gentrace.task.data.build_data) and checked against the stored `data/train_index` and
  `data/test_index`, so a replay sees exactly the samples the run's predictions cover.

How the net and the data set are built is decided in this module only.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from gentrace.core.config import OWN, from_dict
from gentrace.core.errors import AnalysisInputError, StoreError
from gentrace.store import schema
from gentrace.store.integrity import CheckedArray
from gentrace.store.reader import StoreReader
from gentrace.task import plugins
from gentrace.task.checkpoint import unpack
from gentrace.task.data import Dataset, build_data
from gentrace.task.losses import output_dim, resolve_loss
from gentrace.task.models import build_model

SPLITS = ("train", "test")


def build_network(reader: StoreReader, analysis: str = "lipschitz") -> nn.Module:
    """A freshly initialized network of the run: its stored model config, input shape and output width.

    Raises:
        AnalysisInputError: the model was given to gentrace.Run in code (`model.arch = "own"`).
    """
    cfg = from_dict(reader.config)
    if cfg.model.arch == OWN:
        raise AnalysisInputError(
            f"{reader.path}: model.arch = 'own': the network of this store was given to gentrace.Run in code, so "
            f'{analysis} cannot rebuild it; pass factory="package.module:function" to gentrace.Run so the command '
            f"line can, or call the analysis from Python with the network: gentrace.analyses.{analysis}.run("
            f"StoreReader({str(reader.path)!r}), model=net)"
        )
    attrs = reader.attrs
    plugins.warn_if_changed(attrs.get("factories", {}).get("model.arch", {}), "model.arch")
    num_classes = int(attrs["num_classes"])
    loss = resolve_loss(str(attrs["loss"]), num_classes)
    return build_model(cfg.model, tuple(int(s) for s in attrs["input_shape"]), output_dim(loss, num_classes))


def has_inputs(reader: StoreReader) -> bool:
    """Whether the store holds its inputs (`record.inputs`: `data/x_train` and `data/x_test`)."""
    paths = reader.array_paths()
    return schema.DATA.x_train in paths and schema.DATA.x_test in paths


def build_dataset(reader: StoreReader, analysis: str = "lipschitz") -> Dataset:
    """The run's data set: the stored inputs (`has_inputs`), else rebuilt from its stored data config.

    Rebuilt for as many replicates as the store has; the caller checks it against the stored indices.

    Raises:
        AnalysisInputError: the data was given to gentrace.Run in code (`data.name = "own"`) and not stored.
    """
    if has_inputs(reader):
        return stored_dataset(reader)
    cfg = from_dict(reader.config)
    if cfg.data.name == OWN:
        raise AnalysisInputError(
            f"{reader.path}: data.name = 'own' and the store has no data/x_train: the data was given to "
            f"gentrace.Run in code, so {analysis} cannot rebuild its inputs; record the run again with "
            "record.inputs = true (in the record table given to gentrace.Run)"
        )
    plugins.warn_if_changed(reader.attrs.get("factories", {}).get("data.name", {}), "data.name")
    replicates = int(np.asarray(reader.array(schema.DATA.train_index)).shape[0])
    return build_data(cfg.data, replicates)


def stored_dataset(reader: StoreReader) -> Dataset:
    """The run's data set read from the store: the inputs of `record.inputs`, the stored labels and indices.

    Labels come back as build_data makes them: int64 classes (stored int16), float32 regression targets.
    """
    attrs = reader.attrs

    def labels(path: str) -> torch.Tensor:
        values = reader.array(path)
        return torch.from_numpy(values.astype(np.float32 if values.dtype.kind == "f" else np.int64))

    return Dataset(
        x_train=torch.from_numpy(reader.array(schema.DATA.x_train)),
        y_train=labels(schema.DATA.labels_train),
        x_test=torch.from_numpy(reader.array(schema.DATA.x_test)),
        y_test=labels(schema.DATA.labels_test),
        train_index=reader.array(schema.DATA.train_index),
        test_index=reader.array(schema.DATA.test_index),
        noise_mask=reader.array(schema.DATA.noise_mask),
        num_classes=int(attrs["num_classes"]),
        input_shape=tuple(int(s) for s in attrs["input_shape"]),
    )


class Replay:
    """The network and the data of one recorded run, rebuilt from its store.

    Args:
        reader: the opened store.
        analysis: the analysis asking, named in the errors ("lipschitz rebuilds the whole network").
        model: the run's network given in code (the user's own, any device); a copy of it on the CPU is
            the architecture the snapshots are loaded into, instead of `build_network`'s.
    """

    def __init__(self, reader: StoreReader, analysis: str = "lipschitz", model: nn.Module | None = None) -> None:
        self.reader = reader
        self.analysis = analysis
        self.given = model
        self._steps: np.ndarray | None = None
        self._data: Dataset | None = None
        self._tensors: dict[str, CheckedArray] = {}
        self._row: tuple[int, dict[str, np.ndarray]] | None = None  # the last params row read: [M, *shape] each
        self._state: tuple[int, list[dict[str, torch.Tensor]]] | None = None  # the last checkpoint's models

    # -- the network ----------------------------------------------------------------------------
    @property
    def steps(self) -> np.ndarray:
        """`params/step` [S]: the step of each snapshot, read once (a live run may commit more rows meanwhile)."""
        if self._steps is None:
            self._steps = self.reader.array(schema.PARAMS.step)
        return self._steps

    def model(self) -> nn.Module:
        """A network of the run, on the CPU, in train mode; `load` gives it a snapshot.

        A copy of the given `model`, else a fresh one (`build_network`).

        Raises:
            AnalysisInputError: the parameter snapshots lack some of the network's tensors; the given model's
                parameters are not the stored ones; `model.arch = "own"` and no model was given.
        """
        recorded = self.reader.tensor_names(schema.PARAMS.name)
        if self.given is not None:
            model = copy.deepcopy(self.given).to("cpu").train()
            names = [n for n, _ in model.named_parameters()]
            missing = [n for n in names if n not in recorded]
            extra = [n for n in recorded if n not in names]
            if missing:
                raise AnalysisInputError(
                    f"{self.reader.path}: the given model's parameter {missing[0]} has no snapshot (no "
                    f"params/{missing[0]}); pass the network the run trained ({self.analysis} loads every tensor: "
                    'record them with record.params.names = "all")'
                )
            if extra:
                raise AnalysisInputError(
                    f"{self.reader.path}: the store's snapshots hold params/{extra[0]}, which the given model lacks; "
                    "pass the network the run trained"
                )
            return model
        model = build_network(self.reader, self.analysis)
        missing = [n for n, _ in model.named_parameters() if n not in recorded]
        if missing:
            raise AnalysisInputError(
                f"{self.reader.path}: the parameter snapshots lack {', '.join(missing[:4])}"
                f"{', ...' if len(missing) > 4 else ''}; {self.analysis} rebuilds the whole network: record "
                'them with record.params.names = "all"'
            )
        return model

    def load(self, model: nn.Module, row: int, replicate: int) -> nn.Module:
        """Load replicate `replicate` of snapshot `row` (a row of `params/step`) into `model` (strict); returns it.

        Parameters come from `params/<tensor>[row, replicate]`, buffers from the checkpoint of that step.

        Raises:
            AnalysisInputError: the net has buffers and there is no checkpoint for the snapshot's step.
        """
        params = {n: torch.from_numpy(v[replicate]) for n, v in self._params_row(model, row).items()}
        model.load_state_dict(params | self.buffers(model, int(self.steps[row]), replicate), strict=True)
        return model

    def _params_row(self, model: nn.Module, row: int) -> dict[str, np.ndarray]:
        """Row `row` of every parameter snapshot array: name -> `[M, *shape]`, kept for the next replicate."""
        if self._row is None or self._row[0] != row:
            for name, _ in model.named_parameters():
                if name not in self._tensors:
                    self._tensors[name] = self.reader.lazy(schema.PARAMS.tensor(name))
            self._row = (row, {n: np.asarray(self._tensors[n][row]) for n, _ in model.named_parameters()})
        return self._row[1]

    def buffers(self, model: nn.Module, step: int, replicate: int) -> dict[str, torch.Tensor]:
        """The buffers of `model` at `step` (BatchNorm running statistics), from the checkpoint saved with the snapshot.

        Returns:
            name -> tensor on the CPU; {} for a net without persistent buffers (no checkpoint is read).
        """
        # persistent ones only: a non-persistent buffer (a user's own net may have one) is in no checkpoint
        # and no state_dict; the model keeps its own value
        persistent = model.state_dict().keys()
        names = [n for n, _ in model.named_buffers() if n in persistent]
        if not names:
            return {}
        if self._state is None or self._state[0] != step:
            if step not in self.reader.checkpoint_steps():
                raise AnalysisInputError(
                    f"{self.reader.path}: this {type(model).__name__} has buffers ({names[0]}, ...) that parameter "
                    f"snapshots do not hold, and there is no checkpoint for step {step} to take them from"
                )
            self._state = (step, unpack(self.reader.checkpoint(step), map_location="cpu").models)
        return {n: self._state[1][replicate][n] for n in names}

    # -- the data -------------------------------------------------------------------------------
    def data(self) -> Dataset:
        """The run's data set (`build_dataset`), checked against the stored indices; built once.

        Raises:
            StoreError: the rebuilt data set's indices differ from `data/train_index` or `data/test_index`.
        """
        if self._data is None:
            ds = build_dataset(self.reader, self.analysis)
            same = np.array_equal(ds.train_index, self.reader.array(schema.DATA.train_index)) and np.array_equal(
                ds.test_index, self.reader.array(schema.DATA.test_index)
            )
            if not same:
                raise StoreError(
                    f"{self.reader.path}: the data set rebuilt from the stored config does not match the stored "
                    "data/train_index and data/test_index; the reference cannot be fitted on the run's samples"
                )
            self._data = ds
        return self._data

    @property
    def replicates(self) -> int:
        """M, the run's replicates (of its data set)."""
        return int(self.data().x_train.shape[0])

    def inputs(self, split: str, replicate: int) -> torch.Tensor:
        """Inputs of `split`: replicate `replicate`'s training subset `[n, *input_shape]`, or the shared test set.

        Raises:
            ValueError: a split other than train and test.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
        ds = self.data()
        return ds.x_train[replicate] if split == "train" else ds.x_test
