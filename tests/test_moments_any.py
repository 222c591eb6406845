"""Per-sample gradient moments of every parameter of models that are not stacks of Linear/Conv layers.

A small ViT (patch embedding, class token and positional embedding on the model itself, LayerNorm,
nn.MultiheadAttention, GELU MLP) and a gated bilinear token model, each against one backward per
sample in float64, for the probe path (summed loss) and the train-batches path (mean loss); weight
tying refused; unused parameters get zeros.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference_moments import assert_moments_equal, per_sample_grads
from torch import nn

from gentrace.core.errors import ConfigError
from gentrace.moments.accumulator import Moments
from gentrace.moments.engine import MomentsEngine, backward_for_moments, probe_moments

D, CLASSES = 16, 3


class Block(nn.Module):
    """Pre-norm transformer block; `layer_scale` adds a parameter used in the block's own forward."""

    def __init__(self, batch_first: bool, attn_weights: bool, layer_scale: bool) -> None:
        super().__init__()
        self.batch_first, self.attn_weights = batch_first, attn_weights
        self.norm1 = nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=batch_first)
        self.norm2 = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.gamma = nn.Parameter(torch.rand(D) + 0.5) if layer_scale else None

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        h = self.norm1(x)
        if not self.batch_first:
            h = h.transpose(0, 1)  # [T, B, D]
        a, w = self.attn(h, h, h, key_padding_mask=pad, need_weights=self.attn_weights)
        if not self.batch_first:
            a = a.transpose(0, 1)
        x = x + a
        if w is not None:  # the attention weights reach the loss too: a second output gradient
            x = x + w @ h if self.batch_first else x + w @ h.transpose(0, 1)
        m = self.mlp(self.norm2(x))
        return x + (m if self.gamma is None else self.gamma * m)


class ViT(nn.Module):
    """Vision transformer for [B, 1, 8, 8]: 4 patches of 4x4, class token, positional embedding (~2.7k parameters)."""

    def __init__(
        self,
        patches: str = "conv",
        batch_first: bool = True,
        attn_weights: bool = False,
        layer_scale: bool = False,
        pad: bool = False,
    ) -> None:
        super().__init__()
        self.patches, self.pad = patches, pad
        self.patch = nn.Conv2d(1, D, 4, stride=4) if patches == "conv" else nn.Linear(16, D)
        self.cls_token = nn.Parameter(0.5 * torch.randn(1, 1, D))
        self.pos_embed = nn.Parameter(0.5 * torch.randn(1, 5, D))
        self.blocks = nn.ModuleList([Block(batch_first, attn_weights, layer_scale)])
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.patches == "conv":
            tokens = self.patch(x).flatten(2).transpose(1, 2)  # [B, 4, D]
        else:
            tokens = self.patch(F.unfold(x, 4, stride=4).transpose(1, 2))
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], 1) + self.pos_embed  # [B, 5, D]
        # mask the last patch of samples whose mean pixel is negative (never the class token)
        # (built without in-place writes: the fallback reruns this forward under torch.func.vmap)
        last = x[:, 1:].mean((1, 2))[:, None] < 0
        pad = torch.cat([torch.zeros(len(x), 4, dtype=torch.bool), last], 1) if self.pad else None
        for block in self.blocks:
            x = block(x, pad)
        return self.head(self.norm(x[:, 0]))


