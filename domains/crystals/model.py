"""The crystal velocity model: a small periodic message-passing network in the manner of CSPNet.

x [B, N_MAX + 1, FEATURES] (see ``data``), cond [B, N_MAX] element indices (0 = padding).

- Atoms exchange messages over every pair in the cell; an edge sees the Fourier features of the
  shortest periodic displacement between the two atoms' wrapped coordinates (``torus``), so the
  network knows atoms across a cell face are neighbours. Each atom also sees periodic features of its
  own position and its lifted chart position (the velocity in R^3 depends on which image it heads to).
- The lattice channels (lengths and angles, invariant to rotation) and t enter every layer.
- Closed-form rows: where the answer is known, the flow's exact velocity is used, not the network.
  On the path x_t = (1 - t) c + t eps toward a known value c the velocity is (x_t - c) / t: padding
  rows go to the sentinel, the unused lattice channels to 0 and, in structure-prediction mode
  (``generate_types=False``), the type bits to the bits of the given composition. Every sampler
  then ends them at (or, on a noisy last step, within noise of) c, so ``decode`` reads the atoms and
  their elements from x alone. With ``generate_types=True`` the network predicts the type bits
  (analog bits of the element index) of the real atoms: de novo generation for a given atom count.
"""

from __future__ import annotations

import torch
from torch import nn

from flowcoach.core.nets.common import TimeCondEmbedding
from flowcoach.domains.crystals import torus
from flowcoach.domains.crystals.data import ANGLE_SCALE, BITS, FEATURES, LN_LEN_MEAN, LN_LEN_STD, N_MAX, VOCAB

T_MIN = 1e-4  # the closed-form velocity divides by t; Heun evaluates at t = 0
X0_BLEND_T = 0.1  # predict="x0": below about this t the output blends into a plain velocity


def bit_table(device=None) -> torch.Tensor:
    """[V + 1, BITS] analog bits of every element index (row 0: padding)."""
    idx = torch.arange(len(VOCAB) + 1, device=device)
    return (((idx[:, None] >> torch.arange(BITS, device=device)) & 1) * 2 - 1).float()


def target_rows(cond: torch.Tensor, n_max: int = N_MAX) -> torch.Tensor:
    """[B, n_max + 1, FEATURES] the known values c: sentinel padding, composition bits, 0 lattice tail."""
    B = cond.shape[0]
    c = torch.zeros(B, n_max + 1, FEATURES, device=cond.device)
    c[:, :n_max, 3:] = bit_table(cond.device)[cond.long()]
    return c


def known_mask(cond: torch.Tensor, generate_types: bool, n_max: int = N_MAX) -> torch.Tensor:
    """[B, n_max + 1, FEATURES] bool: entries whose velocity is closed-form."""
    real = cond > 0
    known = torch.zeros(cond.shape[0], n_max + 1, FEATURES, dtype=torch.bool, device=cond.device)
    known[:, :n_max] = ~real[..., None]  # padding rows, every channel
    if not generate_types:
        known[:, :n_max, 3:] |= real[..., None]
    known[:, n_max, 6:] = True
    return known


def lattice_matrix(features: torch.Tensor) -> torch.Tensor:
    """[B, 6] lattice channels (standardised ln lengths, scaled angles) -> [B, 3, 3] row vectors (Å).

    a along x, b in the xy plane (a rotation of pymatgen's matrix: the same lengths and angles). Angles are
    clamped to (20, 160) degrees so a noisy lattice still gives a finite cell.
    """
    lengths = torch.exp(features[:, :3] * LN_LEN_STD + LN_LEN_MEAN)
    alpha, beta, gamma = torch.deg2rad((90.0 + ANGLE_SCALE * features[:, 3:6]).clamp(20.0, 160.0)).unbind(-1)
    cos_a, cos_b, cos_g, sin_g = torch.cos(alpha), torch.cos(beta), torch.cos(gamma), torch.sin(gamma)
    cx = cos_b
    cy = (cos_a - cos_b * cos_g) / sin_g
    cz = torch.sqrt((1.0 - cx**2 - cy**2).clamp_min(1e-4))
    zero = torch.zeros_like(cos_a)
    rows = torch.stack([torch.stack([torch.ones_like(cos_a), zero, zero], -1),
                        torch.stack([cos_g, sin_g, zero], -1),
                        torch.stack([cx, cy, cz], -1)], dim=1)  # [B, 3, 3] unit row vectors
    return rows * lengths[..., None]


