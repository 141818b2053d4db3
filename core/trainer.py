"""The trainer: one linear loop, run under accelerate.

step: rollout (groups of G per condition) -> rewards -> advantages -> inner epochs over
minibatches of (sample, trained step) pairs -> optimizer steps -> EMA -> log -> checkpoint.

Randomness of step k comes from generators seeded by (seed, k) and, for a group's noise, by the
group too, so a resumed run draws exactly what an uninterrupted one would, and the samples do not
depend on the number of processes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from flowcoach.core.checkpoint import (clean_stale, list_checkpoints, load_base, load_checkpoint, load_old_state,
                                       save_checkpoint)
from flowcoach.core.config import TrainConfig, load_yaml, save_yaml
from flowcoach.core.domain import Domain, get_domain, structure_loss_of
from flowcoach.core.losses import (clipped_ratio_loss, element_credit_loss, flow_times, fm_log_likelihood,
                                   kl_to_reference, nft_loss, nft_optimality, ratio_norm_log_ratio, velocity_kl)
from flowcoach.core.policy import FlowPolicy, ForwardCounter, unwrap
from flowcoach.core.registry import ADVANTAGES, ALGORITHMS, NOISE_LAWS, FlowcoachError, normalize_name
from flowcoach.core.sampling.laws import gaussian_log_prob_elements, law_mean_std
from flowcoach.core.sampling.rollout import Rollout, cond_to, index_cond
from flowcoach.core.sampling.sampler import ode_completions, pair_log_probs, sample, time_grid
from flowcoach.core.sampling.structures import get_structure


# ----------------------------------------------------------------------------- batch arithmetic
@dataclass
class BatchPlan:
    world_size: int
    groups_per_process: int
    samples_per_process: int
    trained_steps_per_sample: int
    pairs_per_process: int
    pairs_per_optimizer_step: int
    grad_accumulation: int
    optimizer_steps_per_rl_step: int
    chunks_per_sample: int = 1
    unit: str = "denoising step"

    def table(self, cfg: TrainConfig) -> str:
        return "\n".join([
            "batch arithmetic:",
            f"  {cfg.groups_per_step} groups/step x G={cfg.group_size} = {cfg.groups_per_step * cfg.group_size} samples/step"
            f" over {self.world_size} process(es) -> {self.samples_per_process} samples/process",
            f"  {self.trained_steps_per_sample:g} trained {self.unit}s/sample -> {self.pairs_per_process} (sample, {self.unit}) pairs/process"
            if self.chunks_per_sample == 1 else
            f"  {self.trained_steps_per_sample:g} trained {self.unit}s/chunk x up to {self.chunks_per_sample} chunks/episode"
            f" -> up to {self.pairs_per_process} (chunk, step) pairs/process",
            f"  {cfg.inner_epochs} inner epoch(s) x {cfg.optimizer_steps_per_epoch} optimizer step(s)/epoch"
            f" = {self.optimizer_steps_per_rl_step} optimizer steps per RL step",
            f"  {self.pairs_per_optimizer_step} pairs/optimizer step/process in micro-batches of {cfg.micro_batch}"
            f" -> gradient accumulation {self.grad_accumulation}",
        ])


def forward_pairs_per_sample(cfg: TrainConfig) -> int:
    """(sample, time) pairs per sample of a forward-process loss."""
    return cfg.loss.fwd_timesteps if cfg.loss.fwd_timesteps > 0 else cfg.sampler.num_steps


def trained_steps_per_sample(cfg: TrainConfig) -> float:
    """Trained pairs per sample: the structure's stochastic steps (a tree's edges shared by its
    leaves count once, so this may be a fraction), or a forward-process loss's pairs."""
    if cfg.loss.family != "ratio":
        return forward_pairs_per_sample(cfg)
    if cfg.sampler.law == "ode" or cfg.sampler.noise_level == 0:
        return 0
    return get_structure(cfg.sampler.structure).pairs_per_sample(cfg)


def plan_batches(cfg: TrainConfig, world_size: int, chunks_per_sample: int = 1) -> BatchPlan:
    """Derive per-process sizes from the global recipe; one-line errors when it does not fit.

    For interact domains a sample is an episode of up to ``chunks_per_sample`` chunks; the pair
    counts are then upper bounds (episodes may end early).
    """
    if cfg.group_size < 2:
        raise FlowcoachError(f"group_size must be >= 2 (a group is its own baseline), got {cfg.group_size}")
    if cfg.groups_per_step < 1:
        raise FlowcoachError(f"groups_per_step must be >= 1, got {cfg.groups_per_step}")
    if cfg.groups_per_step % world_size:
        raise FlowcoachError(
            f"groups_per_step={cfg.groups_per_step} does not split over {world_size} processes; use a multiple of {world_size}"
        )
    for name in ("inner_epochs", "optimizer_steps_per_epoch", "micro_batch", "steps"):
        if getattr(cfg, name) < 1:
            raise FlowcoachError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.sampler.noise_level < 0:
        raise FlowcoachError(f"sampler.noise_level must be >= 0, got {cfg.sampler.noise_level}")
    trained = trained_steps_per_sample(cfg)
    if trained <= 0:
        raise FlowcoachError("no stochastic step to train: set sampler.noise_level > 0 and a law other than 'ode'")
    groups = cfg.groups_per_step // world_size
    samples = groups * cfg.group_size
    pairs = round(samples * trained * chunks_per_sample)
    if cfg.optimizer_steps_per_epoch > pairs:
        raise FlowcoachError(
            f"optimizer_steps_per_epoch={cfg.optimizer_steps_per_epoch} exceeds the {pairs} (sample, step) pairs per process"
        )
    per_opt = math.ceil(pairs / cfg.optimizer_steps_per_epoch)
    return BatchPlan(world_size, groups, samples, trained, pairs, per_opt, math.ceil(per_opt / cfg.micro_batch),
                     cfg.inner_epochs * cfg.optimizer_steps_per_epoch, chunks_per_sample,
                     "denoising step" if cfg.loss.family == "ratio" else "forward time")


