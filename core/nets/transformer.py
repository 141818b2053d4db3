"""A transformer velocity model for sets and sequences x of shape [B, N, F] (atoms, tokens, frames)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flowcoach.core.nets.common import TimeCondEmbedding


def _modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # adaLN: the same per-channel scale/shift for every element of a sample
    return h * (1 + scale[:, None]) + shift[:, None]


class AdaLNBlock(nn.Module):
    """Pre-norm self-attention + MLP, each modulated (shift, scale, gate) by the time/cond embedding."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)  # adaLN supplies the affine
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, h: torch.Tensor, emb: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(emb).chunk(6, dim=-1)
        B, N, W = h.shape
        q, k, v = self.qkv(_modulate(self.norm1(h), shift1, scale1)).view(B, N, 3, self.heads, W // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
        h = h + gate1[:, None] * self.proj(a.transpose(1, 2).reshape(B, N, W))
        return h + gate2[:, None] * self.mlp(_modulate(self.norm2(h), shift2, scale2))


class SetTransformerVelocity(nn.Module):
    """v(x_t, t, cond) for x of shape [B, N, features].

    With ``positional=False`` no element knows its index, so the model is permutation-equivariant
    (permuting the N elements of x_t permutes v the same way): right for sets such as atoms. With
    ``positional=True`` a learned position embedding (up to ``max_len`` elements) is added: right
    for sequences. ``mask`` [B, N] bool (True = real element) keeps padding out of attention and
    returns v = 0 there, so padded entries stay where they are under any sampler.
    """

    def __init__(
        self,
        features: int,
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        cond_classes: int = 0,
        cond_dim: int = 0,
        positional: bool = False,
        max_len: int = 1024,
    ):
        super().__init__()
        self.embed = TimeCondEmbedding(width, cond_classes, cond_dim)
        self.inp = nn.Linear(features, width)
        self.pos = nn.Parameter(0.02 * torch.randn(max_len, width)) if positional else None
        self.blocks = nn.ModuleList(AdaLNBlock(width, heads) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width, elementwise_affine=False)
        self.out_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, features)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(t, cond)
        h = self.inp(x_t)
        if self.pos is not None:
            if h.shape[1] > self.pos.shape[0]:
                raise ValueError(f"sequence length {h.shape[1]} exceeds max_len {self.pos.shape[0]}")
            h = h + self.pos[: h.shape[1]]
        # [B, 1, 1, N]: every query attends only to real keys
        attn_mask = mask[:, None, None, :].bool() if mask is not None else None
        for block in self.blocks:
            h = block(h, emb, attn_mask)
        shift, scale = self.out_ada(emb).chunk(2, dim=-1)
        v = self.out(_modulate(self.out_norm(h), shift, scale))
        return v * mask[..., None].to(v.dtype) if mask is not None else v
