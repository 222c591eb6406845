"""The store schema: the single source of truth for array names, shapes, dtypes, chunks and codecs.

Probes never name a dtype, chunk or codec themselves: they call the builders here with their
dimensions and hand the resulting `StreamSpec` to the writer. Layout (SPEC section 3):

    data/train_index [M, n] ... static arrays written once at creation
    metrics/step [R], metrics/train_loss [R, M], ...          stream "metrics"
    metrics_fine/step [F], metrics_fine/batch_loss [F, M] ...  stream "metrics_fine"
    params/<tensor> [S, M, *shape], params/step [S]            stream "params"
    params_fine/<tensor> [S2, M, *shape], params_fine/step     stream "params_fine"
    preds/<split> [Q, M, n_split], preds/step [Q]              stream "preds"

Every array of a stream shares the stream's row counter, kept in the root attrs `committed`
and updated by the writer only after all of a row's chunks are on disk.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import google_crc32c
import numcodecs
import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

# 2: every chunk ends with a crc32c checksum and every chunk inside the committed rows exists
# (arrays are written with write_empty_chunks); 1 (earlier stores) is read without those checks.
SCHEMA_VERSION = 2
CHECKSUM_SCHEMA_VERSION = 2
FORMAT_NAME = "gentrace"

# One chunk should hold about this many bytes at most (SPEC section 3: split above ~4 MiB).
CHUNK_TARGET_BYTES = 4 * 2**20
# Small per-step arrays (metrics) are chunked this many rows at a time and written in batches.
SMALL_ROWS_PER_CHUNK = 8192
# Fine snapshots of small tensors: rows per chunk so that a chunk holds at most ~1 MiB.
BATCHED_CHUNK_BYTES = 2**20
BATCHED_MAX_ROWS = 256
# Per-recorded-row arrays (snapshots, moments, predictions, bitmasks, their step indices): several rows
# per chunk when rows are small, up to ~1 MiB and 1024 rows a chunk. A file costs ~0.4 ms of kernel
# time to create on these machines whatever its size, so one file per row of a bias made the writer's
# work mostly file creation; the writer keeps a chunk's committed rows in memory and replaces the
# chunk file atomically when a later commit adds rows to it (gentrace.store.writer).
PACKED_CHUNK_BYTES = 2**20
PACKED_MAX_ROWS = 1024
# Where the final row count is unknown the writer grows an array by this many rows at a time.
GROW_ROWS = 64

# Codec per kind of stream: (compressor, blosc cname, level, shuffle). One table builds both the
# zarr codec list of the array metadata and the numcodecs encoder of the writer's direct path, so
# the two can never disagree.
CODEC_PARAMS: dict[str, tuple[str, Any, int, Any]] = {  # blosc cname and shuffle: the names zarr accepts
    # float32 compresses only ~1.1x: fast lz4 with byte shuffle, never zarr's default zstd-3.
    "float": ("blosc", "lz4", 5, "shuffle"),
    # int32 counts compress ~3.5x with bitshuffle; lz4 behind it compresses them as well as zstd-1 did
    # (3.51x vs 3.53x on gradient sign counts) in a third of the time (0.07 vs 0.19 ms per 128 KiB).
    "count": ("blosc", "lz4", 5, "bitshuffle"),
    "half": ("zstd", None, 1, None),
    "bits": ("blosc", "lz4", 5, "noshuffle"),
    "index": ("blosc", "zstd", 1, "shuffle"),
}
_BLOSC_SHUFFLE = {
    "noshuffle": numcodecs.Blosc.NOSHUFFLE,
    "shuffle": numcodecs.Blosc.SHUFFLE,
    "bitshuffle": numcodecs.Blosc.BITSHUFFLE,
}


def zarr_codecs(kind: str) -> list[Any]:
    """The zarr v3 bytes-to-bytes codecs of a stream kind (array metadata): compressor, then crc32c.

    The crc32c codec (zarr v3 core) appends a 4-byte little-endian checksum of the compressed
    bytes to every chunk; zarr verifies it on every read, so a flipped byte or a truncated chunk
    is an error, never a number.
    """
    compressor, cname, level, shuffle = CODEC_PARAMS[kind]
    if compressor == "blosc":
        return [BloscCodec(cname=cname, clevel=level, shuffle=shuffle), Crc32cCodec()]
    return [ZstdCodec(level=level), Crc32cCodec()]


class ChunkEncoder:
    """The same pipeline as a plain function: the bytes zarr writes for [bytes (little endian), codec, crc32c]."""

    def __init__(self, kind: str) -> None:
        compressor, cname, level, shuffle = CODEC_PARAMS[kind]
        if compressor == "blosc":
            assert shuffle is not None
            self._codec: Any = numcodecs.Blosc(cname=cname, clevel=level, shuffle=_BLOSC_SHUFFLE[shuffle])
        else:
            self._codec = numcodecs.Zstd(level=level)

    def encode(self, values: np.ndarray) -> bytes:
        """Compressed bytes of `values` (little endian, C order) followed by their crc32c."""
        compressed = bytes(self._codec.encode(values))
        return compressed + with_checksum_suffix(compressed)


def with_checksum_suffix(payload: bytes) -> bytes:
    """The 4 bytes zarr's crc32c codec appends to `payload`: its crc32c as little-endian uint32."""
    return int(google_crc32c.value(payload)).to_bytes(4, "little")