def validate(cfg: TrainConfig, domain: Domain | None = None) -> None:
    """Check names and combinations before any work starts, with one-line errors."""
    ALGORITHMS.get(cfg.algo)
    NOISE_LAWS.get(cfg.sampler.law)
    ADVANTAGES.get(cfg.loss.advantage)
    structure = get_structure(cfg.sampler.structure)
    if cfg.sampler.num_steps < 1 or cfg.sampler.eval_num_steps < 1:
        raise FlowcoachError("sampler.num_steps and sampler.eval_num_steps must be >= 1")
    adv = normalize_name(cfg.loss.advantage)
    if adv == "tree" and normalize_name(cfg.sampler.structure) != "tree":
        raise FlowcoachError("tree advantages need the tree rollout structure: --sampler.structure tree")
    if cfg.loss.family != "ratio" and adv in ("tree", "dense"):
        raise FlowcoachError(f"'{adv}' advantages are per denoising step; the forward-process loss "
                             f"'{cfg.loss.family}' takes one advantage per sample (use group or per-reward)")
    if cfg.loss.family == "nft" and cfg.loss.adv_clip <= 0:
        raise FlowcoachError("DiffusionNFT maps advantages to [0, 1] through adv_clip (its A_max): set --loss.adv-clip > 0")
    if cfg.loss.family != "ratio" and cfg.loss.fwd_time == "grid" and forward_pairs_per_sample(cfg) > cfg.sampler.num_steps:
        raise FlowcoachError(f"loss.fwd_timesteps={cfg.loss.fwd_timesteps} exceeds the {cfg.sampler.num_steps} "
                             "sampling times; lower it or use --loss.fwd-time uniform")
    if cfg.loss.fwd_draws < 1:
        raise FlowcoachError("loss.fwd_draws must be >= 1")
    validate_element_credit(cfg, domain)
    from flowcoach.rewards import REWARD_ERRORS

    if cfg.reward_errors not in REWARD_ERRORS:
        raise FlowcoachError(f"reward_errors must be one of {', '.join(REWARD_ERRORS)}, got '{cfg.reward_errors}'")
    for name, least in (("checkpoint_every", 1), ("keep_checkpoints", 0), ("sample_every", 0), ("eval_every", 0),
                        ("eval_samples", 1)):
        if getattr(cfg, name) < least:
            raise FlowcoachError(f"{name} must be >= {least}, got {getattr(cfg, name)}")
    if cfg.loss.anchor_weight > 0 and cfg.loss.anchor_batch < 1:
        raise FlowcoachError(f"loss.anchor_batch must be >= 1 with data anchoring, got {cfg.loss.anchor_batch}")
    if cfg.loss.anchor_structure_weight and not cfg.loss.anchor_weight > 0:
        raise FlowcoachError("loss.anchor_structure_weight weighs a term of data anchoring; set loss.anchor_weight > 0 too")
    if cfg.loss.anchor_logit_std <= 0:
        raise FlowcoachError(f"loss.anchor_logit_std must be > 0, got {cfg.loss.anchor_logit_std}")
    if domain is not None and domain.kind == "interact":
        if not structure.interact:
            raise FlowcoachError(f"the '{cfg.sampler.structure}' structure shares denoising states between the samples "
                                 "of a group; an interact domain's episodes share none (their observations differ "
                                 "after the first chunk): use window, branch or merged")
        if adv == "dense":
            raise FlowcoachError("dense advantages score intermediate denoising states with the reward; an interact "
                                 "domain's reward scores whole episodes: use group advantages")


def validate_element_credit(cfg: TrainConfig, domain: Domain | None) -> None:
    weight = cfg.loss.element_weight
    if weight < 0:
        raise FlowcoachError(f"loss.element_weight must be >= 0, got {weight}")
    if weight == 0:
        return
    adv = normalize_name(cfg.loss.advantage)
    if cfg.loss.family != "ratio":
        raise FlowcoachError(f"per-element credit trains each element's share of the SDE transition log-prob; "
                             f"the '{cfg.loss.family}' loss has none: use a ratio algorithm (flow-grpo, ...) or "
                             "--loss.element-weight 0")
    if adv in ("tree", "dense") or cfg.loss.ratio_norm:
        raise FlowcoachError("per-element credit adds to one advantage per sample and the plain ratio: use group or "
                             "per-reward advantages without --loss.ratio-norm, or --loss.element-weight 0")
    if domain is not None and (domain.kind == "interact"
                               or type(domain).element_rewards is Domain.element_rewards):
        raise FlowcoachError(f"the {domain.name} domain has no per-element rewards (Domain.element_rewards): "
                             "use --loss.element-weight 0")
    if domain is not None and not domain.element_rows_match and not cfg.sampler.same_noise_in_group:
        raise FlowcoachError(f"per-element credit compares each row with the same row of the group's other samples; "
                             f"the {domain.name} domain's rows are the same element only when the group shares its "
                             "noise: add --sampler.same-noise-in-group")


def step_generator(seed: int, step: int, process: int = 0, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + process) * 7 + stream)


# ----------------------------------------------------------------------------- rollout + update
def repeat_cond(cond, times: int):
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: repeat_cond(v, times) for k, v in cond.items()}
    return cond.repeat_interleave(times, dim=0)


def group_noise(cfg: TrainConfig, sample_shape: tuple[int, ...], groups: torch.Tensor, step: int,
                shared: bool | None = None):
    """Initial noise [B, ...] and step noise [B, T, ...] for the samples of ``groups`` (G each).

    Each group draws from its own generator, so a group's samples are the same whatever the number
    of processes it is spread over. ``shared``: one initial noise per group (default:
    sampler.same_noise_in_group).
    """
    shared = cfg.sampler.same_noise_in_group if shared is None else shared
    x1, noise = [], []
    for gid in groups.tolist():
        g = step_generator(cfg.seed, step, stream=10_000 + gid)
        n = 1 if shared else cfg.group_size
        x1.append(torch.randn(n, *sample_shape, generator=g).expand(cfg.group_size, *sample_shape))
        noise.append(torch.randn(cfg.group_size, cfg.sampler.num_steps, *sample_shape, generator=g))
    return torch.cat(x1), torch.cat(noise)


