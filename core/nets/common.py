"""Pieces shared by the backbones: time embedding and condition embedding."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """[B] times in [0, 1] -> [B, dim] sin/cos features (t is scaled by 1000 as in diffusers)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


class TimeCondEmbedding(nn.Module):
    """Embeds t and an optional condition into one [B, width] vector.

    A condition is None, a long tensor [B] of class ids (``cond_classes`` > 0) or a float tensor
    [B, cond_dim] (``cond_dim`` > 0).
    """

    def __init__(self, width: int, cond_classes: int = 0, cond_dim: int = 0):
        super().__init__()
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.width = width
        self.classes = nn.Embedding(cond_classes, width) if cond_classes > 0 else None
        self.vector = nn.Linear(cond_dim, width) if cond_dim > 0 else None

    def forward(self, t: torch.Tensor, cond) -> torch.Tensor:
        emb = self.time(sinusoidal_embedding(t, self.width))
        if cond is not None and self.classes is not None:
            emb = emb + self.classes(cond.long())
        elif cond is not None and self.vector is not None:
            emb = emb + self.vector(cond.float())
        return emb
