"""Torus math for fractional coordinates, and how the torus flow sits on the core's Euclidean flow.

Fractional coordinates f live on the 3-torus [0, 1)^3. DiffCSP/FlowMM move them along the geodesic
from data f0 to noise f1: ``f_t = wrap(f0 + t d)`` with ``d = periodic_displacement(f0, f1)``, the
shortest periodic displacement, which is also the (constant) velocity of that path.

The core's samplers and its flow-matching loss are Euclidean: x_t = (1 - t) x0 + t eps with
Gaussian transitions whose log-probs are exact. The crystal flow keeps them exact by running in
the *covering space* R^3 (an unwrapped chart) and wrapping only in ``decode`` and the rewards:

- a crystal's fractional coordinates are lifted to R^3, each atom to one periodic image
  f0 + k (k in Z^3), drawn with probability proportional to the prior's density N(f0 + k; 0, I)
  (``lift``). The lifted data wrap back to the same crystal whatever k is drawn, so a flow from
  N(0, I) to the lifted data is, after ``wrap``, a flow to the crystals;
- eps ~ N(0, I) wrapped to the torus is uniform to ~1e-8 (a unit-period wrapped normal), the
  torus prior of DiffCSP/FlowMM;
- for the pair (image, eps) whose image is the one nearest to eps, the Euclidean path is the torus
  geodesic and its velocity eps - (f0 + k) is exactly the shortest periodic displacement
  (``nearest_image``; tested). Images are weighted by the prior, so the learned Euclidean velocity
  is dominated by those near pairs: the torus velocity in the limit, without leaving R^3.
Nothing in the sampler wraps, so every transition is the core's Gaussian and its log-prob exact.
"""

from __future__ import annotations

import numpy as np
import torch

IMAGE_RANGE = 3  # lifts use images k in [-3, 3]: N(0, 1) puts < 1e-3 mass beyond


def wrap(f):
    """Fractional coordinates mod 1, into [0, 1) (numpy or torch)."""
    return f - np.floor(f) if isinstance(f, np.ndarray) else f - torch.floor(f)


def periodic_displacement(f0, f1):
    """Shortest periodic displacement from f0 to f1, in [-0.5, 0.5) per coordinate."""
    return wrap(f1 - f0 + 0.5) - 0.5


def wrapped_interpolation(f0, f1, t):
    """Torus geodesic from f0 (t = 0) to f1 (t = 1), wrapped into [0, 1)."""
    return wrap(f0 + t * periodic_displacement(f0, f1))


def torus_velocity(f0, f1):
    """d/dt of ``wrapped_interpolation``: the constant shortest displacement f0 -> f1."""
    return periodic_displacement(f0, f1)


def nearest_image(f0, eps):
    """The image f0 + k closest to eps; its Euclidean path to eps wraps onto the torus geodesic."""
    return eps - periodic_displacement(f0, eps)


def lift(frac: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lift fractional coordinates [n, 3] in [0, 1) to R^3: each coordinate to an image f + k, with
    P(k) proportional to the standard normal density at f + k (the prior the core samples from)."""
    k = np.arange(-IMAGE_RANGE, IMAGE_RANGE + 1)
    images = frac[..., None] + k  # [n, 3, K]
    weights = np.exp(-0.5 * images**2)
    cum = np.cumsum(weights / weights.sum(-1, keepdims=True), axis=-1)
    pick = (rng.random(frac.shape)[..., None] > cum).sum(-1).clip(0, len(k) - 1)
    return np.take_along_axis(images, pick[..., None], axis=-1)[..., 0]


def fourier_features(d: torch.Tensor, harmonics: int) -> torch.Tensor:
    """[..., 3] periodic displacements -> [..., 6 harmonics] sin/cos(2 pi m d), m = 1..harmonics:
    smooth and exactly periodic, so atoms across a cell face look as close as they are."""
    m = torch.arange(1, harmonics + 1, dtype=d.dtype, device=d.device)
    arg = 2 * torch.pi * d[..., None] * m  # [..., 3, H]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1).flatten(-2)


def align_to_noise(chart: np.ndarray, eps: np.ndarray, species: np.ndarray) -> np.ndarray:
    """One crystal's lifted coordinates [n, 3] re-expressed nearest to its noise [n, 3].

    Atoms of the same element are permuted onto the noise rows (Hungarian on the squared shortest
    periodic displacement), then every coordinate is moved to its image nearest the noise, so each
    row's Euclidean path is the torus geodesic (``nearest_image``). Both keep the crystal: the same
    element sits on the same sites, and any image wraps to the same fractional coordinate.
    """
    from scipy.optimize import linear_sum_assignment

    frac = wrap(chart)
    out = np.empty_like(chart)
    for element in np.unique(species):
        rows = np.flatnonzero(species == element)
        d = periodic_displacement(frac[rows][None], eps[rows][:, None])  # [noise row, data row, 3]
        _, order = linear_sum_assignment((d**2).sum(-1))
        out[rows] = nearest_image(frac[rows][order], eps[rows])
    return out