def forward_draws(cfg: TrainConfig, grid: torch.Tensor, sample_shape: tuple[int, ...],
                  generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Times [B, P*N] and noise [B, P*N, ...] of a forward-process loss's pairs, one generator per
    sample: P pairs of N draws each. Grid times are distinct sampling times (not t = 0), shared by
    the N draws of a pair; uniform times are drawn per draw."""
    P, N = forward_pairs_per_sample(cfg), cfg.loss.fwd_draws
    times, noise = [], []
    candidates = grid[:-1].float()
    for g in generators:
        if cfg.loss.fwd_time == "grid":
            pick = torch.randperm(len(candidates), generator=g)[:P].sort().values if P < len(candidates) else torch.arange(P)
            times.append(candidates[pick].repeat_interleave(N))
        else:
            times.append(torch.rand(P * N, generator=g).clamp(1e-3, 1.0))
        noise.append(torch.randn(P * N, *sample_shape, generator=g))
    return torch.stack(times), torch.stack(noise)


def collect_rollout(policy: FlowPolicy, domain: Domain, cfg: TrainConfig, step: int, device,
                    world_size: int = 1, rank: int = 0) -> Rollout:
    """This process's share of step ``step``'s groups: conditions, noise and the rollout plan
    (structure) are drawn from generators of the step (and group), never of the process."""
    s = cfg.sampler
    g = step_generator(cfg.seed, step)
    all_cond = domain.train_conditions(cfg.groups_per_step, g)
    per_process = cfg.groups_per_step // world_size
    plan = get_structure(s.structure).plan(cfg, step, cfg.groups_per_step, g)
    groups = torch.arange(rank * per_process, (rank + 1) * per_process)
    plan = plan.rows(torch.arange(rank * per_process * cfg.group_size, (rank + 1) * per_process * cfg.group_size))
    cond = repeat_cond(index_cond(all_cond, groups), cfg.group_size)
    group_ids = groups.repeat_interleave(cfg.group_size)
    shape = tuple(domain.sample_shape)
    x1, noise = group_noise(cfg, shape, groups, step, shared=s.same_noise_in_group or plan.shared_root)
    rollout = sample(policy.sampling_model(), x1.to(device), plan.timesteps, cond=cond_to(cond, device),
                     law=s.law, noise_level=s.noise_level, stochastic=plan.stochastic, group_ids=group_ids,
                     reduction=s.logprob_reduction, ode_solver=plan.solvers, noise=noise[:, :plan.num_steps],
                     node_ids=group_ids if plan.shared_root else None, branch_keys=plan.branch_keys,
                     record_means=cfg.loss.ratio_norm,
                     record_x0=normalize_name(cfg.loss.advantage) == "dense" and cfg.loss.dense_estimate == "tweedie")
    rollout.adv_groups = plan.adv_groups.to(device) if plan.adv_groups is not None else None
    if cfg.loss.family != "ratio":
        gens = [step_generator(cfg.seed, step, stream=30_000 + int(gid) * cfg.group_size + k)
                for gid in groups.tolist() for k in range(cfg.group_size)]
        rollout.fwd_t, rollout.fwd_noise = (v.to(device) for v in forward_draws(cfg, time_grid(s.num_steps, s.shift),
                                                                              shape, gens))
    return rollout


def pair_advantages(advantages: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """The advantage of each pair: per sample [B] or per (sample, step) [B, T]."""
    i, j = pairs[:, 0].cpu(), pairs[:, 1].cpu()
    return advantages[i] if advantages.dim() == 1 else advantages[i, j]


def _forward_batch(rollout: Rollout, pairs: torch.Tensor, N: int):
    """The N re-noised draws of each (sample, pair index) pair: rows, x_t, t, target eps - x0, x0, cond."""
    i, p = pairs[:, 0], pairs[:, 1]
    k = (p[:, None] * N + torch.arange(N, device=p.device)).reshape(-1)
    rows = i.repeat_interleave(N)
    x0 = rollout.samples[rows].float()
    t = rollout.fwd_t[rows, k].float()
    eps = rollout.fwd_noise[rows, k].float()
    tb = t.reshape(-1, *([1] * (x0.dim() - 1)))
    return rows, (1 - tb) * x0 + tb * eps, t, eps - x0, x0, index_cond(rollout.cond, rows)


def forward_log_probs(velocity, rollout: Rollout, pairs: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """[N] the flow-matching log-likelihood surrogate of each pair (mean of its draws): AWM, FPO."""
    N = cfg.loss.fwd_draws
    _, x_t, t, target, _, cond = _forward_batch(rollout, pairs, N)
    v = velocity(x_t, t, cond)
    logp = fm_log_likelihood(v, target, t, cfg.sampler.logprob_reduction, cfg.loss.awm_weighting)
    return logp.reshape(len(pairs), N).mean(dim=1)


class ElementCredit(NamedTuple):
    """Per-element credit of one RL step (``--loss.element-weight``): advantages [B, E]."""
    advantages: torch.Tensor


def pair_losses(policy: FlowPolicy, rollout: Rollout, pairs: torch.Tensor, advantages: torch.Tensor,
                cfg: TrainConfig, old_log_probs: torch.Tensor | None = None,
                gate: torch.Tensor | None = None, elements: ElementCredit | None = None) -> tuple[torch.Tensor, dict]:
    """Per-pair loss [N] (policy + beta KL) for (sample, step) pairs, with diagnostics.

    old_log_probs [B, T] defaults to the rollout's own; ``gate`` [B] limits the KL to some samples.
    With ``elements`` each element's share of the log-prob is trained with its own advantage under
    the step's ratio (``element_credit_loss``). Forward-process families read (sample, pair index)
    pairs instead (see ``_forward_batch``).
    """
    if cfg.loss.family != "ratio":
        return forward_pair_losses(policy, rollout, pairs, advantages, cfg, old_log_probs, gate)
    i, j = pairs[:, 0], pairs[:, 1]
    log_prob, mean, std = pair_log_probs(policy.velocity, rollout, pairs)
    clip_low, clip_high = cfg.resolved_clip()
    old = (rollout.log_probs if old_log_probs is None else old_log_probs)[i, j]
    if elements is not None:
        shares = gaussian_log_prob_elements(rollout.states[i, j + 1], mean, std, rollout.reduction)
        loss, info = element_credit_loss(shares, log_prob - old, elements.advantages[i.cpu()].to(shares.device),
                                         clip_low, clip_high)
    else:
        adv = pair_advantages(advantages, pairs).to(log_prob.device)
        log_ratio = None
        if cfg.loss.ratio_norm:
            log_ratio = ratio_norm_log_ratio(log_prob, old, mean, rollout.means[i, j], std, rollout.reduction)
        loss, info = clipped_ratio_loss(log_prob, old, adv, clip_low, clip_high, log_ratio=log_ratio)
    t, t_next = rollout.step_times(i, j)
    weight = step_weights(rollout, pairs, cfg)
    if weight is not None:
        loss = loss * weight
    if cfg.loss.kl_beta > 0:
        x, cond = rollout.states[i, j], index_cond(rollout.cond, i)
        ref_mean, _ = law_mean_std(rollout.law, x, policy.reference_velocity(x, t, cond).float(), t, t_next,
                                   rollout.noise_level)
        kl = kl_to_reference(mean, ref_mean, std, t_next - t, rollout.reduction, cfg.loss.kl_with_dt)
        if gate is not None:
            kl = kl * gate.to(kl.device)[i].float()
        loss = loss + cfg.loss.kl_beta * kl
        info["kl"] = kl.detach()
    return loss, info


def step_weights(rollout: Rollout, pairs: torch.Tensor, cfg: TrainConfig) -> torch.Tensor | None:
    """Per-pair loss weights, each with mean 1 over the rollout's stochastic steps: TempFlow's
    noise-aware weight std / mean(std), and GRPO-Guard's 1/|dt| reweighting (with ratio_norm)."""
    i, j = pairs[:, 0], pairs[:, 1]
    weight = None
    stoch = rollout.stochastic
    if cfg.loss.step_weight == "noise":
        weight = rollout.stds[i, j] / rollout.stds[stoch].mean()
    if cfg.loss.ratio_norm:
        t_all = rollout.timesteps if rollout.timesteps.dim() == 2 else rollout.timesteps.expand(len(stoch), -1)
        dt_all = (t_all[:, :-1] - t_all[:, 1:]).abs()
        t, t_next = rollout.step_times(i, j)
        inv = (1.0 / (t - t_next).abs()) / (1.0 / dt_all[stoch]).mean()
        weight = inv if weight is None else weight * inv
    return weight


def forward_pair_losses(policy: FlowPolicy, rollout: Rollout, pairs: torch.Tensor, advantages: torch.Tensor,
                        cfg: TrainConfig, old_log_probs: torch.Tensor | None, gate: torch.Tensor | None):
    """Losses of the forward-process families on re-noised rollout samples (any sampler made them).

    awm / fpo: the clipped ratio of flow-matching log-likelihood surrogates, exp(logp - logp_old)
    (old_log_probs [B, P]; None = on-policy, the current values detached: ratio exactly 1).
    nft: DiffusionNFT's implicit positive/negative policies around the old model.
    """
    i, p = pairs[:, 0], pairs[:, 1]
    adv = pair_advantages(advantages, pairs).to(rollout.states.device)
    N = cfg.loss.fwd_draws
    rows, x_t, t, target, x0, cond = _forward_batch(rollout, pairs, N)
    v = policy.velocity(x_t, t, cond)
    info = {}
    if cfg.loss.family == "nft":
        r = nft_optimality(adv, cfg.loss.adv_clip).repeat_interleave(N)
        v_old = policy.old_velocity(x_t, t, cond)
        loss = nft_loss(v, v_old, x_t, x0, t, r, cfg.loss.nft_beta, cfg.loss.adv_clip).reshape(len(pairs), N).mean(1)
    else:
        logp = fm_log_likelihood(v, target, t, cfg.sampler.logprob_reduction, cfg.loss.awm_weighting)
        logp = logp.reshape(len(pairs), N).mean(dim=1)
        old = logp.detach() if old_log_probs is None else old_log_probs[i, p].to(logp.device)
        clip_low, clip_high = cfg.resolved_clip()
        loss, info = clipped_ratio_loss(logp, old, adv, clip_low, clip_high)
    if cfg.loss.kl_beta > 0:
        kl = velocity_kl(v, policy.reference_velocity(x_t, t, cond), cfg.sampler.logprob_reduction)
        kl = kl.reshape(len(pairs), N).mean(1)
        if gate is not None:
            kl = kl * gate.to(kl.device)[i].float()
        loss = loss + cfg.loss.kl_beta * kl
        info["kl"] = kl.detach()
    return loss, info


@torch.no_grad()
def dense_step_rewards(policy: FlowPolicy, domain: Domain, rollout: Rollout, reward_fn, cond_cpu, cfg: TrainConfig,
                       final_rewards: torch.Tensor) -> torch.Tensor:
    """[B, T+1] rewards of the clean estimates of every state (DenseGRPO): the ODE completion of x_j
    (``dense_estimate`` ode) or its one-step Tweedie estimate x_j - t_j v (tweedie). r_T is the
    sample's own reward; a state after which every step is deterministic completes to the sample
    itself (ODE), so its reward is reused rather than recomputed."""
    B, T = rollout.stochastic.shape
    out = torch.zeros(B, T + 1)
    out[:, T] = final_rewards.float().cpu()
    last_stochastic = int(torch.nonzero(rollout.stochastic.any(dim=0)).max()) if rollout.stochastic.any() else -1
    needed = [j for j in range(T) if j <= last_stochastic]
    estimates = {}
    if cfg.loss.dense_estimate == "tweedie":
        estimates = {j: rollout.x0_hats[:, j] for j in needed}
    else:
        estimates = ode_completions(policy.sampling_model(), rollout, needed, cfg.sampler.ode_solver)
    for j in range(T):
        if j in estimates:
            scores, _ = reward_fn(domain.decode(estimates[j].cpu()), cond_cpu)
            out[:, j] = scores.float()
        else:
            out[:, j] = out[:, T]
    return out


# ----------------------------------------------------------------------------- evaluation
def sde_steps(grid: torch.Tensor, t_min: float, t_max: float) -> torch.Tensor:
    """[T] bool: the steps of ``grid`` [T + 1] that start at t in (t_min, t_max] (a grid's t is a
    float sum, so both ends are read with a little slack)."""
    start = grid[:-1]
    return (start > t_min + 1e-6) & (start <= t_max + 1e-6)


@torch.no_grad()
def generate(model, domain: Domain, cond, num_steps: int, shift: float = 1.0, seed: int = 0,
             solver: str = "euler", device="cpu", sde_noise_level: float = 0.0, sde_t_max: float = 1.0,
             sde_t_min: float = 0.0) -> torch.Tensor:
    """Samples for the given conditions (the evaluation sampler): the deterministic ODE or, with
    ``sde_noise_level`` > 0, the flow SDE at that level on the steps that start at t in
    (sde_t_min, sde_t_max] and the ODE elsewhere. Its noise comes from the same seeded generator as
    the initial noise, so an evaluation repeats."""
    n = cond.shape[0] if isinstance(cond, torch.Tensor) else len(next(iter(cond.values())))
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn((n, *domain.sample_shape), generator=g).to(device)
    grid = time_grid(num_steps, shift)
    stochastic = sde_steps(grid, sde_t_min, sde_t_max)[None].expand(n, -1)
    rollout = sample(unwrap(model), x1, grid, cond=cond_to(cond, device),
                     law="flow-sde" if sde_noise_level > 0 else "ode", noise_level=sde_noise_level,
                     stochastic=stochastic, generator=g, ode_solver=solver)
    return rollout.samples


def write_eval_report(out: Path, metrics: dict, title: str, details: str) -> None:
    """eval/metrics.json and a Markdown report.md of the held-out metrics."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    lines = [f"# {title}", "", details, "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, float)]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def evaluate_model(model, domain: Domain, num_samples: int, num_steps: int, shift: float = 1.0,
                   rewards: dict | None = None, seed: int = 12345, device="cpu",
                   render: int = 0, reward_errors: str = "raise", cond=None,
                   sde: tuple[float, float, float] | None = None) -> tuple[dict, list, torch.Tensor]:
    """Held-out evaluator metrics plus the training reward on eval conditions, with ODE samples.

    ``cond``: other conditions to sample for (e.g. training ones, to choose a checkpoint without
    the held-out set); default ``domain.eval_conditions(num_samples)``. ``sde``: (noise level,
    t_max, t_min) to sample with the flow SDE on the steps that start in (t_min, t_max] (``generate``).
    Interact domains: ``render`` episodes are replayed with frames for the saved video.
    """
    from flowcoach.rewards import build_reward

    cond = domain.eval_conditions(num_samples) if cond is None else cond
    reward_fn = build_reward(rewards or domain.default_rewards(), on_error=reward_errors)
    extra = {}
    if domain.kind == "interact":
        from flowcoach.core.interact import evaluate_episodes

        objects = evaluate_episodes(unwrap(model), domain, cond, num_steps, shift, split=domain.eval_splits[0], device=device)
        for split in domain.eval_splits[1:]:  # e.g. out-of-distribution placements
            episodes = evaluate_episodes(unwrap(model), domain, cond, num_steps, shift, split=split, device=device)
            extra.update({f"{split}/{k}": float(v) for k, v in domain.evaluate(episodes, cond).items()})
        extra["denoising_steps_per_action"] = num_steps / domain.chunk_size
        if render:  # a few deterministic episodes again, with frames, for the saved video
            try:
                shown = evaluate_episodes(unwrap(model), domain, cond[:render], num_steps, shift,
                                          split=domain.eval_splits[0], render=True, device=device)
                objects = shown + objects[render:]
            except Exception as e:  # noqa: BLE001 - no renderer (no EGL/OSMesa) must not end a run
                print(f"warning: rendering failed ({type(e).__name__}: {e}); no rollout video")
    else:
        noise_level, t_max, t_min = sde or (0.0, 1.0, 0.0)
        x = generate(model, domain, cond, num_steps, shift, seed, device=device, sde_noise_level=noise_level,
                     sde_t_max=t_max, sde_t_min=t_min)
        objects = domain.decode(x.cpu())
    metrics = {k: float(v) for k, v in domain.evaluate(objects, cond).items()}
    metrics.update(extra)
    scores, _ = reward_fn(objects, cond)
    metrics["reward_mean"] = float(scores[torch.isfinite(scores)].mean()) if torch.isfinite(scores).any() else float("nan")
    return metrics, objects, scores


# ----------------------------------------------------------------------------- run directory
def run_root_name(cfg: TrainConfig, domain_name: str) -> str:
    return f"{domain_name}__{normalize_name(cfg.algo)}__{cfg.seed}"


def find_resume_dir(cfg: TrainConfig, domain_name: str) -> Path:
    if cfg.resume == "latest":
        candidates = sorted(p for p in Path(cfg.output_dir).glob(run_root_name(cfg, domain_name) + "__*")
                            if list_checkpoints(p))
        if not candidates:
            raise FlowcoachError(
                f"--resume latest: no run of {run_root_name(cfg, domain_name)} with a checkpoint under '{cfg.output_dir}'"
            )
        return candidates[-1]
    path = Path(cfg.resume)
    if (path / "state.json").exists() or (path.is_dir() and path.parent.name == "checkpoints"):  # a checkpoint folder
        return path.parent.parent
    if not (path / "config.yaml").exists():
        raise FlowcoachError(f"--resume '{cfg.resume}' is neither 'latest', a run folder nor a checkpoint folder")
    return path


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a line a kill cut short (it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """metrics.jsonl (one object per step) and TensorBoard, on the main process."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step and self.path.exists():  # drop steps logged after the checkpoint: they are redone
            kept = [line for line in self.path.read_text().splitlines() if _logged_step(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, domain: Domain | None = None, console=None) -> Path:
    """Run RL on a domain; returns the run folder."""
    from accelerate import Accelerator

    from flowcoach.rewards import build_reward, parse_reward_spec

    domain = domain or get_domain(cfg.domain)
    resume_dir = find_resume_dir(cfg, domain.name) if cfg.resume else None
    if resume_dir is not None:  # the run's own config wins, except for how long to run
        steps, resume, budget = cfg.steps, cfg.resume, cfg.time_budget_s
        cfg = load_yaml(TrainConfig, resume_dir / "config.yaml")
        cfg.steps, cfg.resume, cfg.time_budget_s = steps, resume, budget
        newest = list_checkpoints(resume_dir)[-1:]
        if newest:  # before building anything: a run of another domain is refused at once
            from flowcoach.core.checkpoint import read_state

            read_state(newest[0], domain.name, verify=False)
    validate(cfg, domain)

    accelerator = Accelerator(cpu=use_cpu(cfg.device))
    plan = plan_batches(cfg, accelerator.num_processes, getattr(domain, "max_chunks", 1) if domain.kind == "interact" else 1)
    reward_spec = parse_reward_spec(cfg.rewards) if cfg.rewards else domain.default_rewards()
    reward_fn = build_reward(reward_spec, on_error=cfg.reward_errors)
    say = (console.print if console is not None else print) if accelerator.is_main_process else (lambda *a, **k: None)

    model, base_record = load_base(domain, cfg.base)
    policy = FlowPolicy(model, need_reference=cfg.loss.kl_beta > 0, ema_decay=cfg.optim.ema_decay,
                        need_old=cfg.loss.family == "nft")
    params = policy.trainable_parameters()
    if not params:
        raise FlowcoachError("the model has no trainable parameter")
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    policy.model, optimizer = accelerator.prepare(model, optimizer)
    for extra in (policy.ref_model, policy.old_model):
        if extra is not None:
            extra.to(accelerator.device)
    counter = ForwardCounter().attach(policy.modules())
    policy.counter = counter
    anchor = None
    if cfg.loss.anchor_weight > 0:
        x0, anchor_cond = domain.data("train")
        structure = structure_loss_of(domain, "loss.anchor_structure_weight") if cfg.loss.anchor_structure_weight else None
        anchor = AnchorData(x0.float(), anchor_cond, domain.couple, structure)

    # skipped_*: RL steps with non-finite rewards (no update) and optimizer steps with a non-finite loss,
    # over the whole run (checkpoints keep the totals, so a resumed run counts on)
    start, totals = 0, {"nfe": 0, "cpu_s": 0.0, "wall_s": 0.0, "skipped_steps": 0, "skipped_optimizer_steps": 0}
    if resume_dir is not None:
        run_dir = resume_dir
        explicit = Path(cfg.resume) if Path(cfg.resume).parent.name == "checkpoints" else None
        incomplete: list = []
        checkpoints = list_checkpoints(run_dir, incomplete)
        if explicit is None and not checkpoints:
            raise FlowcoachError(f"run '{run_dir}' has no complete checkpoint to resume from")
        ckpt = explicit or checkpoints[-1]
        for path, problem in incomplete:  # the newest complete one is used; say what was passed over
            if explicit is None and int(path.name.split("-")[1]) > int(ckpt.name.split("-")[1]):
                say(f"warning: skipping {path.name} ({problem}); resuming from {ckpt.name}")
        state = load_checkpoint(ckpt, unwrap(policy.model), optimizer, policy.ema, domain_name=domain.name)
        start = state["step"]
        if cfg.steps < start:
            raise FlowcoachError(f"{ckpt.name} is at step {start}; --steps {cfg.steps} is behind it (give --steps >= {start})")
        if accelerator.is_main_process:
            clean_stale(run_dir)  # what a save that was killed left behind
        totals.update(state.get("totals", {}))
        if policy.old_model is not None:
            old = load_old_state(ckpt)
            if old is None:
                raise FlowcoachError(f"checkpoint '{ckpt}' has no old policy (old.safetensors) to resume DiffusionNFT from")
            policy.load_old_state(old)
        say(f"resuming {run_dir} from {ckpt.name} (step {start})")
        if accelerator.is_main_process:  # the run's config now says how far it is meant to go
            save_yaml(cfg, run_dir / "config.yaml")
    else:
        from accelerate.utils import broadcast_object_list

        stamp = [datetime.now().strftime("%Y%m%d-%H%M%S")]
        broadcast_object_list(stamp)  # every process must name the same folder
        run_dir = Path(cfg.output_dir) / f"{run_root_name(cfg, domain.name)}__{stamp[0]}"
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=False)
            save_yaml(cfg, run_dir / "config.yaml")
    say(plan.table(cfg))
    say(f"run folder: {run_dir}")
    log = MetricsLog(run_dir, accelerator.is_main_process, cfg.tensorboard, start)
    rank = accelerator.process_index

    progress = _progress(console, accelerator.is_main_process)
    task = progress.add_task(f"{domain.name} {cfg.algo}", total=cfg.steps, completed=start) if progress else None
    if progress:
        progress.start()
    last_eval_cpu = totals["cpu_s"]
    try:
        for step in range(start, cfg.steps):
            cpu0, wall0 = time.process_time(), time.perf_counter()
            with counter.counting("train"):
                metrics = rl_step(policy, optimizer, accelerator, domain, cfg, plan, reward_fn, step, rank, run_dir, anchor)
            step_nfe = counter.counts.pop("train", 0)
            totals["nfe"] += int(accelerator.reduce(torch.tensor([step_nfe], device=accelerator.device), "sum").item())
            totals["cpu_s"] += time.process_time() - cpu0
            totals["wall_s"] += time.perf_counter() - wall0
            totals["skipped_steps"] += int(metrics.get("skipped/nonfinite_reward", 0) > 0)
            totals["skipped_optimizer_steps"] += int(metrics.get("skipped/nonfinite_loss", 0))
            metrics.update({"nfe/step": step_nfe, "nfe/total": totals["nfe"], "time/train_cpu_s": totals["cpu_s"],
                            "time/train_wall_s": totals["wall_s"], "skipped/steps_total": totals["skipped_steps"],
                            "skipped/optimizer_steps_total": totals["skipped_optimizer_steps"]})
            out_of_time = _all_agree(accelerator, cfg.time_budget_s > 0 and totals["cpu_s"] >= cfg.time_budget_s)
            last = step + 1 == cfg.steps or out_of_time
            timed_eval = _all_agree(accelerator, cfg.eval_every_s > 0 and totals["cpu_s"] - last_eval_cpu >= cfg.eval_every_s)
            if not last and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or timed_eval):
                metrics.update(_evaluate(policy, domain, cfg, reward_spec, accelerator, run_dir, step + 1, save=False))
                last_eval_cpu = totals["cpu_s"]
            if last:
                metrics.update(_evaluate(policy, domain, cfg, reward_spec, accelerator, run_dir, step + 1, save=True))
            log.log(step + 1, metrics)
            if accelerator.is_main_process and (last or (step + 1) % cfg.checkpoint_every == 0):
                save_checkpoint(run_dir, step + 1, unwrap(policy.model), optimizer, policy.ema,
                                {"seed": cfg.seed, "domain": domain.name, "algo": cfg.algo, "totals": totals},
                                cfg.keep_checkpoints, policy.old_state() if policy.old_model is not None else None)
            accelerator.wait_for_everyone()
            if progress:
                progress.update(task, advance=1, description=f"{domain.name} {cfg.algo} reward {metrics['reward/mean']:.3f}")
            if out_of_time:
                say(f"time budget of {cfg.time_budget_s:g} CPU s spent after {step + 1} steps")
                break
        if totals["skipped_steps"] or totals["skipped_optimizer_steps"]:
            say(f"warning: {totals['skipped_steps']} RL step(s) made no update (non-finite rewards) and "
                f"{totals['skipped_optimizer_steps']} optimizer step(s) were skipped (non-finite loss); "
                f"metrics.jsonl has them per step under skipped/")
    finally:
        counter.detach()
        if progress:
            progress.stop()
        log.close()
    return run_dir