class Temper(nn.Module):
    """A leaf module of no known type, called with keyword-only arguments (one a per-sample mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.log_t = nn.Parameter(torch.zeros(1))

    def forward(self, score: torch.Tensor, *, mask: torch.Tensor, floor: float = -1e4) -> torch.Tensor:
        return (score * torch.exp(-self.log_t)).masked_fill(mask, floor).softmax(-1)


class GatedBilinear(nn.Module):
    """Token model: Embedding lookup, gated residual, a bilinear attention score; parameters used in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6, padding_idx=0)
        self.proj = nn.Linear(6, 6)
        self.gate = nn.Parameter(torch.randn(6))
        self.bilinear = nn.Parameter(0.3 * torch.randn(6, 6))
        self.temper = Temper()
        self.out = nn.Linear(6, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.embed(tokens)  # [B, T, 6]
        h = e + torch.sigmoid(self.gate) * torch.tanh(self.proj(e))
        pooled = h.mean(1)  # [B, 6]
        score = torch.einsum("bi,ij,btj->bt", pooled, self.bilinear, h)  # [B, T]
        weight = self.temper(score, mask=tokens == 0)  # padding tokens get no weight
        return self.out((weight.unsqueeze(-1) * h).sum(1) + pooled)


class Unused(nn.Module):
    """A Linear never called and a parameter that does not reach the loss: zero moments."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, CLASSES)
        self.spare = nn.Linear(4, 4)
        self.offset = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _ = x + self.offset  # computed, never used
        return self.fc(x)


class CrossAttention(nn.Module):
    """Queries from one half of the positions, keys/values (other widths: kdim, vdim) from the other, masks."""

    def __init__(self, bias_kv: bool = False) -> None:
        super().__init__()
        self.q = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(
            8, 2, kdim=3, vdim=5, batch_first=False, add_bias_kv=bias_kv, add_zero_attn=bias_kv
        )
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, 6, 5]
        b = len(x)
        query = self.q(x[:, :3, :4]).transpose(0, 1)  # [3, B, 8]
        memory = torch.tanh(x[:, 3:]).transpose(0, 1)  # [3, B, 5]
        # per sample and head: position l may not see memory slot l (a 3-D mask [B * heads, L, S])
        mask = torch.eye(3, dtype=torch.bool).expand(b * 2, 3, 3)  # (padded for bias_k / zero keys by torch)
        out, w = self.attn(query, memory[..., :3], memory, attn_mask=mask, average_attn_weights=False)
        return self.head(out.mean(0)) + w.mean((1, 2))[:, :CLASSES]


class Encoder(nn.Module):
    """torch's own transformer layer; sequence-first by default (Linear and LayerNorm on [T, B, D])."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.layer = nn.TransformerEncoderLayer(
            8, 2, dim_feedforward=12, batch_first=batch_first, norm_first=batch_first, activation="gelu"
        )
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, 5, 8]
        if self.batch_first:
            return self.head(self.layer(x).mean(1))
        return self.head(self.layer(x.transpose(0, 1)).mean(0))


@dataclass(frozen=True)
class Case:
    id: str
    model: Callable[[], nn.Module]
    inputs: Callable[[int], torch.Tensor]


def _images(n: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8)


