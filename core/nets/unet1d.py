"""A small 1-D convolutional U-Net velocity model for signals x of shape [B, C, L] (mel frames, action chunks)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flowcoach.core.nets.common import TimeCondEmbedding


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)  # a group count that divides channels


class ResBlock1D(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with FiLM (scale, shift) from the embedding before the second conv."""

    def __init__(self, c_in: int, c_out: int, emb_width: int, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv1d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_width, 2 * c_out)
        self.norm2 = _norm(c_out, groups)
        self.conv2 = nn.Conv1d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        r = self.conv1(F.silu(self.norm1(h)))
        scale, shift = self.film(emb)[..., None].chunk(2, dim=1)
        r = self.conv2(F.silu(self.norm2(r) * (1 + scale) + shift))
        return self.skip(h) + r


class UNet1DVelocity(nn.Module):
    """v(x_t, t, cond) for x of shape [B, channels, L], any L >= 1.

    Two resolution levels (L, L/2) around a bottleneck at L/4, with skip connections. L is
    zero-padded on the right to a multiple of 4 and the output is cropped back to L.
    """

    levels = 2

    def __init__(
        self,
        channels: int,
        width: int = 64,
        mults: tuple[int, int] = (1, 2),
        cond_classes: int = 0,
        cond_dim: int = 0,
        groups: int = 8,
    ):
        super().__init__()
        widths = [width * m for m in mults]
        self.embed = TimeCondEmbedding(width, cond_classes, cond_dim)
        self.inp = nn.Conv1d(channels, width, 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        c = width
        for w in widths:
            self.down_blocks.append(ResBlock1D(c, w, width, groups))
            self.downs.append(nn.Conv1d(w, w, 3, stride=2, padding=1))  # halves L (L even)
            c = w
        self.mid = nn.ModuleList([ResBlock1D(c, c, width, groups), ResBlock1D(c, c, width, groups)])
        self.ups = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for w in reversed(widths):
            self.ups.append(nn.Conv1d(c, c, 3, padding=1))  # smooths after nearest upsampling
            self.up_blocks.append(ResBlock1D(c + w, w, width, groups))  # concatenated skip
            c = w
        self.out = nn.Sequential(_norm(c, groups), nn.SiLU(), nn.Conv1d(c, channels, 3, padding=1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        emb = self.embed(t, cond)
        length = x_t.shape[-1]
        h = self.inp(F.pad(x_t, (0, -length % 2**self.levels)))
        skips = []
        for block, down in zip(self.down_blocks, self.downs):
            h = block(h, emb)
            skips.append(h)
            h = down(h)
        for block in self.mid:
            h = block(h, emb)
        for up, block in zip(self.ups, self.up_blocks):
            h = up(F.interpolate(h, scale_factor=2, mode="nearest"))
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)[..., :length]