def use_cpu(device: str) -> bool:
    """--device cpu, or auto in a multi-process launch without CUDA. (Under `accelerate launch`, a
    config made for GPUs would otherwise leave each CPU process in a world of its own: accelerate
    sets up no process group when it finds no GPU and is not told cpu=True.)"""
    import os

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return device == "cpu" or (device == "auto" and launched and not torch.cuda.is_available())


def _all_agree(accelerator, flag: bool) -> bool:
    """The main process's decision, taken by every process (CPU clocks differ between processes)."""
    if accelerator.num_processes == 1:
        return flag
    from accelerate.utils import broadcast_object_list

    box = [flag]
    broadcast_object_list(box)
    return bool(box[0])


def _progress(console, main: bool):
    if not main:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def rl_step(policy, optimizer, accelerator, domain, cfg: TrainConfig, plan: BatchPlan, reward_fn, step: int,
            rank: int, run_dir: Path, anchor=None) -> dict:
    """One RL step; returns its metrics. ``anchor`` = (x0, cond) of the domain's data for data anchoring."""
    device = accelerator.device
    t0 = time.perf_counter()
    if domain.kind == "interact":  # objects are episodes; each chunk of an episode is a sample
        from flowcoach.core.interact import collect_episodes

        rollout, sample_owner, objects, cond_cpu = collect_episodes(policy, domain, cfg, step, device,
                                                                    plan.world_size, rank)
        rollout = rollout.to(device)
        object_groups = torch.arange(rank * plan.groups_per_process,
                                     (rank + 1) * plan.groups_per_process).repeat_interleave(cfg.group_size)
    else:
        rollout = collect_rollout(policy, domain, cfg, step, device, plan.world_size, rank)
        sample_owner, object_groups = None, rollout.group_ids.cpu()
        cond_cpu = cond_to(rollout.cond, "cpu")
        objects = domain.decode(rollout.samples.cpu())
    t1 = time.perf_counter()
    rewards, reward_info = reward_fn(objects, cond_cpu)
    components = reward_info.pop("components")
    t2 = time.perf_counter()

    all_rewards = accelerator.gather(rewards.to(device)).cpu()
    all_groups = accelerator.gather(object_groups.to(device)).cpu()
    all_components = accelerator.gather(components.to(device)).cpu()
    metrics = {"reward/mean": float(all_rewards[torch.isfinite(all_rewards)].mean()) if torch.isfinite(all_rewards).any() else float("nan"),
               "reward/std": float(all_rewards[torch.isfinite(all_rewards)].std()) if torch.isfinite(all_rewards).sum() > 1 else 0.0}
    for k, name in enumerate(reward_fn.names):
        metrics[f"reward/{name}"] = float(all_components[:, k].nanmean())
    for k, v in reward_info.items():
        if isinstance(v, (int, float)):
            metrics[f"reward/{k}"] = float(v)

    if cfg.sample_every and accelerator.is_main_process and (step + 1) % cfg.sample_every == 0:
        domain.save(objects, rewards, run_dir / "samples" / f"step-{step + 1}")

    bad = ~torch.isfinite(all_rewards)
    if bad.any():
        bad_idx = torch.nonzero(bad).flatten().tolist()
        print(f"warning: step {step + 1}: non-finite reward for samples {bad_idx[:10]}; step skipped")
        metrics.update({"skipped/nonfinite_reward": int(bad.sum()), "skipped/nonfinite_loss": 0,
                        "time/sample_s": t1 - t0, "time/reward_s": t2 - t1})
        return metrics

    mine = slice(rank * plan.samples_per_process, (rank + 1) * plan.samples_per_process)
    advantages, keep, gate, adv_info = step_advantages(policy, domain, cfg, rollout, sample_owner, reward_fn,
                                                       cond_cpu, rewards, all_rewards, all_components, all_groups,
                                                       accelerator, mine)
    metrics.update(adv_info)
    elements = None
    if cfg.loss.element_weight > 0:
        from flowcoach.core.advantages import element_advantages

        element_rewards = domain.element_rewards(objects, cond_cpu)
        if element_rewards is None or tuple(element_rewards.shape) != (rollout.batch_size, rollout.samples.shape[1]):
            raise FlowcoachError(f"{domain.name}.element_rewards must return [B, E] = "
                                 f"{[rollout.batch_size, rollout.samples.shape[1]]} (one reward per element row)")
        element_adv, _, signal, element_info = element_advantages(
            advantages, element_rewards, rollout.group_ids, cfg.loss.element_weight, cfg.loss.std_scope,
            cfg.loss.adv_clip)
        elements = ElementCredit(element_adv)
        keep = keep | signal  # a group with equal rewards may still differ atom by atom
        metrics.update(element_info)
    t_adv = time.perf_counter()

    all_pairs = rollout.trained_pairs().cpu() if cfg.loss.family == "ratio" else forward_pairs(rollout, cfg)
    kept = keep[all_pairs[:, 0]] if keep.dim() == 1 else keep[all_pairs[:, 0], all_pairs[:, 1]]
    pairs = all_pairs[kept]
    stats = {"ratio": [], "clipped": [], "approx_kl": [], "kl": [], "grad_norm": [], "loss": []}
    skipped_nonfinite = 0
    old_log_probs = rollout.log_probs if cfg.loss.family == "ratio" else None
    for epoch in range(cfg.inner_epochs):
        order = pairs[torch.randperm(len(pairs), generator=step_generator(cfg.seed, step, rank, stream=1 + epoch))]
        chunks = order.tensor_split(cfg.optimizer_steps_per_epoch)  # always the same count on every process
        if epoch == 0 and len(order) and cfg.loss.family in ("awm", "fpo") and plan.optimizer_steps_per_rl_step > 1:
            old_log_probs = recompute_log_probs(policy, rollout, chunks, cfg.micro_batch, device, cfg)
        elif epoch == 0 and cfg.recompute_old_log_probs and len(order) and cfg.loss.family == "ratio":
            old_log_probs = recompute_log_probs(policy, rollout, chunks, cfg.micro_batch, device, cfg)
        for k, chunk in enumerate(chunks):
            anchor_part = anchor_batch(anchor, cfg, step, epoch * cfg.optimizer_steps_per_epoch + k,
                                       accelerator.num_processes, rank) if anchor is not None else None
            grad_norm = optimizer_step_on(chunk, all_pairs[:1], policy, optimizer, accelerator, rollout, advantages,
                                          old_log_probs, cfg, stats, gate=gate, anchor=anchor_part, elements=elements)
            if grad_norm is None:
                continue
            if not math.isfinite(grad_norm):
                skipped_nonfinite += 1
                continue
            stats["grad_norm"].append(grad_norm)
    if policy.old_model is not None:  # DiffusionNFT: the old policy follows slowly
        policy.update_old(min(cfg.loss.nft_old_rate * (step + 1), cfg.loss.nft_old_max))
    t3 = time.perf_counter()

    def cat_mean(values):
        return float(torch.cat(values).float().mean()) if values else 0.0

    metrics.update({
        "policy/ratio_mean": cat_mean(stats["ratio"]),
        "policy/ratio_std": float(torch.cat(stats["ratio"]).std()) if stats["ratio"] and len(torch.cat(stats["ratio"])) > 1 else 0.0,
        "policy/clipfrac": cat_mean(stats["clipped"]),
        "policy/approx_kl": cat_mean(stats["approx_kl"]),
        "policy/loss": sum(stats["loss"]) / max(len(stats["loss"]), 1),
        "grad_norm": sum(stats["grad_norm"]) / max(len(stats["grad_norm"]), 1),
        "train/pairs": len(pairs),
        "skipped/nonfinite_loss": skipped_nonfinite,
        "skipped/nonfinite_reward": 0,
        "time/sample_s": t1 - t0, "time/reward_s": t2 - t1 + (t_adv - t2), "time/train_s": t3 - t_adv,
    })
    if stats["kl"]:
        metrics["kl/ref"] = cat_mean(stats["kl"])
    if stats.get("anchor"):  # the flow-matching loss on real data: watch it to see anchoring hold
        metrics["loss/anchor"] = sum(stats["anchor"]) / len(stats["anchor"])
    if stats.get("anchor_structure"):
        metrics["loss/anchor_structure"] = sum(stats["anchor_structure"]) / len(stats["anchor_structure"])
    return metrics


