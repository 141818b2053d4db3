"""Diversity within a group: generic guards against a group collapsing onto one reward peak.

Both work on feature vectors of the samples (flowcoach uses the flattened samples themselves, so
they need no domain model) and on the group ids, and are applied by the trainer:
- ``cluster_bonus`` (DiverseGRPO, arXiv 2512.21514): spectral clustering of each group's samples;
  a sample earns 1 / (size of its cluster), so a sample unlike the rest earns most
  (``--loss.diversity-bonus WEIGHT`` adds it to the reward).
- ``min_cosine_distance`` and ``diversity_scaled_advantages`` (GARDO, arXiv 2512.24138): a positive
  advantage is scaled by how far the sample is from its nearest group member
  (``--loss.diversity-advantage``).
``group_ids_of`` recovers the groups from the conditions and ``duplicate_share`` scores each sample by
how many of its group it repeats, for the domain rewards that compare a sample with its group
(mol-duplicate, crystal-duplicate, crystal-formula-duplicate).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch


def rbf_affinity(features: torch.Tensor) -> torch.Tensor:
    """[n, n] self-tuning Gaussian affinity exp(-d_ij^2 / (s_i s_j)) (Zelnik-Manor and Perona): s_i is
    the distance to the sample's floor(sqrt n)-th nearest neighbour, so a tight cluster stays
    connected and a lone sample far from it does not. The diagonal stays 1, so a lone sample is a
    component of its own (a zero eigenvalue of the normalised Laplacian) rather than undefined."""
    d = torch.cdist(features, features)
    n = len(features)
    k = max(1, min(n - 1, math.isqrt(n)))
    scale = d.sort(dim=1).values[:, k].clamp(min=1e-6 * float(d.max()) + 1e-30)
    return torch.exp(-d**2 / (scale[:, None] * scale[None, :]))


def _kmeans(points: torch.Tensor, k: int, iterations: int = 50) -> torch.Tensor:
    """Lloyd's k-means with a deterministic farthest-point start (row 0 first)."""
    centres = [points[0]]
    for _ in range(1, k):
        d = torch.stack([((points - c) ** 2).sum(1) for c in centres]).min(dim=0).values
        centres.append(points[int(d.argmax())])
    centres = torch.stack(centres)
    labels = torch.zeros(len(points), dtype=torch.long)
    for _ in range(iterations):
        labels = torch.cdist(points, centres).argmin(dim=1)
        new = torch.stack([points[labels == c].mean(0) if (labels == c).any() else centres[c] for c in range(k)])
        if torch.allclose(new, centres):
            break
        centres = new
    return labels


def spectral_clusters(features: torch.Tensor, n_clusters: int = 0) -> torch.Tensor:
    """Cluster labels [n] by normalised spectral clustering (Ng, Jordan and Weiss).

    ``n_clusters`` 0 picks k by the largest gap of the normalised Laplacian's eigenvalues among the
    first n/2 + 1; identical samples form one cluster.
    """
    x = features.reshape(len(features), -1).double()
    n = len(x)
    if n < 2 or torch.cdist(x, x).max() == 0:
        return torch.zeros(n, dtype=torch.long)
    w = rbf_affinity(x)
    d = w.sum(1).clamp(min=1e-12)
    lap = torch.eye(n, dtype=x.dtype) - w / torch.sqrt(d[:, None] * d[None, :])
    values, vectors = torch.linalg.eigh(lap)
    if n_clusters <= 0:
        kmax = max(1, n // 2)
        gaps = values[1:kmax + 1] - values[:kmax]
        n_clusters = int(gaps.argmax()) + 1
    n_clusters = min(n_clusters, n)
    u = vectors[:, :n_clusters]
    u = u / u.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return _kmeans(u, n_clusters)


def cluster_bonus(features: torch.Tensor, group_ids: torch.Tensor, n_clusters: int = 0) -> torch.Tensor:
    """[B] 1 / (size of the sample's spectral cluster within its group): DiverseGRPO's exploration bonus."""
    bonus = torch.zeros(len(features))
    for g in torch.unique(group_ids).tolist():
        rows = torch.nonzero(group_ids == g).flatten()
        labels = spectral_clusters(features[rows], n_clusters)
        sizes = torch.bincount(labels).float()
        bonus[rows] = 1.0 / sizes[labels]
    return bonus


def min_cosine_distance(features: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """[B] distance 1 - cos to the nearest other member of the sample's group (GARDO's d_i)."""
    x = features.reshape(len(features), -1).float()
    x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    out = torch.zeros(len(x))
    for g in torch.unique(group_ids).tolist():
        rows = torch.nonzero(group_ids == g).flatten()
        dist = 1.0 - x[rows] @ x[rows].T
        dist.fill_diagonal_(float("inf"))
        out[rows] = dist.min(dim=1).values.clamp(min=0.0) if len(rows) > 1 else 0.0
    return out


def diversity_scaled_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, distance: torch.Tensor,
                                clip: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """GARDO's diversity-aware advantage: A = R - mean_group (no std); where A > 0 it is scaled by
    d / mean_group(d), so a good sample far from the others counts more. Returns (A, keep)."""
    from flowcoach.core.advantages import group_stats

    rewards = rewards.float()
    mean, std = group_stats(rewards, group_ids)
    mean_d, _ = group_stats(distance.float(), group_ids)
    adv = rewards - mean
    scale = torch.where(mean_d > 0, distance / mean_d.clamp(min=1e-12), torch.ones_like(distance))
    adv = torch.where(adv > 0, adv * scale, adv)
    if clip > 0:
        adv = adv.clamp(-clip, clip)
    return adv, std > 1e-8


def group_ids_of(conditions, count: int) -> np.ndarray:
    """Group id per sample: a new group starts where the condition row changes (groups are
    contiguous, each of G equal rows). Two neighbouring groups that drew the same condition merge."""
    if conditions is None:
        return np.zeros(count, dtype=int)
    rows = torch.as_tensor(conditions).reshape(count, -1)
    change = torch.ones(count, dtype=torch.bool)
    change[1:] = (rows[1:] != rows[:-1]).any(dim=1)
    return (torch.cumsum(change.long(), 0) - 1).numpy()


def duplicate_share(groups: np.ndarray, matches) -> np.ndarray:
    """-(share of the other members of its group that ``matches(i, j)``) per sample: 0 when it matches
    none of them (or is alone), -1 when it matches all. ``matches`` must be symmetric; it is asked once
    per pair (a StructureMatcher fit is not cheap)."""
    scores = np.zeros(len(groups), dtype=np.float32)
    for g in np.unique(groups):
        members = np.nonzero(groups == g)[0]
        if len(members) < 2:
            continue
        same = np.zeros(len(members), dtype=int)
        for a, b in itertools.combinations(range(len(members)), 2):
            if matches(int(members[a]), int(members[b])):
                same[a] += 1
                same[b] += 1
        scores[members] = -same / (len(members) - 1)
    return scores
