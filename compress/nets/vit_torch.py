"""A small Vision Transformer built the way a user builds one from PyTorch's own blocks:
patch-embedding conv, class token, position embedding, nn.TransformerEncoder of
nn.TransformerEncoderLayer (nn.MultiheadAttention inside), LayerNorm and a Linear head.

The zoo's `vit` is timm-style (a fused qkv Linear the pipeline prunes and quantizes
directly); this one is for the other path: torch's fast-path encoder layer, which the
quantize, export and prune stages first rewrite into explicit attention
(compress/quantize/attention.py)."""
from __future__ import annotations

import torch
from torch import nn


class TorchViT(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, patch: int = 4,
                 dim: int = 32, depth: int = 2, heads: int = 4, mlp_dim: int = 64, norm_first: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=mlp_dim, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=norm_first)
        # enable_nested_tensor=False: no masks here, and it only warns with norm_first
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.encoder(x))[:, 0])


def vit_torch_tiny(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """For tests: 2 pre-norm layers, 4 heads of width 8, 4x4 patches (~18k params)."""
    return TorchViT(num_classes, in_channels, image_size)


def vit_torch_small(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """4 post-norm layers (torch's default norm_first=False), 4 heads of width 16."""
    return TorchViT(num_classes, in_channels, image_size, dim=64, depth=4, mlp_dim=128, norm_first=False)