def forward_pairs(rollout: Rollout, cfg: TrainConfig) -> torch.Tensor:
    """[B * P, 2] (sample, pair index) pairs of a forward-process loss."""
    B, P = rollout.batch_size, forward_pairs_per_sample(cfg)
    return torch.stack([torch.arange(B).repeat_interleave(P), torch.arange(P).repeat(B)], dim=1)


def sample_features(rollout: Rollout, sample_owner: torch.Tensor | None, n_objects: int) -> torch.Tensor:
    """[n_objects, F] what diversity is measured on: the flattened sample, or an episode's first chunk."""
    flat = rollout.samples.reshape(rollout.batch_size, -1).float().cpu()
    if sample_owner is None:
        return flat
    owner = sample_owner.cpu()
    first = torch.stack([torch.nonzero(owner == e).flatten()[0] for e in range(n_objects)])
    return flat[first]


def step_advantages(policy, domain, cfg: TrainConfig, rollout: Rollout, sample_owner, reward_fn, cond_cpu,
                    rewards, all_rewards, all_components, all_groups, accelerator, mine: slice):
    """Advantages of this process's samples (per sample [B] or per pair [B, T]), their keep mask,
    the KL gate (or None) and metrics. Reward transforms (win rate, diversity bonus) and the
    estimator work on the rewards of all processes where they need them; tree and dense
    advantages only need this process's groups, which are whole."""
    from flowcoach.rewards.diversity import cluster_bonus, diversity_scaled_advantages, min_cosine_distance
    from flowcoach.rewards.winrate import win_rates

    device = accelerator.device
    loss = cfg.loss
    name = normalize_name(loss.advantage)
    info = {}
    scores = all_rewards
    if loss.win_rate:
        scores = win_rates(all_components, reward_fn.weights, all_groups, loss.win_rate_tol)
        info["reward/win_rate_std"] = float(scores.std())
    features = None
    if loss.diversity_bonus > 0 or loss.diversity_advantage:
        local = sample_features(rollout, sample_owner, len(rewards))
        features = accelerator.gather(local.to(device)).cpu()
    if loss.diversity_bonus > 0:
        bonus = cluster_bonus(features, all_groups, loss.diversity_clusters)
        scores = scores + loss.diversity_bonus * bonus
        info["reward/diversity_bonus"] = float(bonus.mean())
    if name == "tree":
        adv, keep, adv_info = ADVANTAGES.get("tree")(scores[mine], rollout.nodes, rollout.stochastic, rollout.group_ids,
                                                     rollout.log_probs, loss.tree_value, loss.adv_clip)
    elif name == "dense":
        step_rewards = dense_step_rewards(policy, domain, rollout, reward_fn, cond_cpu, cfg, rewards)
        adv, keep, adv_info = ADVANTAGES.get("dense")(step_rewards, rollout.stochastic, rollout.group_ids, loss.adv_clip)
    else:
        groups = all_groups
        if rollout.adv_groups is not None:  # E-GRPO: normalise among the samples that share a merged step
            local = rollout.adv_groups.cpu()
            if sample_owner is not None:  # per chunk -> per episode (the first chunk of each)
                owner = sample_owner.cpu()
                local = torch.stack([local[torch.nonzero(owner == e).flatten()[0]] for e in range(len(rewards))])
            groups = accelerator.gather(local.to(device)).cpu()
        if name == "per-reward":
            adv_all, keep_all, adv_info = ADVANTAGES.get(name)(all_components, reward_fn.weights, groups, loss.std_scope,
                                                             loss.adv_clip)
        else:
            adv_all, keep_all, adv_info = ADVANTAGES.get(name)(scores, groups, loss.std_scope, loss.adv_clip)
        if loss.diversity_advantage:
            adv_all, keep_all = diversity_scaled_advantages(scores, groups, min_cosine_distance(features, groups),
                                                            loss.adv_clip)
        if loss.best_of_n:
            from flowcoach.core.advantages import best_of_n_keep

            keep_all = keep_all & best_of_n_keep(scores, groups, loss.best_of_n)
        adv, keep = adv_all[mine], keep_all[mine]
    info.update(adv_info)
    gate = None
    if loss.kl_gate > 0 and loss.kl_beta > 0:
        from flowcoach.core.advantages import kl_gate

        gate = kl_gate(all_components, loss.kl_gate)[mine]
        info["kl/gated_fraction"] = float(gate.float().mean())
    if sample_owner is not None:  # an episode's advantage goes to each of its chunks
        owner = sample_owner.cpu()
        adv, keep = adv[owner], keep[owner]
        gate = gate[owner] if gate is not None else None
    return adv, keep, gate, info


