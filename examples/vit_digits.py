"""A small vision transformer as a gentrace model factory (`model.arch = "vit_digits.py:vit"`).

Patch embedding (a strided Conv2d), a class token and a positional embedding (parameters of the model
itself, used outside any submodule), pre-norm blocks of LayerNorm, nn.MultiheadAttention and a GELU
MLP, then a LayerNorm and a linear head on the class token. On scikit-learn's 8x8 digits with 2x2
patches it sees 16 tokens. Every parameter gets exact per-sample gradient moments, and
`record.activations.layers = "gates"` records the GELU call sites (bit: input > 0).

Run it (from this folder):
    gentrace record vit_digits.toml
"""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with a GELU."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x: [B, T, dim] -> [B, T, dim]`."""
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """`[B, C, H, W] -> [B, num_outputs]`: patches, class token, positions, `depth` blocks, head."""

    def __init__(
        self, channels: int, size: int, num_outputs: int, patch: int, dim: int, depth: int, heads: int, hidden: int
    ) -> None:
        super().__init__()
        tokens = (size // patch) ** 2
        self.patches = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify from the class token's final state."""
        tokens = self.patches(x).flatten(2).transpose(1, 2)  # [B, T, dim]
        cls = self.cls_token.expand(len(x), -1, -1)
        h = torch.cat([cls, tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0]))


def vit(
    input_shape: tuple[int, ...],
    num_outputs: int,
    patch: int = 2,
    dim: int = 32,
    depth: int = 2,
    heads: int = 4,
    hidden: int = 64,
) -> nn.Module:
    """Gentrace's model factory signature: `(input_shape, num_outputs, **model.options) -> nn.Module`."""
    channels, height, width = input_shape
    if height != width or height % patch:
        raise ValueError(f"vit needs square images whose side is a multiple of patch = {patch}, got {input_shape}")
    return ViT(channels, height, num_outputs, patch, dim, depth, heads, hidden)
