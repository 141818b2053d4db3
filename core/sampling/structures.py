"""Rollout structures: which steps of which sample are stochastic, on which time grid, and which
samples share work. A structure turns the config and the RL step into a ``RolloutPlan``; the one
sampler (``sampler.sample``) runs every plan, so an algorithm's sampler is a plan, not new code.

Structures (../shared/research/algorithms.md §1-§5), registered by name (``--sampler.structure``):
- ``window``: SDE on a window of consecutive steps, ODE elsewhere (window size 0: every step but
  maybe the last, Flow-GRPO). The window's start follows a schedule: ``random`` (Flow-GRPO-Fast),
  ``progressive``, ``decay``, ``exp-decay`` (MixGRPO's sliding window). After the window the ODE may
  use another solver on a compressed grid (MixGRPO-Flash: DPM-Solver++ on fewer steps).
- ``branch``: one SDE step per group at a step drawn per group, ODE elsewhere, the group's samples
  sharing the initial noise and so the ODE prefix (TempFlow-GRPO's trajectory branching).
- ``tree``: the group's samples share the initial noise and split into k children at each chosen
  step (SDE there, ODE elsewhere): a tree with G = k^D leaves whose prefixes are computed once
  (TreeGRPO / BranchGRPO).
- ``merged``: E-GRPO. Consecutive low-entropy steps are merged into one SDE step until its entropy
  reaches a threshold; each group follows a shared ODE anchor and its subgroups branch at K of the
  merged steps, one each, then finish by ODE.
Samples of a group share the initial noise when ``same_noise_in_group`` is set (and always in
``branch``, ``tree``, ``merged``); the sampler then evaluates their common states once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from flowcoach.core.registry import STRUCTURES, FlowcoachError
from flowcoach.core.sampling.laws import LOG_SQRT_2PI, law_mean_std
from flowcoach.core.sampling.sampler import time_grid

HALF_LOG_2PIE = LOG_SQRT_2PI + 0.5  # entropy of N(0, 1) per dimension


@dataclass
class RolloutPlan:
    """What to sample at one RL step, for B = groups x G rows (group-major)."""

    timesteps: torch.Tensor  # [T+1] shared grid, or [B, T+1] one per row
    stochastic: torch.Tensor  # [B, T] bool
    solvers: tuple[str, ...]  # ODE solver of each step
    shared_root: bool = False  # the G rows of a group start from one initial noise
    branch_keys: torch.Tensor | None = None  # [B, T]: rows of one node with equal keys share a child
    adv_groups: torch.Tensor | None = None  # [B]: advantage normalisation subgroups

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[-1] - 1

    def rows(self, idx: torch.Tensor) -> "RolloutPlan":
        """The plan of some rows (this process's groups)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and not (f.name == "timesteps" and value.dim() == 1):
                value = value[idx]
            out[f.name] = value
        return RolloutPlan(**out)


# ----------------------------------------------------------------------------- pure functions
def window_positions(lo: int, hi: int, stride: int) -> list[int]:
    """Window starts lo, lo + stride, ... below hi (stride 0: the window stays at lo)."""
    return [lo] if stride <= 0 else list(range(lo, hi, stride))


def window_durations(schedule: str, n_positions: int, every: int, decay: float = 0.1) -> list[int]:
    """RL steps the window stays at each position: ``progressive`` every at each, ``decay`` fewer
    later (every (1 - l / n), linearly), ``exp-decay`` every exp(-decay ReLU(l - n/2)) (MixGRPO)."""
    if every < 1:
        raise FlowcoachError(f"sampler.window_every must be >= 1, got {every}")
    if schedule == "progressive":
        return [every] * n_positions
    if schedule == "decay":
        return [max(1, round(every * (1 - l / n_positions))) for l in range(n_positions)]
    if schedule == "exp-decay":
        return [max(1, round(every * math.exp(-decay * max(0, l - n_positions // 2)))) for l in range(n_positions)]
    raise FlowcoachError(f"unknown window schedule '{schedule}'; choose one of: random, progressive, decay, exp-decay")


def window_start(step: int, schedule: str, lo: int, hi: int, every: int = 25, stride: int = 1, decay: float = 0.1,
                 generator: torch.Generator | None = None) -> int:
    """Start of the SDE window at RL step ``step``, among starts in [lo, hi).

    ``random``: uniform at every step (Flow-GRPO-Fast, MixGRPO's random mode). The others slide
    from the noisiest start towards clean steps by ``stride``, staying ``window_durations`` steps at
    each, and roll back to lo at the end (MixGRPO's progressive schedule and its decays).
    """
    if hi <= lo:
        raise FlowcoachError(f"no room for the SDE window: starts [{lo}, {hi}) are empty")
    if schedule == "random":
        return int(torch.randint(lo, hi, (1,), generator=generator))
    positions = window_positions(lo, hi, stride)
    durations = window_durations(schedule, len(positions), every, decay)
    k = step % sum(durations)
    for position, duration in zip(positions, durations):
        if k < duration:
            return position
        k -= duration
    raise AssertionError("unreachable")


def compressed_tail(grid: torch.Tensor, keep_until: int, fraction: float) -> torch.Tensor:
    """The grid up to index keep_until, then the rest with about ``fraction`` of its steps (at least
    one), on the same (shifted) schedule: MixGRPO-Flash's compressed post-window ODE."""
    steps = grid.shape[0] - 1
    tail = steps - keep_until
    if fraction >= 1.0 or tail <= 1:
        return grid
    m = max(1, round(fraction * tail))
    idx = torch.linspace(keep_until, steps, m + 1).round().long()
    return torch.cat([grid[:keep_until], grid[idx]])


def step_std(law: str, noise_level: float, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """Std of a stochastic step from t to t_next (any length: a merged step is one long step)."""
    t, t_next = torch.as_tensor(t, dtype=torch.float32).reshape(-1), torch.as_tensor(t_next, dtype=torch.float32).reshape(-1)
    zeros = torch.zeros(t.shape[0], 1)
    return law_mean_std(law, zeros, zeros, t, t_next, noise_level)[1].reshape(-1)


def step_entropy(law: str, noise_level: float, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """Entropy per dimension of a stochastic step, 1/2 log(2 pi e std^2) (E-GRPO's H_t / d)."""
    return HALF_LOG_2PIE + torch.log(step_std(law, noise_level, t, t_next))


def merge_blocks(grid: torch.Tensor, law: str, noise_level: float, threshold: float, end: int) -> list[tuple[int, int]]:
    """Partition steps [0, end) into blocks (start i, length m): from each start, merge the next
    steps until the merged step t_i -> t_{i+m} has entropy per dimension >= threshold (or the
    steps run out). High-entropy (early) steps stay single; late ones merge."""
    blocks, i = [], 0
    while i < end:
        m = 1
        while i + m < end and float(step_entropy(law, noise_level, grid[i], grid[i + m])) < threshold:
            m += 1
        blocks.append((i, m))
        i += m
    return blocks


# ----------------------------------------------------------------------------- structures
class Structure:
    """A rollout structure: ``plan`` for the step's groups, and its trained pairs per sample."""

    name = ""
    interact = True  # usable on interact domains (per-chunk plans, no sharing between episodes)

    def plan(self, cfg, step: int, n_groups: int, generator: torch.Generator) -> RolloutPlan:
        raise NotImplementedError

    def pairs_per_sample(self, cfg) -> float:
        raise NotImplementedError


def _last_trainable(cfg) -> int:
    return cfg.sampler.num_steps - (1 if cfg.sampler.deterministic_last_step else 0)


def _range(cfg) -> tuple[int, int]:
    lo, hi = cfg.sampler.sde_window_range if cfg.sampler.sde_window_range is not None else (0, _last_trainable(cfg))
    return lo, min(hi, _last_trainable(cfg))


@STRUCTURES.register("window")
class Window(Structure):
    def plan(self, cfg, step, n_groups, generator):
        s = cfg.sampler
        rows = n_groups * cfg.group_size
        grid = time_grid(s.num_steps, s.shift)
        solvers = [s.ode_solver] * s.num_steps
        mask = torch.zeros(rows, s.num_steps, dtype=torch.bool)
        if s.sde_window_size <= 0:
            mask[:, :_last_trainable(cfg)] = True
            return RolloutPlan(grid, mask, tuple(solvers), shared_root=s.same_noise_in_group)
        lo, hi = _range(cfg)
        hi = min(hi, _last_trainable(cfg) - s.sde_window_size + 1)
        if hi <= lo:
            raise FlowcoachError(
                f"an SDE window of {s.sde_window_size} steps does not fit in steps [{lo}, {hi}) of {s.num_steps}; "
                "lower sde_window_size or widen sde_window_range")
        start = window_start(step, s.window_schedule, lo, hi, s.window_every, s.window_stride, s.window_decay, generator)
        end = start + s.sde_window_size
        mask[:, start:end] = True
        post = s.post_window_solver or s.ode_solver
        if s.post_window_steps < 1.0:  # MixGRPO-Flash: fewer, higher-order ODE steps after the window
            grid = compressed_tail(grid, end, s.post_window_steps)
            mask = mask[:, :grid.shape[0] - 1]
        solvers = [s.ode_solver] * end + [post] * (grid.shape[0] - 1 - end)
        return RolloutPlan(grid, mask, tuple(solvers), shared_root=s.same_noise_in_group)

    def pairs_per_sample(self, cfg):
        return cfg.sampler.sde_window_size if cfg.sampler.sde_window_size > 0 else _last_trainable(cfg)


@STRUCTURES.register("branch")
class Branch(Structure):
    def plan(self, cfg, step, n_groups, generator):
        s = cfg.sampler
        lo, hi = _range(cfg)
        if hi <= lo:
            raise FlowcoachError(f"no step to branch at in sde_window_range [{lo}, {hi})")
        at = torch.randint(lo, hi, (n_groups,), generator=generator).repeat_interleave(cfg.group_size)
        mask = torch.zeros(n_groups * cfg.group_size, s.num_steps, dtype=torch.bool)
        mask[torch.arange(len(at)), at] = True
        return RolloutPlan(time_grid(s.num_steps, s.shift), mask, (s.ode_solver,) * s.num_steps, shared_root=True)

    def pairs_per_sample(self, cfg):
        return 1


@STRUCTURES.register("tree")
class Tree(Structure):
    interact = False

    def check(self, cfg) -> tuple[list[int], int]:
        s = cfg.sampler
        steps, k = sorted(set(s.tree_branch_steps)), s.tree_branching
        if k < 2 or not steps:
            raise FlowcoachError("a tree needs sampler.tree_branching >= 2 and at least one sampler.tree_branch_steps")
        if k ** len(steps) != cfg.group_size:
            raise FlowcoachError(
                f"a tree with {len(steps)} branch steps of {k} children has {k ** len(steps)} leaves, but group_size is "
                f"{cfg.group_size}; set --group-size {k ** len(steps)} or change sampler.tree_branch_steps")
        if steps[0] < 0 or steps[-1] >= _last_trainable(cfg):
            raise FlowcoachError(f"tree branch steps {steps} must lie in [0, {_last_trainable(cfg)})")
        return steps, k

    def plan(self, cfg, step, n_groups, generator):
        s = cfg.sampler
        steps, k = self.check(cfg)
        rows, G = n_groups * cfg.group_size, cfg.group_size
        leaf = torch.arange(rows) % G
        mask = torch.zeros(rows, s.num_steps, dtype=torch.bool)
        keys = torch.zeros(rows, s.num_steps, dtype=torch.long)
        for depth, j in enumerate(steps):
            mask[:, j] = True
            keys[:, j] = leaf // (G // k ** (depth + 1))  # the leaf's path down to this depth
        return RolloutPlan(time_grid(s.num_steps, s.shift), mask, (s.ode_solver,) * s.num_steps, shared_root=True,
                           branch_keys=keys)

    def pairs_per_sample(self, cfg):
        steps, k = self.check(cfg)
        return sum(k ** (d + 1) for d in range(len(steps))) / cfg.group_size


@STRUCTURES.register("merged")
class Merged(Structure):
    def blocks(self, cfg) -> list[tuple[int, int]]:
        s = cfg.sampler
        grid = time_grid(s.num_steps, s.shift)
        lo, hi = _range(cfg)
        blocks = merge_blocks(grid, s.law, s.noise_level, s.merge_entropy, _last_trainable(cfg))
        return [b for b in blocks if lo <= b[0] < hi]

    def plan(self, cfg, step, n_groups, generator):
        s = cfg.sampler
        K, G = s.merge_branch_points, cfg.group_size
        if K < 1 or G % K or G // K < 2:
            raise FlowcoachError(f"group_size {G} must split into sampler.merge_branch_points={K} subgroups of >= 2")
        blocks = self.blocks(cfg)
        if len(blocks) < K:
            raise FlowcoachError(f"only {len(blocks)} merged steps to branch at; lower sampler.merge_branch_points "
                                 "or sampler.merge_entropy")
        chosen = [blocks[i] for i in sorted(torch.randperm(len(blocks), generator=generator)[:K].tolist())]
        rows = n_groups * G
        fine = time_grid(s.num_steps, s.shift)
        grid = fine.expand(rows, -1).clone()
        mask = torch.zeros(rows, s.num_steps, dtype=torch.bool)
        sub = (torch.arange(rows) % G) // (G // K)
        for b, (i, m) in enumerate(chosen):
            mine = sub == b
            grid[mine, i + 1:i + m] = fine[i + m]  # one step t_i -> t_{i+m}, then m - 1 of zero length
            mask[mine, i] = True
        adv_groups = torch.arange(rows) // G * K + sub
        return RolloutPlan(grid, mask, (s.ode_solver,) * s.num_steps, shared_root=True, adv_groups=adv_groups)

    def pairs_per_sample(self, cfg):
        return 1


def get_structure(name: str) -> Structure:
    cls = STRUCTURES.get(name)
    return cls() if isinstance(cls, type) else cls
