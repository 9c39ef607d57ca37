"""A small Vision Transformer (timm-style attention: one fused qkv projection and a
`num_heads` attribute) so heads and MLP widths can be pruned with torch-pruning's
num_heads support; the attention reads its head count from the module, so a pruned
model runs and rebuilds from recorded attributes."""
from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # unbind, not indexing: torch-pruning traces it as a split
        attn = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj(out)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, dim: int = 64, depth: int = 4,
                 heads: int = 4, patch: int = 4, image: int = 28, mlp_ratio: int = 2):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        n = (image // patch) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, n, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.fc(self.norm(self.blocks(x)).mean(1))  # mean-pooled tokens, no cls token


def vit_small(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """~140k params: 4 blocks, 4 heads, dim 64, 4x4 patches."""
    return ViT(num_classes, in_channels)


def vit_tiny(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """For tests: 2 blocks, 4 heads of width 8."""
    return ViT(num_classes, in_channels, dim=32, depth=2, heads=4)
