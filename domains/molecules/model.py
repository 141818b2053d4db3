"""The molecule velocity model: E(3)-equivariant flow over atoms, built on the core's set-transformer blocks.

- The condition's first column is the atom count n: it builds the padding mask, so padding never
  enters attention.
- Padding rows get the exact flow toward the sentinel (position 0, type "absent"): with the
  conditional path x_t = (1 - t) s + t eps the velocity is (x_t - s) / t, known without a network.
  Every sampler then ends padding exactly at the sentinel, so ``decode`` can tell real atoms from
  padding without the condition.
- Translations: the network sees positions centred on the real atoms' mean and its positional
  output is made mean-free. The data are centred, so the mean of x_t over real atoms is t times the
  noise's mean, and the mean of the target eps - x0 is exactly that mean / t: added in closed form.
  The noise need not be projected (the core draws plain Gaussian noise) and samples end centred.
- Rotations: the atoms' features are invariant (types and distances) and positions move along
  interatomic vectors, so the model is rotation-equivariant (a first design fed raw coordinates to
  a set transformer and, after 1,000 CPU steps, was no better than chance at atom stability).
"""

from __future__ import annotations

import torch
from torch import nn

from flowcoach.core.nets.common import TimeCondEmbedding
from flowcoach.core.nets.transformer import AdaLNBlock
from flowcoach.domains.molecules.data import ABSENT, FEATURES, N_MAX, TYPE_SCALE

T_MIN = 1e-4  # the closed-form terms divide by t; Heun evaluates at t = 0


def sentinel(like: torch.Tensor) -> torch.Tensor:
    """[FEATURES] padding value: position 0, one-hot "absent"."""
    s = torch.zeros(FEATURES, dtype=like.dtype, device=like.device)
    s[3 + ABSENT] = TYPE_SCALE
    return s


def atom_mask(cond: torch.Tensor, n_max: int) -> torch.Tensor:
    """[B, n_max] bool, True for the first n atoms of each row (n = cond[:, 0])."""
    n = cond[:, 0].round().long().clamp(1, n_max)
    return torch.arange(n_max, device=cond.device)[None, :] < n[:, None]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, F] mean of x [B, N, F] over the rows where mask [B, N] is True."""
    m = mask[..., None].to(x.dtype)
    return (x * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1.0)


class MoleculeVelocity(nn.Module):
    """v(x_t, t, cond) for x [B, N_MAX, 3 + K + 1] and cond [B, 2] = (n atoms, n heavy atoms).

    Atom features are rotation- and translation-invariant: the (noisy) type channels plus, per atom,
    a type-resolved histogram of distances to the other atoms (Gaussian radial basis, so it is smooth
    in x). The core's adaLN set-transformer blocks mix them over the real atoms (conditioned on t and
    the counts). Positions move along interatomic vectors, v_i = sum_j (x_i - x_j) phi_ij / (1 + d_ij)
    with a symmetric learned phi_ij (EGNN's coordinate update): the positional velocity is
    E(3)-equivariant and sums to zero over the atoms, the type velocity invariant.
    """

    def __init__(self, width: int = 64, depth: int = 4, heads: int = 4, n_max: int = N_MAX,
                 rbf: int = 16, cutoff: float = 5.0):
        super().__init__()
        self.n_max = n_max
        channels = FEATURES - 3
        self.register_buffer("centres", torch.linspace(0.0, cutoff, rbf), persistent=False)
        self.rbf_width = cutoff / rbf
        self.embed = TimeCondEmbedding(width, cond_dim=2)
        self.inp = nn.Linear(channels + rbf * channels, width)
        self.blocks = nn.ModuleList(AdaLNBlock(width, heads) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width, elementwise_affine=False)
        self.out_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.type_out = nn.Linear(width, channels)
        self.edge = nn.Sequential(nn.Linear(width + rbf, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        B, N, _ = x_t.shape
        cond = torch.as_tensor(cond, dtype=x_t.dtype, device=x_t.device).reshape(B, -1)
        mask = atom_mask(cond, N)
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).reshape(-1).expand(B)
        tb = t.clamp_min(T_MIN)[:, None, None]
        com = masked_mean(x_t[..., :3], mask)
        types = x_t[..., 3:] / TYPE_SCALE
        diff = x_t[:, :, None, :3] - x_t[:, None, :, :3]  # [B, N, N, 3]
        dist = (diff.pow(2).sum(-1) + 1e-8).sqrt()
        pair = mask[:, :, None] & mask[:, None, :] & ~torch.eye(N, dtype=torch.bool, device=x_t.device)
        rbf = torch.exp(-(((dist[..., None] - self.centres) / self.rbf_width) ** 2)) * pair[..., None]
        env = torch.einsum("bijr,bjk->bikr", rbf, types).reshape(B, N, -1)  # per-type distance histogram
        h = self.inp(torch.cat([types, env], dim=-1))
        emb = self.embed(t, cond / cond.new_tensor([self.n_max, 9.0]))  # counts scaled to ~[0, 1]
        for block in self.blocks:
            h = block(h, emb, mask[:, None, None, :])
        shift, scale = self.out_ada(emb).chunk(2, dim=-1)
        h = self.out_norm(h) * (1 + scale[:, None]) + shift[:, None]
        phi = self.edge(torch.cat([h[:, :, None] + h[:, None, :], rbf], dim=-1)).squeeze(-1) * pair
        v_pos = (diff / (1.0 + dist[..., None]) * phi[..., None]).sum(dim=2)
        v_pos = v_pos - masked_mean(v_pos, mask) + com / tb
        v = torch.cat([v_pos, self.type_out(h)], dim=-1)
        v_pad = (x_t - sentinel(x_t)) / tb
        return torch.where(mask[..., None], v, v_pad)
