"""Per-sample gradient moments equal one backward per sample (float64), for every module type."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_moments import assert_moments_equal, moments_of, per_sample_grads
from torch import nn

from gentrace.core.config import ModelConfig
from gentrace.moments import linear
from gentrace.moments.accumulator import Moments, TensorMoments, pos_neg, stats_of
from gentrace.moments.engine import MomentsEngine, backward_for_moments, probe_moments
from gentrace.task.models import build_model


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.norm(self.embed(x))))


class SequenceNet(nn.Module):
    """A Linear applied to [B, T, in] (per-sample gradient is a sum over positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(x)).mean(1))


@dataclass(frozen=True)
class Case:
    id: str
    model: Callable[[], nn.Module]
    inputs: Callable[[int], torch.Tensor]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 4, 2, dilation=1, bias=False),
        nn.Conv2d(4, 4, 3, padding="same"),  # string padding: the torch.func fallback
        nn.Flatten(),
        nn.LayerNorm(16),
        nn.Linear(16, 8),
        nn.BatchNorm1d(8),
        nn.Linear(8, 3),
    )


def _gentrace_cnn() -> nn.Module:
    return build_model(ModelConfig(arch="cnn", channels=4, hidden=(8,)), (1, 8, 8), 3)


def _resnet18() -> nn.Module:
    return build_model(ModelConfig(arch="resnet18"), (1, 8, 8), 3)