def _example_vit() -> nn.Module:
    """The model factory of examples/vit_digits.py, as a researcher would record it (small options)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "vit_digits.py"
    spec = importlib.util.spec_from_file_location("example_vit_digits", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.vit((1, 8, 8), CLASSES, patch=2, dim=16, depth=2, heads=2, hidden=16)  # type: ignore[no-any-return]


CASES = [
    Case("examples-vit-digits", _example_vit, _images),
    Case("vit-conv-patches", ViT, _images),
    Case("vit-linear-patches-layer-scale", lambda: ViT("linear", layer_scale=True), _images),
    Case("vit-seq-first-attn-weights-padding", lambda: ViT(batch_first=False, attn_weights=True, pad=True), _images),
    Case("cross-attention-kdim-vdim-3d-mask", CrossAttention, lambda n: torch.randn(n, 6, 5)),
    Case("attention-bias-kv-zero-attn", lambda: CrossAttention(bias_kv=True), lambda n: torch.randn(n, 6, 5)),
    Case("torch-encoder-layer-sequence-first", lambda: Encoder(False), lambda n: torch.randn(n, 5, 8)),
    Case("torch-encoder-layer-norm-first-gelu", lambda: Encoder(True), lambda n: torch.randn(n, 5, 8)),
    Case("gated-bilinear-embedding", GatedBilinear, lambda n: torch.randint(0, 10, (n, 5))),
    Case("unused-parameters", Unused, lambda n: torch.randn(n, 4)),
]


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _setup(case: Case, n: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = case.model().eval()
    return model, case.inputs(n), torch.randint(0, CLASSES, (n,))


def _moments(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str) -> Moments:
    engine = MomentsEngine(model)
    handles = engine.install()
    try:
        if reduction == "sum":  # the probe source: summed loss, batches of 4
            return probe_moments(engine, model, x, y, _loss, batch_size=4)
        engine.begin(mean_loss=True)  # the train-batches source: an ordinary backward of the mean loss
        _loss(model(x), y).mean().backward()
        return engine.end()
    finally:
        for handle in handles:
            handle.remove()


def test_vit_size() -> None:
    assert 2000 <= sum(p.numel() for p in ViT().parameters()) <= 3000


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_every_parameter_equals_one_backward_per_sample(case: Case, reduction: str) -> None:
    model, x, y = _setup(case, 7)
    reference = per_sample_grads(model, x, y, _loss)
    moments = _moments(model, x, y, reduction)
    noisy = assert_moments_equal(moments, reference)
    # softmax is invariant to the key bias: its exact gradient is 0, both sides compute rounding noise
    assert all(name.endswith("attn.in_proj_bias") for name in noisy), noisy
    if case.id == "unused-parameters":
        for name in ("spare.weight", "spare.bias", "offset"):
            assert not moments.tensors[name].sumsq.any(), name
            assert not moments.tensors[name].pos.any(), name


def test_attention_owns_out_proj() -> None:
    """out_proj is never called (F.multi_head_attention_forward reads its weight), yet has moments."""
    model, x, y = _setup(CASES[0], 5)
    moments = _moments(model, x, y, "sum")
    for name in ("blocks.0.attn.out_proj.weight", "blocks.0.attn.out_proj.bias", "cls_token", "pos_embed"):
        assert moments.tensors[name].sumsq.sum() > 0, name


class TiedByName(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens).mean(1))


class TiedByUse(nn.Module):
    """The output projection reads the embedding matrix in the model's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens).mean(1) @ self.embed.weight.T


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc(x)))


def _run(model: nn.Module, x: torch.Tensor) -> Moments:
    return _moments(model, x, torch.randint(0, 4, (len(x),)), "sum")


def test_tied_parameter_is_refused_with_both_names() -> None:
    with pytest.raises(ConfigError) as err:
        MomentsEngine(TiedByName())
    assert str(err.value) == (
        "model: parameter embed.weight is shared with head.weight (weight tying); per-sample moments need each "
        "parameter used by one module; untie them or freeze one with model.freeze"
    )


def test_tied_parameter_frozen_is_accepted() -> None:
    model = TiedByName()
    model.embed.weight.requires_grad_(False)
    assert MomentsEngine(model).owned == {}


def test_parameter_used_by_another_module_is_refused() -> None:
    used = r"^model: parameter embed.weight is used outside its module embed \(weight tying\)"
    with pytest.raises(ConfigError, match=used):
        _run(TiedByUse(), torch.randint(0, 10, (3, 4)))


def test_module_called_twice_is_refused() -> None:
    with pytest.raises(RuntimeError, match="module fc ran twice in one forward pass"):
        _run(CalledTwice(), torch.randn(3, 4))


class Aliased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)
        self.alias = self.fc2  # the same module under a second name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def test_module_registered_twice_and_called_once_is_one_owner() -> None:
    model, x, y = Aliased(), torch.randn(5, 4), torch.randint(0, 4, (5,))
    assert_moments_equal(_moments(model, x, y, "sum"), per_sample_grads(model, x, y, _loss))