class AnchorData(NamedTuple):
    """What data anchoring draws from: the domain's training data, how the domain pairs a sample with
    its noise (``Domain.couple``, as in pretraining; None: unchanged) and its structure loss (None: no
    structure term)."""
    x0: torch.Tensor
    cond: Any
    couple: Callable | None = None
    structure: Callable | None = None


class AnchorBatch(NamedTuple):
    """One optimizer step's anchoring batch (this process's share) and the structure loss to add."""
    x0: torch.Tensor
    cond: Any
    t: torch.Tensor
    eps: torch.Tensor
    structure: Callable | None = None


def anchor_batch(anchor: AnchorData, cfg: TrainConfig, step: int, k: int, world_size: int, rank: int) -> AnchorBatch:
    """This process's share of the data-anchoring batch of optimizer step k of RL step ``step``:
    (x0, cond, t, eps) drawn for all processes from one generator, then split."""
    g = step_generator(cfg.seed, step, stream=50_000 + k)
    M = cfg.loss.anchor_batch
    idx = torch.randint(0, anchor.x0.shape[0], (M,), generator=g)
    t = flow_times(M, g, cfg.loss.anchor_time_sampling, cfg.loss.anchor_logit_mean, cfg.loss.anchor_logit_std)
    eps = torch.randn((M, *anchor.x0.shape[1:]), generator=g)
    part = torch.arange(M).tensor_split(world_size)[rank]
    x0, cond = anchor.x0[idx[part]], index_cond(anchor.cond, idx[part])
    if anchor.couple is not None:
        x0 = anchor.couple(x0, eps[part], cond)
    return AnchorBatch(x0, cond, t[part], eps[part], anchor.structure)