def chunk_encoder(kind: str) -> ChunkEncoder:
    """The encoder of the writer's direct whole-row chunk path (see ChunkEncoder)."""
    return ChunkEncoder(kind)


CODECS: dict[str, Any] = {kind: functools.partial(zarr_codecs, kind) for kind in CODEC_PARAMS}
CHUNK_ENCODERS: dict[str, Any] = {kind: functools.partial(chunk_encoder, kind) for kind in CODEC_PARAMS}


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store.

    Attributes:
        path: array path inside the store, e.g. "params/0.weight".
        row_shape: shape of one row (everything after the leading axis).
        dtype: numpy dtype name.
        codec: key into CODECS.
        rows_per_chunk: chunk length along the leading axis.
        attrs: extra attributes stored on the array (units, module name, ...).
    """

    path: str
    row_shape: tuple[int, ...]
    dtype: str
    codec: str
    rows_per_chunk: int = 1
    attrs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def fill_value(self) -> float | int:
        """NaN for floats and -1 for integers, so a stray read of an unwritten row is visibly wrong."""
        if np.dtype(self.dtype).kind == "f":
            return float("nan")
        if np.dtype(self.dtype).kind == "b":
            return False
        return 255 if np.dtype(self.dtype) == np.uint8 else -1

    def chunks(self) -> tuple[int, ...]:
        """Chunk shape: `rows_per_chunk` rows of the whole row, split along its first dims above ~4 MiB."""
        shape = [self.rows_per_chunk, *self.row_shape]
        itemsize = np.dtype(self.dtype).itemsize
        axis = 1
        while math.prod(shape) * itemsize > CHUNK_TARGET_BYTES and axis < len(shape):
            if shape[axis] > 1:
                shape[axis] = math.ceil(shape[axis] / 2)
            else:
                axis += 1
        return tuple(max(1, s) for s in shape)


@dataclass(frozen=True)
class StreamSpec:
    """A group of arrays sharing one committed row counter; `rows` is the preallocated length."""

    name: str
    rows: int
    arrays: tuple[ArraySpec, ...]

    @property
    def step_path(self) -> str:
        """Every stream has a `<stream>/step` array: the optimizer step of each row."""
        return f"{self.name}/step"


# -- names: every stream, array path and the config key that records it ---------------------------
@dataclass(frozen=True)
class Stream:
    """The names of one stream: its store group, the config key that records it, what it holds.

    Probes, the reader and the analyses ask a Stream for paths (`GRAD.moment("0.weight", "sum")`) and
    for the "how to record it" text of a missing-stream error; no other module spells a path.

    Attributes:
        name: the group and the key of the root attr `committed`, e.g. "grad".
        config_key: the config key that turns the stream on, e.g. "record.grad_moments.every_epochs".
        what: what the rows are, for errors ("this run has no <what>; record them with <config_key>").
    """

    name: str
    config_key: str
    what: str

    def path(self, *parts: str) -> str:
        """`<name>/<part>/...`: an array of this stream."""
        return "/".join((self.name, *parts))

    @property
    def step(self) -> str:
        """`<name>/step` [rows] int64: the optimizer step of each row (every stream has it)."""
        return self.path("step")

    @property
    def epoch(self) -> str:
        """`<name>/epoch` [rows] int32: completed epochs at each row (metrics, acts, params)."""
        return self.path("epoch")

    def missing(self) -> tuple[str, str]:
        """(what, config_key): the arguments of StoreReader.require."""
        return self.what, self.config_key

    def names_in(self, paths: Sequence[str], suffix: str = "") -> list[str]:
        """The `<x>` of every `<name>/<x><suffix>` in `paths` (`step`/`epoch` skipped without a suffix), in order."""
        prefix = f"{self.name}/"
        skip = {self.step, self.epoch}
        found = []
        for p in paths:
            if not p.startswith(prefix) or not p.endswith(suffix) or (not suffix and p in skip):
                continue
            found.append(p[len(prefix) : len(p) - len(suffix)])
        return found


@dataclass(frozen=True)
class MetricsStream(Stream):
    """`metrics/`: `<split>_loss`, `<split>_acc` [R, M], `lr` [R]; `metrics_fine/`: `batch_loss`, `batch_error`."""

    def split_loss(self, split: str) -> str:
        """`metrics/<split>_loss` [R, M] float32."""
        return self.path(f"{split}_loss")

    def split_acc(self, split: str) -> str:
        """`metrics/<split>_acc` [R, M] float32 (NaN for regression)."""
        return self.path(f"{split}_acc")

    @property
    def lr(self) -> str:
        """`<name>/lr` [rows] float64: the learning rate in force."""
        return self.path("lr")

    @property
    def batch_loss(self) -> str:
        """`metrics_fine/batch_loss` [F, M] float32: the step's mean batch loss."""
        return self.path("batch_loss")

    @property
    def batch_error(self) -> str:
        """`metrics_fine/batch_error` [F, M] float32: the step's batch error rate."""
        return self.path("batch_error")


