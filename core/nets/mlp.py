"""A residual MLP velocity model for vector data [B, D]."""

from __future__ import annotations

import torch
from torch import nn

from flowcoach.core.nets.common import TimeCondEmbedding


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.net = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.film = nn.Linear(width, 2 * width)  # scale and shift from the time/cond embedding

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb).chunk(2, dim=-1)
        return h + self.net(self.norm(h) * (1 + scale) + shift)


class MLPVelocity(nn.Module):
    """v(x_t, t, cond) for x of shape [B, dim]."""

    def __init__(self, dim: int, width: int = 128, depth: int = 3, cond_classes: int = 0, cond_dim: int = 0):
        super().__init__()
        self.embed = TimeCondEmbedding(width, cond_classes, cond_dim)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        emb = self.embed(t, cond)
        h = self.inp(x_t)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)