def optimizer_step_on(chunk, filler, policy, optimizer, accelerator, rollout, advantages, old_log_probs,
                      cfg: TrainConfig, stats: dict, gate=None, anchor: AnchorBatch | None = None,
                      elements: ElementCredit | None = None) -> float | None:
    """One optimizer step over the pairs of ``chunk`` (micro-batched, gradients accumulated).

    The loss is the mean over the chunk's pairs on all processes together, so the update is the
    same for any number of processes. A process with no pair still runs one zero-weighted forward
    (of ``filler``) so DDP's collectives stay in step. ``anchor`` (an AnchorBatch) adds loss.anchor_weight x the
    flow-matching loss on a batch of real data (mean over the whole batch, all processes). Returns
    the gradient norm, nan when a non-finite loss or gradient made every process skip the step, or
    None when no process had a pair.
    """
    device = accelerator.device
    n_global = int(accelerator.reduce(torch.tensor([len(chunk)], device=device), "sum").item())
    if n_global == 0:
        return None
    scale = accelerator.num_processes / n_global  # DDP averages over processes
    micro_batches = list(chunk.split(cfg.micro_batch)) if len(chunk) else [filler]
    finite = True
    if anchor is not None and cfg.loss.anchor_weight > 0:
        with accelerator.no_sync(policy.model):
            x0, cond, t, eps = (cond_to(a, device) for a in anchor[:4])
            tb = t.reshape(-1, *([1] * (x0.dim() - 1)))
            x_t = (1 - tb) * x0 + tb * eps
            v = policy.velocity(x_t, t, cond)
            per = ((v.float() - (eps - x0).float()) ** 2).reshape(len(x0), -1).mean(dim=1)
            stats.setdefault("anchor", []).append(float(per.detach().mean()))
            if anchor.structure is not None:  # pretraining's structure term, on the clean sample the velocity implies
                structure = anchor.structure(x_t - tb * v, x0, cond).float()
                stats.setdefault("anchor_structure", []).append(float(structure.detach().mean()))
                per = per + cfg.loss.anchor_structure_weight * structure
            total = per.sum() * cfg.loss.anchor_weight * accelerator.num_processes / cfg.loss.anchor_batch
            finite = bool(torch.isfinite(total))
            accelerator.backward(total if finite else per.nan_to_num(0.0).sum() * 0.0)
    for m, micro in enumerate(micro_batches):
        last = m == len(micro_batches) - 1
        uncounted = policy.counter.counting(None) if len(chunk) == 0 and policy.counter is not None else _null()
        with _null() if last else accelerator.no_sync(policy.model), uncounted:  # the filler is no real evaluation
            loss, info = pair_losses(policy, rollout, micro.to(device), advantages, cfg, old_log_probs, gate, elements)
            weight = 0.0 if len(chunk) == 0 else scale
            total = loss.sum() * weight
            if not torch.isfinite(total):
                finite = False
                total = loss.nan_to_num(0.0).sum() * 0.0  # keep the collectives in step, add nothing
            accelerator.backward(total)
        if len(chunk):
            stats["loss"].append(float(loss.detach().mean()))
            for k in ("ratio", "clipped", "approx_kl", "kl"):
                if k in info:
                    stats[k].append(info[k].detach().cpu())
    all_finite = accelerator.reduce(torch.tensor([float(finite)], device=device), "sum").item() == accelerator.num_processes
    params = policy.trainable_parameters()
    if all_finite and cfg.optim.max_grad_norm > 0:
        grad_norm = float(accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm))
    elif all_finite:
        grad_norm = float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)))
    else:
        grad_norm = float("nan")
    if math.isfinite(grad_norm):
        optimizer.step()
        policy.ema_step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@torch.no_grad()