CASES = [
    Case("mlp-linear-relu-tanh", _mlp, lambda n: torch.randn(n, 12)),
    Case("cnn-stride-pad-groups-bn-layernorm", _cnn, lambda n: torch.randn(n, 4, 6, 6)),
    Case("gentrace-cnn", _gentrace_cnn, lambda n: torch.randn(n, 1, 8, 8)),
    Case("embedding-layernorm", EmbeddingNet, lambda n: torch.randint(0, 11, (n,))),
    Case("linear-on-sequences", SequenceNet, lambda n: torch.randn(n, 5, 4)),
]


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _setup(case: Case, n: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = case.model()
    for module in model.modules():  # non-trivial running statistics and affine parameters
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    model.eval()
    return model, case.inputs(n), torch.randint(0, 3, (n,))


@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_moments_equal_one_backward_per_sample(case: Case, reduction: str, n: int) -> None:
    model, x, y = _setup(case, n)
    reference = per_sample_grads(model, x, y, _loss)
    engine = MomentsEngine(model)
    handles = engine.install()
    try:
        engine.begin(mean_loss=reduction == "mean")
        losses = _loss(model(x), y)
        loss = losses.sum() if reduction == "sum" else losses.mean()
        if reduction == "sum":
            backward_for_moments(engine, loss)
        else:  # the training path: an ordinary backward of a mean loss
            loss.backward()
        moments = engine.end()
    finally:
        for handle in handles:
            handle.remove()
    assert_moments_equal(moments, reference, resolution=0.0)  # every count compared, as exactly as before


def test_resnet18_on_8x8_inputs() -> None:
    case = Case("resnet18", _resnet18, lambda n: torch.randn(n, 1, 8, 8))
    model, x, y = _setup(case, 5)
    reference = per_sample_grads(model, x, y, _loss)
    engine = MomentsEngine(model)
    handles = engine.install()
    moments = probe_moments(engine, model, x, y, _loss, batch_size=2)
    for handle in handles:
        handle.remove()
    # float32's resolution: its 1 x 1 feature maps leave border taps whose sums cancel to rounding noise
    assert_moments_equal(moments, reference, resolution=torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_result_does_not_depend_on_the_batch_size(batch_size: int) -> None:
    model, x, y = _setup(CASES[1], 13)
    engine = MomentsEngine(model)
    handles = engine.install()
    one = copy.deepcopy(probe_moments(engine, model, x, y, _loss, batch_size=13))  # the engine reuses its buffers
    other = probe_moments(engine, model, x, y, _loss, batch_size=batch_size)
    for handle in handles:
        handle.remove()
    assert one.n == other.n == 13
    assert one.loss_sum == pytest.approx(other.loss_sum, rel=1e-6)
    for name, acc in one.tensors.items():
        torch.testing.assert_close(acc.sum, other.tensors[name].sum, rtol=1e-5, atol=1e-6)  # float32 GEMM sums
        torch.testing.assert_close(acc.sumsq, other.tensors[name].sumsq, rtol=1e-5, atol=1e-6)
        assert torch.equal(acc.pos, other.tensors[name].pos)
        assert torch.equal(acc.neg, other.tensors[name].neg)


def test_identical_samples_give_zero_variance() -> None:
    model, x, y = _setup(CASES[0], 1)
    x, y = x.expand(6, -1), y.expand(6)
    engine = MomentsEngine(model)
    handles = engine.install()
    moments = probe_moments(engine, model, x, y, _loss)
    for handle in handles:
        handle.remove()
    for acc in moments.tensors.values():
        mean, meansq = acc.sum / 6, acc.sumsq / 6
        # zero up to float32 rounding of the per-batch GEMMs (the analyses use the same tolerance idea)
        assert ((meansq - mean**2).abs() <= 1e-6 * meansq + 1e-30).all()
        assert torch.equal(acc.pos + acc.neg, 6 * (acc.sum != 0).long())


def test_hooks_are_removed_and_frozen_tensors_skipped() -> None:
    model, x, y = _setup(CASES[0], 4)
    model[1].weight.requires_grad_(False)
    engine = MomentsEngine(model)
    handles = engine.install()
    moments = probe_moments(engine, model, x, y, _loss)
    for handle in handles:
        handle.remove()
    assert "1.weight" not in moments.tensors
    assert "1.bias" in moments.tensors
    assert all(not m._forward_hooks for m in model.modules())


def test_module_called_twice_is_refused() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    engine = MomentsEngine(model)
    handles = engine.install()
    with pytest.raises(RuntimeError, match="ran twice"):
        probe_moments(engine, model, torch.randn(3, 4), torch.randint(0, 4, (3,)), _loss)
    for handle in handles:
        handle.remove()


# -- accumulators merge associatively (multi-process all-reduce and resume rely on it) ----------
def _grads(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn((5, *shape), generator=g, dtype=torch.float64)
    grads[grads.abs() < 0.3] = 0.0
    return grads


def _random_moments(seed: int, shape: tuple[int, ...]) -> Moments:
    grads = _grads(seed, shape)
    acc = TensorMoments.zeros(shape, torch.device("cpu"))
    acc.add(stats_of(grads))
    return Moments({"w": acc}, n=5, loss_sum=float(seed))


@settings(max_examples=25, deadline=None)
@given(
    seeds=st.lists(st.integers(0, 10_000), min_size=3, max_size=3),
    shape=st.sampled_from([(1,), (3,), (2, 3)]),
)
def test_merge_is_associative_and_equals_one_shot(seeds: list[int], shape: tuple[int, ...]) -> None:
    a, b, c = (_random_moments(s, shape) for s in seeds)
    left = a.merge(b).merge(c)
    right = a.merge(b.merge(c))
    swapped = c.merge(a).merge(b)
    for other in (right, swapped):
        assert other.n == left.n == 15
        torch.testing.assert_close(other.tensors["w"].sum, left.tensors["w"].sum)
        torch.testing.assert_close(other.tensors["w"].sumsq, left.tensors["w"].sumsq)
        assert torch.equal(other.tensors["w"].pos, left.tensors["w"].pos)
    one_shot = TensorMoments.zeros(shape, torch.device("cpu"))
    for m in (a, b, c):
        t = m.tensors["w"]
        one_shot.add((t.sum, t.sumsq, t.sign_sum, t.nonzero))
    torch.testing.assert_close(one_shot.sum, left.tensors["w"].sum)
    assert torch.equal(one_shot.neg, left.tensors["w"].neg)
    assert torch.equal(one_shot.pos, (moments_of(torch.cat([_grads(s, shape) for s in seeds]))[2]))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.sampled_from([(1,), (3,), (2, 3)]), batches=st.sampled_from([1, 2, 3]))
def test_stored_moments_are_the_moments_cast_as_the_store_keeps_them(
    seed: int, shape: tuple[int, ...], batches: int
) -> None:
    """`stored` and `pos_neg` (what a grad row holds) equal counting by hand in float64, cast to float32 / int32.

    One batch is stored from the batch's own values (no float64 accumulators); more go through them.
    """
    grads = _grads(seed, shape)
    acc = TensorMoments.zeros(shape, torch.device("cpu"))
    for part in grads.float().tensor_split(batches):
        acc.add(stats_of(part.double()) if batches > 1 else stats_of(part))
    grads = grads.float().double()
    expected = {
        "sum": grads.sum(0).to(torch.float32),
        "sumsq": grads.square().sum(0).to(torch.float32),
        "pos": (grads > 0).sum(0).to(torch.int32),
        "neg": (grads < 0).sum(0).to(torch.int32),
    }
    s, sq, sign_sum, nonzero = acc.stored()
    pos, neg = pos_neg(sign_sum.numpy(), nonzero.numpy())
    stored = {"sum": s, "sumsq": sq, "pos": torch.from_numpy(pos), "neg": torch.from_numpy(neg)}
    for name, value in expected.items():
        assert stored[name].dtype == value.dtype, name
        assert torch.equal(stored[name], value), name
        assert torch.equal(stored[name], acc.moment(name).to(value.dtype)), name


@pytest.mark.parametrize("int8", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_count_gemm_is_exact_above_low_precision_integers(
    dtype: torch.dtype, int8: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counts near 500 (past bfloat16's last exact integer, 256) are exact on the int8 and the float GEMM."""
    monkeypatch.setattr(linear, "int8_gemm_pays", lambda: int8)
    torch.manual_seed(0)
    signs = torch.randn(7, 601).sign()  # 601 terms of +-1: odd sums, which bfloat16 cannot hold past 256
    signs[:, :500] = 1.0
    right = torch.randn(601, 3).sign()
    right[:, 0] = 1.0  # column 0 of the product: sums near 500, which a bfloat16 GEMM rounds to even numbers
    expected = (signs.double() @ right.double()).to(torch.int32)
    got = linear.count_mm(signs.to(dtype), right.to(dtype))
    assert got.dtype == torch.int32
    assert torch.equal(got, expected)
    assert linear.count_dtype(signs.to(dtype)) in ((torch.int8,) if int8 else (torch.float32, torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sign_counts_are_exact_for_low_precision_gradients(dtype: torch.dtype) -> None:
    """1001 samples' signs count to 1001 for gradients of any dtype (bfloat16 alone rounds 1001 to 1000)."""
    g = torch.ones(1001, 3, dtype=dtype)
    g[:, 1] = -1
    g[:, 2] = 0
    _, _, sign_sum, nonzero = stats_of(g)
    assert sign_sum.tolist() == [1001, -1001, 0]
    assert nonzero.tolist() == [1001, 1001, 0]
    a = torch.randn(1001, 4, dtype=dtype)  # signed inputs: the Linear rule's bias counts take the sign sums
    _, bias = linear.linear_moments(a, g, bias=True)
    assert bias is not None
    assert bias[2].tolist() == [1001, -1001, 0]
    assert bias[3].tolist() == [1001, 1001, 0]