@dataclass(frozen=True)
class TensorStream(Stream):
    """`params/<tensor>`, `params_fine/<tensor>` [S, M, *shape] snapshots."""

    def tensor(self, name: str) -> str:
        """`<stream>/<tensor>`."""
        return self.path(name)

    def tensors_in(self, paths: Sequence[str]) -> list[str]:
        """Tensor names in a stream's paths, in recording order."""
        return self.names_in(paths)


@dataclass(frozen=True)
class PredsStream(Stream):
    """`preds/<split>` [Q, M, n_split]."""

    def split(self, split: str) -> str:
        """`preds/<split>`."""
        return self.path(split)


@dataclass(frozen=True)
class GradStream(Stream):
    """`grad/<tensor>/<moment>` [G, M, *shape], `grad/n`, `grad/loss_sum` [G, M] (SPEC section 4).

    The moments of a tensor over a row's samples i: `sum` = sum_i g_i, `sumsq` = sum_i g_i^2 (float32),
    `pos` = #{i: g_i > 0}, `neg` = #{i: g_i < 0} (int32). gentrace.moments keeps the same sign counts
    as sign_sum = pos - neg and nonzero = pos + neg (one addition per sample each).
    """

    MOMENTS: ClassVar[tuple[str, ...]] = ("sum", "sumsq", "pos", "neg")
    FLOAT_MOMENTS: ClassVar[tuple[str, ...]] = ("sum", "sumsq")

    def moment(self, tensor: str, moment: str) -> str:
        """`grad/<tensor>/<moment>`, moment in MOMENTS."""
        if moment not in self.MOMENTS:
            raise ValueError(f"unknown gradient moment {moment!r}; one of {', '.join(self.MOMENTS)}")
        return self.path(tensor, moment)

    @property
    def n(self) -> str:
        """`grad/n` [G, M] int64: samples in each row."""
        return self.path("n")

    @property
    def loss_sum(self) -> str:
        """`grad/loss_sum` [G, M] float64: their summed losses."""
        return self.path("loss_sum")

    def tensors_in(self, paths: Sequence[str]) -> list[str]:
        """Tensor names with moments in a stream's paths, in recording order."""
        return self.names_in(paths, f"/{self.MOMENTS[0]}")