def recompute_log_probs(policy, rollout: Rollout, chunks, micro_batch: int, device,
                        cfg: TrainConfig | None = None) -> torch.Tensor:
    """Old log-probs [B, T] computed in the training's own micro-batches, so the first update's ratio
    is exactly 1 even where the model is not batch-invariant (the rollout evaluated other batches).
    For AWM / FPO: the flow-matching surrogates [B, P] of the pairs before any update."""
    forward = cfg is not None and cfg.loss.family in ("awm", "fpo")
    old = (torch.zeros(rollout.batch_size, forward_pairs_per_sample(cfg), device=device) if forward
           else rollout.log_probs.clone())
    for chunk in chunks:
        for micro in chunk.split(micro_batch):
            micro = micro.to(device)
            values = (forward_log_probs(policy.velocity, rollout, micro, cfg) if forward
                      else pair_log_probs(policy.velocity, rollout, micro)[0])
            old[micro[:, 0], micro[:, 1]] = values
    return old


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _evaluate(policy, domain, cfg, reward_spec, accelerator, run_dir: Path, step: int, save: bool) -> dict:
    if not accelerator.is_main_process:
        return {}
    with policy.ema_weights():
        metrics, objects, scores = evaluate_model(
            unwrap(policy.model), domain, cfg.eval_samples, cfg.sampler.eval_num_steps, cfg.sampler.shift,
            reward_spec, device=accelerator.device, render=4 if save and domain.kind == "interact" else 0,
            reward_errors=cfg.reward_errors)
    if save:
        out = run_dir / "eval"
        write_eval_report(out, {"step": step, **metrics}, f"{domain.name} evaluation at step {step}",
                          f"run `{run_dir.name}`, {cfg.eval_samples} samples, {cfg.sampler.eval_num_steps} ODE steps"
                          f"{', EMA weights' if policy.ema is not None else ''}")
        domain.save(objects, scores, out / "samples")
    return {f"eval/{k}": v for k, v in metrics.items()}