def displacement_lengths(d: torch.Tensor, lattice: torch.Tensor) -> torch.Tensor:
    """[B, N, N, 3] fractional displacements -> [B, N, N] lengths (Å) under the lattice channels [B, 6]."""
    cart = torch.einsum("bijk,bkl->bijl", d, lattice_matrix(lattice))
    return (cart.pow(2).sum(-1) + 1e-8).sqrt()


class Layer(nn.Module):
    def __init__(self, width: int, edge_dim: int, heads: int = 0):
        super().__init__()
        self.msg = nn.Sequential(nn.Linear(2 * width + edge_dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.upd = nn.Sequential(nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, width))
        self.norm = nn.LayerNorm(width)
        self.heads = heads
        if heads:  # attention over the pairs: each head weighs width / heads message channels
            self.score = nn.Linear(width, heads)

    def forward(self, h, edge, pair_mask, emb):
        B, N, W = h.shape
        h_in = self.norm(h + emb[:, None])
        pairs = torch.cat([h_in[:, :, None].expand(B, N, N, W), h_in[:, None].expand(B, N, N, W), edge], dim=-1)
        m = self.msg(pairs) * pair_mask[..., None]
        if self.heads:
            logits = self.score(m).masked_fill(pair_mask[..., None] == 0, -1e9)
            weights = torch.softmax(logits, dim=2) * pair_mask[..., None]  # a padding row: all zero
            agg = (weights.repeat_interleave(W // self.heads, dim=-1) * m).sum(2)
        else:
            agg = m.sum(2) / pair_mask.sum(2, keepdim=True).clamp_min(1.0)
        return h + self.upd(torch.cat([h_in, agg], dim=-1))


class CrystalVelocity(nn.Module):
    def __init__(self, width: int = 64, depth: int = 4, harmonics: int = 4, generate_types: bool = False,
                 n_max: int = N_MAX, distance_rbf: int = 0, cutoff: float = 6.0, predict: str = "velocity",
                 heads: int = 0):
        super().__init__()
        if predict not in ("velocity", "x0"):
            raise ValueError(f"predict must be 'velocity' or 'x0', got {predict!r}")
        self.n_max, self.harmonics, self.generate_types = n_max, harmonics, generate_types
        # predict="x0": the network gives the clean crystal (each atom's fractional position as a point
        # on the circle per axis, the lattice channels) and the velocity follows in closed form, as the
        # torus geodesic's: v = periodic_displacement(x0_hat, x_t) / t. A site the data always put an
        # element on is then a constant output; a velocity network has to draw that displacement / t,
        # a sawtooth in x_t that grows as 1 / t, and the shipped one never learned it (see benchmarks/
        # crystals/README.md, "Where the atoms go"). Made for the torus couplings (nearest image,
        # geodesic), whose conditional velocity is exactly that displacement.
        self.predict = predict
        # distance_rbf > 0: edges also see the Cartesian length (Å) of the shortest periodic
        # displacement under the (noisy) lattice, in a Gaussian basis: close contacts are then visible
        # as such whatever the cell's shape (fractional displacements alone do not say how close)
        self.distance_rbf, self.cutoff = distance_rbf, cutoff
        if distance_rbf:
            self.register_buffer("centres", torch.linspace(0.0, cutoff, distance_rbf), persistent=False)
        self.embed = TimeCondEmbedding(width, cond_dim=6)  # t and the (noisy) lattice channels
        self.types = nn.Embedding(len(VOCAB) + 1, width)
        node_in = 6 * harmonics + (3 if predict == "velocity" else 0) + (BITS if generate_types else 0)
        self.node = nn.Linear(node_in, width)
        edge_dim = 6 * harmonics + distance_rbf
        # heads > 0: attention-weighted messages in place of their mean, so an atom can single out the
        # atom of its own element that heads for the same site
        self.layers = nn.ModuleList(Layer(width, edge_dim, heads) for _ in range(depth))
        self.coord_out = nn.Linear(width, 9 if predict == "x0" else 3)
        self.type_out = nn.Linear(width, BITS)
        self.lattice_out = nn.Sequential(nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, 12 if predict == "x0" else 6))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        B, N = x_t.shape[0], self.n_max
        if x_t.shape[1:] != (N + 1, FEATURES):
            raise ValueError(f"crystal samples have shape [B, {N + 1}, {FEATURES}], got {list(x_t.shape)}")
        cond = torch.as_tensor(cond, device=x_t.device).long().reshape(B, N)
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).reshape(-1).expand(B)
        real = cond > 0
        chart = x_t[:, :N, :3]
        frac = torus.wrap(chart)
        lattice = x_t[:, N, :6]
        emb = self.embed(t, lattice)
        # CSP: the element is known; de novo: only that an atom is there, its bits are read from x
        ids = cond if not self.generate_types else real.long()
        # the velocity network also sees the chart (the lifted image it heads to); an x0 network sees
        # only the torus, since its answer does not depend on the image
        feats = [torus.fourier_features(frac, self.harmonics)]
        if self.predict == "velocity":
            feats.append(torch.tanh(chart / 2))
        if self.generate_types:
            feats.append(x_t[:, :N, 3:])
        h = self.types(ids) + self.node(torch.cat(feats, dim=-1))
        d = torus.periodic_displacement(frac[:, :, None], frac[:, None])  # [B, N, N, 3]
        edge = torus.fourier_features(d, self.harmonics)
        if self.distance_rbf:
            dist = displacement_lengths(d, lattice)
            width = self.cutoff / self.distance_rbf
            edge = torch.cat([edge, torch.exp(-(((dist[..., None] - self.centres) / width) ** 2))], dim=-1)
        pair_mask = (real[:, :, None] & real[:, None]).float()
        for layer in self.layers:
            h = layer(h, edge, pair_mask, emb)
        m = real[..., None].float()
        pooled = torch.cat([(h * m).sum(1) / m.sum(1).clamp_min(1.0), emb], dim=-1)
        v = torch.zeros_like(x_t)
        tb = t.clamp_min(T_MIN)[:, None]
        if self.predict == "x0":
            # v = (x_t - x0_hat) / (t + s) + s / (t + s) w: the x0 form (x_t - x0_hat) / t where t >> s,
            # where sites are chosen; near t = 0, where x0_hat = x_t to within t, a bounded velocity w
            # (a pure x0 output would have to copy x_t exactly, and its error / t blows up the loss)
            cos, sin, w = self.coord_out(h).view(B, N, 3, 3).unbind(2)
            frac0 = torch.atan2(sin, cos) / (2 * torch.pi)
            lat0, w_lat = self.lattice_out(pooled).chunk(2, dim=-1)
            ts = (t + X0_BLEND_T)[:, None]
            v[:, :N, :3] = (torus.periodic_displacement(frac0, frac) + X0_BLEND_T * w) / ts[..., None]
            v[:, N, :6] = (lattice - lat0 + X0_BLEND_T * w_lat) / ts
        else:
            v[:, :N, :3] = self.coord_out(h)
            v[:, N, :6] = self.lattice_out(pooled)
        v[:, :N, 3:] = self.type_out(h)
        exact = (x_t - target_rows(cond, N).to(x_t.dtype)) / tb[..., None]
        return torch.where(known_mask(cond, self.generate_types, N), exact, v)