class OwnDropout(nn.Module):
    """Dropout in the owner's own code: a rerun cannot replay it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, CLASSES)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.dropout(x * self.scale, 0.5, self.training))


@pytest.mark.parametrize(
    ("model", "inputs"),
    [
        (lambda: _with(ViT(), "blocks.0.attn", dropout=0.1), _images),
        (OwnDropout, lambda n: torch.randn(n, 4)),
    ],
    ids=["attention-dropout", "dropout-in-the-owner-code"],
)
def test_train_mode_dropout_that_a_rerun_cannot_replay_is_refused(
    model: Callable[[], nn.Module], inputs: Callable[[int], torch.Tensor]
) -> None:
    net = model().train()
    engine = MomentsEngine(net)
    handles = engine.install()
    engine.begin(mean_loss=True)
    with pytest.raises(ConfigError, match=r"^record.grad_moments: .*source = 'probe'"):
        _loss(net(inputs(4)), torch.randint(0, CLASSES, (4,))).mean().backward()
    for handle in handles:
        handle.remove()


def _with(model: nn.Module, name: str, **attrs: float) -> nn.Module:
    for key, value in attrs.items():
        setattr(model.get_submodule(name), key, value)
    return model


class PatchDropViT(ViT):
    """Dropout called by the model's own code as a child module, and inside the MLP."""

    def __init__(self) -> None:
        super().__init__(layer_scale=True)
        self.drop = nn.Dropout(0.3)
        self.blocks[0].mlp.insert(2, nn.Dropout(0.3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.drop(self.patch(x).flatten(2).transpose(1, 2))
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], 1) + self.pos_embed
        return self.head(self.norm(self.blocks[0](x, None)[:, 0]))


def test_train_mode_dropout_below_an_owner_sums_to_the_batch_gradient() -> None:
    """Only the owners' own code is rerun: the children's dropout masks are the real pass's, so the
    per-sample gradients of class token, positional embedding and layer scale sum to that pass's gradient."""
    torch.manual_seed(0)
    model, x, y = PatchDropViT().train(), _images(8), torch.randint(0, CLASSES, (8,))
    engine = MomentsEngine(model)
    handles = engine.install()
    engine.begin(mean_loss=True)
    _loss(model(x), y).mean().backward()
    moments = engine.end()
    for handle in handles:
        handle.remove()
    for name, p in model.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(moments.tensors[name].sum, 8 * p.grad.double(), rtol=1e-5, atol=1e-6, msg=name)


class Unreplayable(nn.Module):
    """Own parameters beside a child whose call cannot stand in for it in a rerun: it modifies its input in place."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=True)
        self.mix = nn.Parameter(torch.randn(4))
        self.fc = nn.Linear(4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, 5, 4]
        return self.fc(self.act(x * self.mix).mean(1))


class SharedPositions(nn.Module):
    """GPT-style positions: an Embedding of arange(T), its output broadcast over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(10, 4)
        self.pos = nn.Embedding(5, 4)
        self.fc = nn.Linear(4, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc((self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))).mean(1))


def test_module_run_without_the_batch_dim_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^model: module pos ran on inputs without the batch dim"):
        _run(SharedPositions(), torch.randint(0, 10, (3, 5)))


def test_owner_whose_children_cannot_be_replayed_is_rerun_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    import gentrace.moments.engine as engine_module

    rerun_whole = []
    whole = engine_module.fallback.moments

    def spy(module: nn.Module, *args: object, **kwargs: object) -> object:
        rerun_whole.append(type(module).__name__)
        return whole(module, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_module.fallback, "moments", spy)
    torch.manual_seed(0)
    model, x, y = Unreplayable().eval(), torch.randn(6, 5, 4), torch.randint(0, CLASSES, (6,))
    for reduction in ("sum", "mean"):
        assert_moments_equal(_moments(model, x, y, reduction), per_sample_grads(model, x, y, _loss))
    assert rerun_whole == ["Unreplayable"] * 3  # two probe batches of 4 and 2, one mean-loss batch


def test_probe_over_many_batches_and_backward_for_moments() -> None:
    """The summed-loss path through backward_for_moments directly, one batch of 6."""
    model, x, y = _setup(CASES[1], 6)
    engine = MomentsEngine(model)
    handles = engine.install()
    engine.begin()
    backward_for_moments(engine, _loss(model(x), y).sum())
    moments = engine.end()
    for handle in handles:
        handle.remove()
    assert_moments_equal(moments, per_sample_grads(model, x, y, _loss))
