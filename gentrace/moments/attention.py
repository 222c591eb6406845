"""nn.MultiheadAttention: per-sample gradient moments of all its parameters, out_proj's included.

F.multi_head_attention_forward uses `out_proj.weight` and `out_proj.bias` without calling
`out_proj`, so the attention module owns its whole subtree (`ownership.SUBTREE_OWNERS`). Its
parameters are two linear maps around attention (Vaswani et al. 2017, eq. 4-5):
Q = q W_q^T + b_q (same for K, V), C = Attention(Q, K, V) per head, out = C W_o^T + b_o. Samples
are independent, so sample i's gradients are those of a Linear applied at every position
(`linear.sequence_weight_moments`): W_o from (C_i, delta_i), W_q from (q_i, dQ_i), and so on.
C and dQ, dK, dV come from one batched rerun of the module on the projected Q, K, V with both
projections set to the identity (exact in floating point: x * 1 + 0s), differentiated with respect
to Q, K, V. With bias_k / bias_v (appended keys) every parameter goes through `fallback.vmap_moments`.
The batch dim of query, key, value and the output is 1 unless batch_first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gentrace.core.errors import ConfigError
from gentrace.moments.accumulator import Stats, stats_of
from gentrace.moments.fallback import vmap_moments
from gentrace.moments.linear import sequence_weight_moments

# MultiheadAttention.forward's arguments in order (the engine binds keyword arguments to these).
ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


def moments(
    module: nn.Module, inputs: tuple[Any, ...], delta: Sequence[torch.Tensor | None], signs: bool = True
) -> dict[str, Stats]:
    """Moments of every parameter of an nn.MultiheadAttention from one call.

    Args:
        module: the attention module.
        inputs: its arguments bound to ARGS (query/key/value [B, L|S, E] if batch_first else [L|S, B, E]).
        delta: gradients of its output leaves (attn_output like query; attn_weights [B, L, S] or
            [B, heads, L, S], or None).
        signs: False: sums only.

    Returns:
        name (relative to the module, e.g. "out_proj.weight") -> Stats.
    """
    assert isinstance(module, nn.MultiheadAttention)
    if module.training and module.dropout:
        raise ConfigError(
            "record.grad_moments: nn.MultiheadAttention draws dropout masks in train mode that per-sample "
            "gradients cannot replay; use record.grad_moments.source = 'probe' (eval mode) or dropout=0"
        )
    arg = dict(zip(ARGS, inputs, strict=False))
    if arg["query"].dim() != 3:
        raise ValueError("per-sample moments of nn.MultiheadAttention need batched (3-D) query, key and value")
    d_out, d_w = delta[0], delta[1] if len(delta) > 1 else None
    assert d_out is not None or d_w is not None
    if module.bias_k is not None or module.bias_v is not None:
        return _by_vmap(module, arg, d_out, d_w, signs)
    return _by_projections(module, arg, d_out, d_w, signs)


def _by_projections(
    module: nn.MultiheadAttention,
    arg: dict[str, Any],
    d_out: torch.Tensor | None,
    d_w: torch.Tensor | None,
    signs: bool,
) -> dict[str, Stats]:
    bdim = 0 if module.batch_first else 1
    e = module.embed_dim
    if module._qkv_same_embed_dim:
        assert module.in_proj_weight is not None
        w_qkv = module.in_proj_weight.detach().chunk(3)
    else:
        w_qkv = (module.q_proj_weight.detach(), module.k_proj_weight.detach(), module.v_proj_weight.detach())
    b_qkv = (None,) * 3 if module.in_proj_bias is None else module.in_proj_bias.detach().chunk(3)
    x_qkv = [arg["query"], arg["key"], arg["value"]]
    qkv = [F.linear(x, w, b).requires_grad_() for x, w, b in zip(x_qkv, w_qkv, b_qkv, strict=True)]
    eye = torch.eye(e, dtype=qkv[0].dtype, device=qkv[0].device)
    identity: dict[str, torch.Tensor] = {"out_proj.weight": eye}
    if module._qkv_same_embed_dim:
        identity["in_proj_weight"] = torch.cat([eye] * 3)
    else:
        identity.update(q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye)
    if module.in_proj_bias is not None:
        identity["in_proj_bias"] = eye.new_zeros(3 * e)
    if module.out_proj.bias is not None:
        identity["out_proj.bias"] = eye.new_zeros(e)
    rest = {k: v for k, v in arg.items() if k not in ("query", "key", "value")}
    w_o = module.out_proj.weight.detach()
    b_o = None if module.out_proj.bias is None else module.out_proj.bias.detach()
    with torch.enable_grad():
        ctx, weights = functional_call(module, identity, tuple(qkv), rest, strict=False)  # C, attention weights
        objective = (F.linear(ctx, w_o, b_o) * d_out).sum() if d_out is not None else ctx.new_zeros(())
        if d_w is not None and weights is not None:
            objective = objective + (weights * d_w).sum()
        d_qkv = torch.autograd.grad(objective, qkv, allow_unused=True)
    # per sample: [B, positions, features]
    a3 = [x.movedim(bdim, 0) for x in x_qkv]
    d3 = [torch.zeros_like(q) if d is None else d for q, d in zip(qkv, d_qkv, strict=True)]
    d3 = [d.detach().movedim(bdim, 0) for d in d3]
    out: dict[str, Stats] = {}
    if not module._qkv_same_embed_dim:  # q_proj_weight [E, E], k_proj_weight [E, kdim], v_proj_weight [E, vdim]
        for name, a, d in zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), a3, d3, strict=True):
            out[name] = sequence_weight_moments(a, d, signs)
    elif arg["query"] is arg["key"] is arg["value"]:  # self-attention: one product for the packed [3E, E]
        out["in_proj_weight"] = sequence_weight_moments(a3[0], torch.cat(d3, 2), signs)
    else:
        out["in_proj_weight"] = _cat([sequence_weight_moments(a, d, signs) for a, d in zip(a3, d3, strict=True)])
    if module.in_proj_bias is not None:
        per_sample = [d.sum(1) for d in d3]  # [B, E] each: the q, k and v thirds of the bias
        if not module.add_zero_attn:
            # the key bias adds q_t . b_k to every logit of query t alike, and softmax ignores a constant per
            # row: its gradient is exactly 0, and what the sum above gives is rounding noise of random sign,
            # whose sign counts would differ from run to run (or between 1 and 2 processes)
            per_sample[1] = torch.zeros_like(per_sample[1])
        out["in_proj_bias"] = stats_of(torch.cat(per_sample, 1), signs)
    c3 = ctx.detach().movedim(bdim, 0)
    o3 = torch.zeros_like(c3) if d_out is None else d_out.movedim(bdim, 0)
    out["out_proj.weight"] = sequence_weight_moments(c3, o3, signs)
    if module.out_proj.bias is not None:
        out["out_proj.bias"] = stats_of(o3.sum(1), signs)
    return out


def _cat(parts: list[Stats]) -> Stats:
    """Stats of row blocks -> Stats of the stacked rows."""
    return tuple(None if p[0] is None else torch.cat(list(p)) for p in zip(*parts, strict=True))  # type: ignore[return-value]


def _by_vmap(
    module: nn.MultiheadAttention,
    arg: dict[str, Any],
    d_out: torch.Tensor | None,
    d_w: torch.Tensor | None,
    signs: bool,
) -> dict[str, Stats]:
    """Every parameter by torch.func, one sample at a time (vmap over chunks of samples)."""
    bdim = 0 if module.batch_first else 1
    batch = arg["query"].shape[bdim]
    mask = arg.get("attn_mask")
    split = {"query": bdim, "key": bdim, "value": bdim, "key_padding_mask": 0}
    if mask is not None and mask.dim() == 3:
        arg = {**arg, "attn_mask": mask.view(batch, module.num_heads, *mask.shape[1:])}  # per sample [heads, L, S]
        split["attn_mask"] = 0
    keys = list(arg)
    in_dims = [split.get(k) if isinstance(arg[k], torch.Tensor) else None for k in keys]
    fixed = {n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}

    def call(p: dict[str, torch.Tensor], x: list[Any]) -> Any:
        one = dict(zip(keys, x, strict=True))
        for k in ("query", "key", "value", "key_padding_mask"):
            if isinstance(one.get(k), torch.Tensor):
                one[k] = one[k].unsqueeze(split[k])  # a batch of one sample; a per-sample attn_mask is [heads, L, S]
        return functional_call(module, (p, fixed), (), one)

    return vmap_moments(call, params, [arg[k] for k in keys], in_dims, [d_out, d_w], [bdim, 0], signs)