@dataclass(frozen=True)
class ActsStream(Stream):
    """`acts/<layer>/bits` [A, P, bytes], `acts/<layer>/values` [A, P, units]."""

    def bits(self, layer: str) -> str:
        """`acts/<layer>/bits`."""
        return self.path(layer, "bits")

    def values(self, layer: str) -> str:
        """`acts/<layer>/values`."""
        return self.path(layer, "values")

    def layers_in(self, paths: Sequence[str]) -> list[str]:
        """Call sites with bitmasks in a stream's paths, in forward order."""
        return self.names_in(paths, "/bits")


@dataclass(frozen=True)
class LipschitzFineStream(Stream):
    """`lipschitz_fine/mean`, `lipschitz_fine/max` [L, M]."""

    @property
    def mean(self) -> str:
        """`lipschitz_fine/mean`."""
        return self.path("mean")

    @property
    def max(self) -> str:
        """`lipschitz_fine/max`."""
        return self.path("max")


@dataclass(frozen=True)
class DataGroup(Stream):
    """The static `data/` group (written once at creation; no row counter)."""

    @property
    def train_index(self) -> str:
        """`data/train_index` [M, n] int64."""
        return self.path("train_index")

    @property
    def test_index(self) -> str:
        """`data/test_index` [n_test] int64."""
        return self.path("test_index")

    @property
    def labels_train(self) -> str:
        """`data/labels_train` [M, n]."""
        return self.path("labels_train")

    @property
    def labels_test(self) -> str:
        """`data/labels_test` [n_test]."""
        return self.path("labels_test")

    @property
    def noise_mask(self) -> str:
        """`data/noise_mask` [M, n] bool."""
        return self.path("noise_mask")

    @property
    def x_train(self) -> str:
        """`data/x_train` [M, n, *input_shape] float32: the evaluated training inputs (`record.inputs = true`)."""
        return self.path("x_train")

    @property
    def x_test(self) -> str:
        """`data/x_test` [n_test, *input_shape] float32: the test inputs (`record.inputs = true`)."""
        return self.path("x_test")

    @property
    def probe_index(self) -> str:
        """`data/probe_index` [P] int64: the activation probe samples' positions in replicate 0's subset."""
        return self.path("probe_index")

    def labels(self, split: str) -> str:
        """`data/labels_<split>`."""
        return self.path(f"labels_{split}")


METRICS = MetricsStream("metrics", "record.eval_every_steps", "train and test losses")
METRICS_FINE = MetricsStream("metrics_fine", "the training loop (every optimizer step)", "metrics_fine rows")
PARAMS = TensorStream("params", "record.params.every_epochs", "parameter snapshots")
PARAMS_FINE = TensorStream("params_fine", "record.params_fine.every_steps", "fine parameter snapshots")
PREDS = PredsStream("preds", "record.predictions.every_epochs", "predictions")
GRAD = GradStream("grad", "record.grad_moments.every_epochs", "gradient moments")
ACTS = ActsStream("acts", "record.activations.every_epochs", "activation bitmasks")
LIPSCHITZ_FINE = LipschitzFineStream("lipschitz_fine", "record.lipschitz_fine.every_steps", "fine Lipschitz rows")
DATA = DataGroup("data", "", "data indices and labels")

# Every stream, by its store name (the order `info` lists them in).
STREAMS: dict[str, Stream] = {
    s.name: s for s in (METRICS, METRICS_FINE, PARAMS, PARAMS_FINE, PREDS, GRAD, ACTS, LIPSCHITZ_FINE)
}
TENSOR_STREAMS: dict[str, TensorStream] = {PARAMS.name: PARAMS, PARAMS_FINE.name: PARAMS_FINE}


def stream_of(path: str) -> str:
    """The stream (or group) name of an array path: its first component."""
    return path.split("/", 1)[0]


def step_of(stream: str) -> str:
    """`<stream>/step` of a stream known only by its name (e.g. one listed in a store's `streams` attr)."""
    return f"{stream}/step"


def _step(stream: Stream, rows_per_chunk: int = 1) -> ArraySpec:
    return ArraySpec(stream.step, (), "int64", "index", rows_per_chunk)


def packed_rows(row_shape: Sequence[int], dtype: str, rows: int) -> int:
    """Rows per chunk of a per-recorded-row array: as many as fit PACKED_CHUNK_BYTES (1 for a bigger row).

    At most PACKED_MAX_ROWS, spread evenly over the preallocated `rows` (21 rows of 64 KiB: 2 chunks of
    11, not 16 + 5).
    """
    row_bytes = max(1, math.prod(row_shape) * np.dtype(dtype).itemsize)
    most = max(1, min(PACKED_MAX_ROWS, PACKED_CHUNK_BYTES // row_bytes))
    return math.ceil(max(1, rows) / math.ceil(max(1, rows) / most))  # the rows spread evenly: little padding


def _packed(stream: StreamSpec) -> StreamSpec:
    """`stream` with every one-row-per-chunk array packed to `packed_rows` rows per chunk."""
    arrays = tuple(
        dataclasses.replace(spec, rows_per_chunk=packed_rows(spec.row_shape, spec.dtype, stream.rows))
        if spec.rows_per_chunk == 1
        else spec
        for spec in stream.arrays
    )
    return dataclasses.replace(stream, arrays=arrays)


def data_arrays(
    train_index: np.ndarray,
    test_index: np.ndarray,
    labels_train: np.ndarray,
    labels_test: np.ndarray,
    noise_mask: np.ndarray,
) -> dict[str, np.ndarray]:
    """The static `data/` group: which samples each replicate trained on, and their labels.

    Shapes: train_index, labels_train, noise_mask [M, n]; test_index, labels_test [n_test].
    """
    label_dtype = np.float32 if labels_train.dtype.kind == "f" else np.int16
    return {
        DATA.train_index: np.asarray(train_index, dtype=np.int64),
        DATA.test_index: np.asarray(test_index, dtype=np.int64),
        DATA.labels_train: np.asarray(labels_train, dtype=label_dtype),
        DATA.labels_test: np.asarray(labels_test, dtype=label_dtype),
        DATA.noise_mask: np.asarray(noise_mask, dtype=bool),
    }


def input_arrays(x_train: np.ndarray, x_test: np.ndarray) -> dict[str, np.ndarray]:
    """`data/x_train` [M, n, *input_shape] and `data/x_test` [n_test, *input_shape], float32 (`record.inputs`)."""
    return {DATA.x_train: np.asarray(x_train, dtype=np.float32), DATA.x_test: np.asarray(x_test, dtype=np.float32)}


def static_array(path: str, values: np.ndarray) -> ArraySpec:
    """The spec of a static `data/` array `values: [N, *row_shape]`, written whole at creation.

    At most CHUNK_TARGET_BYTES: one chunk (the indices and labels). Larger (the inputs of `record.inputs`,
    up to hundreds of MB): chunks of whole rows holding at most CHUNK_TARGET_BYTES, so a reader of a few
    samples decodes a few chunks, not the whole set; a single row above that is split along its next axis
    by `ArraySpec.chunks` (x_train [M, n, ...]: blocks of samples). The inputs are float data: the float
    streams' codec.
    """
    rows = max(1, len(values))
    if values.nbytes > CHUNK_TARGET_BYTES:
        row_bytes = max(1, math.prod(values.shape[1:]) * values.dtype.itemsize)
        rows = max(1, min(rows, CHUNK_TARGET_BYTES // row_bytes))
    codec = "float" if path in (DATA.x_train, DATA.x_test) else "index"
    return ArraySpec(path, tuple(values.shape[1:]), values.dtype.name, codec, rows)


def metrics_stream(rows: int, replicates: int) -> StreamSpec:
    """`metrics/`: step, epoch [R]; train/test loss and accuracy [R, M]; lr [R]."""
    r = _small_chunk(rows)
    per_rep = tuple(
        ArraySpec(path, (replicates,), "float32", "float", r)
        for split in ("train", "test")
        for path in (METRICS.split_loss(split), METRICS.split_acc(split))
    )
    return StreamSpec(
        METRICS.name,
        rows,
        (
            _step(METRICS, r),
            ArraySpec(METRICS.epoch, (), "int32", "index", r),
            ArraySpec(METRICS.lr, (), "float64", "float", r),
            *per_rep,
        ),
    )


def metrics_fine_stream(rows: int, replicates: int) -> StreamSpec:
    """`metrics_fine/`: every optimizer step: step, lr [F]; batch_loss, batch_error [F, M]."""
    r = _small_chunk(rows)
    return StreamSpec(
        METRICS_FINE.name,
        rows,
        (
            _step(METRICS_FINE, r),
            ArraySpec(METRICS_FINE.lr, (), "float64", "float", r),
            ArraySpec(METRICS_FINE.batch_loss, (replicates,), "float32", "float", r),
            ArraySpec(METRICS_FINE.batch_error, (replicates,), "float32", "float", r),
        ),
    )


def tensor_stream(
    stream: TensorStream | str,
    rows: int,
    replicates: int,
    shapes: Mapping[str, Sequence[int]],
    *,
    batched: bool = False,
) -> StreamSpec:
    """`params/<tensor>` or `params_fine/<tensor>`: [S, M, *shape] float32 snapshots, plus `step` [S].

    `stream` is PARAMS or PARAMS_FINE (or its name, a key of TENSOR_STREAMS). `batched` (fine snapshots
    of a few small tensors, written in blocks): several rows per chunk, up to BATCHED_CHUNK_BYTES per
    chunk and BATCHED_MAX_ROWS rows; otherwise one row per chunk.
    """
    if isinstance(stream, str):
        stream = TENSOR_STREAMS[stream]
    row_bytes = 4 * replicates * sum(math.prod(shape) for shape in shapes.values())
    r = 1
    if batched:
        r = max(1, min(BATCHED_MAX_ROWS, rows, BATCHED_CHUNK_BYTES // max(1, row_bytes)))
    arrays = [_step(stream, r)]
    for tensor, shape in shapes.items():
        arrays.append(ArraySpec(stream.tensor(tensor), (replicates, *shape), "float32", "float", r))
    return _packed(StreamSpec(stream.name, rows, tuple(arrays)))


def preds_stream(rows: int, replicates: int, split_sizes: Mapping[str, int], regression: bool) -> StreamSpec:
    """`preds/<split>`: [Q, M, n_split] int16 predicted class (float32 output for regression), `preds/step`."""
    dtype = "float32" if regression else "int16"
    codec = "float" if regression else "count"
    arrays = [_step(PREDS)]
    arrays += [ArraySpec(PREDS.split(split), (replicates, n), dtype, codec) for split, n in split_sizes.items()]
    return _packed(StreamSpec(PREDS.name, rows, tuple(arrays)))


def grad_stream(rows: int, replicates: int, shapes: Mapping[str, Sequence[int]]) -> StreamSpec:
    """`grad/`: per-sample gradient moments of every tensor at each recorded step (SPEC section 4).

    grad/<tensor>/sum, sumsq [G, M, *shape] float32; grad/<tensor>/pos, neg [G, M, *shape] int32;
    grad/step [G]; grad/n [G, M] int64 (samples); grad/loss_sum [G, M] float64 (summed sample losses).
    """
    arrays = [
        _step(GRAD),
        ArraySpec(GRAD.n, (replicates,), "int64", "index"),
        ArraySpec(GRAD.loss_sum, (replicates,), "float64", "float"),
    ]
    for tensor, shape in shapes.items():
        row = (replicates, *shape)
        for moment in GRAD.MOMENTS:
            floating = moment in GRAD.FLOAT_MOMENTS
            kind = ("float32", "float") if floating else ("int32", "count")
            arrays.append(ArraySpec(GRAD.moment(tensor, moment), row, *kind))
    return _packed(StreamSpec(GRAD.name, rows, tuple(arrays)))


def acts_stream(rows: int, probe: int, layers: Mapping[str, Mapping[str, Any]], values: bool) -> StreamSpec:
    """`acts/`: gate on/off bitmasks of the probe samples at each recorded epoch (SPEC sections 3, 4).

    acts/<layer>/bits [A, P, ceil(units/8)] uint8 = numpy.packbits(bit, axis=-1, bitorder="little");
    acts/<layer>/values [A, P, units] float16 when `values`; acts/step, acts/epoch [A]. `layers` maps
    each call-site name to its attrs: units, shape (C, H, W or features), module (the module path),
    module_type (the gate class), bit ("output > 0" or "input > 0").
    """
    arrays = [_step(ACTS), ArraySpec(ACTS.epoch, (), "int32", "index")]
    for layer, attrs in layers.items():
        units = int(attrs["units"])
        arrays.append(ArraySpec(ACTS.bits(layer), (probe, math.ceil(units / 8)), "uint8", "bits", attrs=attrs))
        if values:
            arrays.append(ArraySpec(ACTS.values(layer), (probe, units), "float16", "half", attrs=attrs))
    return _packed(StreamSpec(ACTS.name, rows, tuple(arrays)))


def lipschitz_fine_stream(rows: int, replicates: int) -> StreamSpec:
    """`lipschitz_fine/`: step [L]; mean, max [L, M] of the local Lipschitz constants of the step's batch."""
    r = _small_chunk(rows)
    return StreamSpec(
        LIPSCHITZ_FINE.name,
        rows,
        (
            _step(LIPSCHITZ_FINE, r),
            ArraySpec(LIPSCHITZ_FINE.mean, (replicates,), "float32", "float", r),
            ArraySpec(LIPSCHITZ_FINE.max, (replicates,), "float32", "float", r),
        ),
    )


CHECKPOINT_GROUP = "checkpoints"
# Root attr: the step of the newest committed checkpoint (the one `--resume` continues from).
CHECKPOINT_ATTR = "checkpoint_step"
# Checkpoints kept on disk: the newest and the one before, so a damaged newest one still resumes.
CHECKPOINTS_KEPT = 2

# Root attr `gentrace compact` sets before it changes any array and clears when every array is done:
# while set, readers and `--resume` refuse the store (half of its arrays may be sharded already).
COMPACTING_ATTR = "compacting"


def checkpoint_name(step: int) -> str:
    """Array name of the training-state checkpoint taken with the parameter snapshot at `step`."""
    return f"step-{step:010d}"


def checkpoint_step(name: str) -> int:
    """The step of a checkpoint array name: `step-0000000015` -> 15 (-1 for anything else)."""
    prefix, _, digits = name.partition("-")
    return int(digits) if prefix == "step" and digits.isdigit() else -1


def checkpoint_path(step: int) -> str:
    """`checkpoints/step-<step>`: the array path of the checkpoint taken at `step`."""
    return f"{CHECKPOINT_GROUP}/{checkpoint_name(step)}"


def checkpoint_array(step: int, nbytes: int) -> ArraySpec:
    """`checkpoints/step-<step>` [nbytes] uint8: serialized model, optimizer and RNG state (one chunk)."""
    return ArraySpec(checkpoint_path(step), (), "uint8", "bits", max(1, nbytes))


def _small_chunk(rows: int) -> int:
    return max(1, min(SMALL_ROWS_PER_CHUNK, rows))


DERIVED_MI_GROUP = "derived/mi"


def mi_reference_array(reference: str, split: str, replicates: int, n: int, attrs: Mapping[str, Any]) -> ArraySpec:
    """`derived/mi/<reference>/<split>` [M, n_split] int16: a reference classifier's class per sample.

    Written whole, once, by gentrace.analyses.mi_references (not a stream: not listed in `committed`);
    one chunk holds every replicate. `attrs` say what the reference was fitted on.
    """
    return ArraySpec(f"{DERIVED_MI_GROUP}/{reference}/{split}", (n,), "int16", "count", max(1, replicates), attrs)
