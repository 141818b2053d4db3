"""Configs as plain dataclasses: the CLI (tyro) turns field docstrings into help text."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from flowcoach.core.registry import FlowcoachError


@dataclass
class SamplerConfig:
    law: str = "flow-sde"
    """Noise law of the stochastic steps: flow-sde (Flow-GRPO), const-eta (DanceGRPO), cps, or ode."""
    noise_level: float = 0.7
    """a of flow-sde / cps, eta of const-eta. 0 gives the deterministic ODE sampler exactly."""
    num_steps: int = 10
    """Denoising steps of training rollouts (Denoising Reduction: fewer than at evaluation)."""
    eval_num_steps: int = 40
    """Denoising steps of evaluation and `flowcoach sample` (deterministic ODE)."""
    shift: float = 1.0
    """Time-grid shift of diffusers' FlowMatchEulerDiscreteScheduler (SD3 uses 3)."""
    ode_solver: Literal["euler", "heun", "dpm2"] = "euler"
    """Solver of the deterministic steps: Euler, Heun (2 evaluations a step) or DPM-Solver++(2M)."""
    structure: str = "window"
    """Rollout structure: window (SDE window, Flow-GRPO/-Fast/MixGRPO), branch (one SDE step per group,
    TempFlow), tree (TreeGRPO/BranchGRPO), merged (E-GRPO's entropy-merged steps); see core/sampling/structures.py."""
    sde_window_size: int = 0
    """window: 0 = every step stochastic; k > 0 = one window of k SDE steps, ODE elsewhere (Flow-GRPO-Fast)."""
    sde_window_range: tuple[int, int] | None = None
    """[lo, hi) of the step indices where the SDE window may start (branch, merged: where they may
    branch); default: anywhere it fits."""
    window_schedule: Literal["random", "progressive", "decay", "exp-decay"] = "random"
    """Where the window starts at each RL step: random (Fast), or sliding from the noisiest step by
    window_stride every window_every steps and rolling back (progressive; decay, exp-decay stay less
    long at later positions): MixGRPO."""
    window_every: int = 25
    """RL steps the sliding window stays at a position (MixGRPO's tau)."""
    window_stride: int = 1
    """Steps the sliding window moves by (0: frozen at the range's start, MixGRPO-Flash*)."""
    window_decay: float = 0.1
    """exp-decay rate k: the window stays window_every exp(-k ReLU(l - n/2)) steps at position l."""
    post_window_solver: Literal["", "euler", "heun", "dpm2"] = ""
    """ODE solver after the SDE window ('' = ode_solver); MixGRPO-Flash uses dpm2."""
    post_window_steps: float = 1.0
    """Fraction of the steps after the window that are kept (on the same schedule): MixGRPO-Flash's compression."""
    tree_branch_steps: tuple[int, ...] = (0, 2, 4)
    """tree: the steps where every node splits into tree_branching children (group_size = k^depth)."""
    tree_branching: int = 2
    """tree: children per node at each branch step."""
    merge_entropy: float = 0.3
    """merged: entropy per dimension (nats) a merged SDE step must reach, 1/2 log(2 pi e std^2)."""
    merge_branch_points: int = 2
    """merged: K merged steps per RL step; the group splits into K subgroups, each branching at one."""
    deterministic_last_step: bool = True
    """Take the last step as ODE and do not train it (clean samples; Flow-GRPO skips it too)."""
    same_noise_in_group: bool = False
    """Share the initial noise within a group (DanceGRPO's init_same_noise); the group's common ODE
    prefix is then computed once (Flow-GRPO-Fast's shared prefix)."""
    logprob_reduction: Literal["mean", "sum"] = "mean"
    """Reduce a step's Gaussian log-prob over dimensions by mean (the anchors') or sum (exact)."""


@dataclass
class LossConfig:
    family: Literal["ratio", "nft", "awm", "fpo"] = "ratio"
    """ratio: clipped ratio of SDE transition log-probs (GRPO). Forward-process losses on the rollout's
    samples, any sampler: nft (DiffusionNFT), awm (advantage-weighted matching), fpo (flow policy
    optimisation's likelihood-free ratio)."""
    advantage: str = "group"
    """Advantage estimator: group (one composite reward), per-reward (normalise each, then weight),
    tree (per-depth, tree structure), dense (per-step reward gains)."""
    std_scope: Literal["group", "global"] = "global"
    """Divide by the group's reward std or the whole batch's (Flow-GRPO's default is global)."""
    adv_clip: float = 5.0
    """Clip advantages to +-adv_clip (0: no clip)."""
    clip_low: float | None = None
    """Lower clip of the ratio, 1 - clip_low. Default: 1e-4 for mean reduction, 0.2 for sum."""
    clip_high: float | None = None
    """Upper clip, 1 + clip_high. Default: equal to clip_low (symmetric)."""
    kl_beta: float = 0.0
    """Weight of the KL to the reference (base) policy. 0 skips the reference forward pass."""
    kl_with_dt: bool = False
    """True: exact per-step KL (1/|dt| factor). False: flow_grpo's version without it (beta ~10x)."""
    kl_gate: float = 0.0
    """GARDO: apply the KL only to the fraction of samples whose main reward ranks highest above their
    other rewards (the likeliest hacks; needs >= 2 reward components). 0: KL on every sample."""
    ratio_norm: bool = False
    """GRPO-Guard's RatioNorm: add the closed-form KL to the log-ratio (centre the ratio on 1), scale it
    by the step std (one spread for every step), and weight each step's loss by 1/|dt| (normalised)."""
    element_weight: float = 0.0
    """Per-element credit (``Domain.element_rewards``; molecules: each atom's stability): each element
    of a sample is trained through its own share of the transition log-prob with the sample's
    advantage plus this weight x its group-normalised element reward. 0: one advantage per sample."""
    step_weight: Literal["none", "noise"] = "none"
    """Per-step loss weight: noise = the step's std over its mean (TempFlow's noise-aware weighting)."""
    tree_value: Literal["mean", "softmax"] = "mean"
    """tree: a node's value is the mean of its leaves, or the softmax(log-prob)-weighted mean of its children."""
    dense_estimate: Literal["ode", "tweedie"] = "ode"
    """dense: the clean sample of an intermediate state by ODE completion, or one Tweedie step x - t v."""
    best_of_n: int = 0
    """Train only the n/2 best and n/2 worst samples of each group (DanceGRPO's best-of-N); 0: all."""
    win_rate: bool = False
    """Pref-GRPO: replace each reward by its win rate in its group (pairwise votes over the reward
    components, ties within win_rate_tol count half)."""
    win_rate_tol: float = 1e-3
    diversity_bonus: float = 0.0
    """DiverseGRPO: add this weight x 1/(size of the sample's spectral cluster in its group) to the reward."""
    diversity_clusters: int = 0
    """Clusters per group for the diversity bonus (0: chosen by the eigengap)."""
    diversity_advantage: bool = False
    """GARDO: A = R - mean (no std), positive ones scaled by the sample's min cosine distance to its group over the group's mean."""
    anchor_weight: float = 0.0
    """Data anchoring: weight of a flow-matching loss on the domain's training data added to every optimizer step."""
    anchor_batch: int = 64
    """Data samples per optimizer step for the anchoring loss (all processes together)."""
    anchor_time_sampling: Literal["uniform", "logit-normal"] = "uniform"
    """How the anchoring loss draws its flow times; give the base's own pretraining scheme (its
    base.json config: time_sampling, logit_mean, logit_std), or anchoring pulls the model toward
    another weighting of the times than the one it was trained on."""
    anchor_logit_mean: float = 0.0
    anchor_logit_std: float = 1.0
    anchor_structure_weight: float = 0.0
    """The anchoring loss is flow matching plus this weight x the domain's structure loss
    (``Domain.structure_loss``), as pretraining's --structure-weight; give the base's own (its
    base.json config: structure_weight), or anchoring pulls the model back toward plain flow matching."""
    nft_beta: float = 1.0
    """DiffusionNFT's beta: v+ = (1 - beta) v_old + beta v, v- = (1 + beta) v_old - beta v."""
    nft_old_rate: float = 0.001
    """DiffusionNFT's soft update of the old policy after RL step k: old <- eta old + (1 - eta) new,
    eta = min(rate k, nft_old_max)."""
    nft_old_max: float = 0.5
    fwd_timesteps: int = 0
    """Forward-process losses: (sample, time) pairs per sample (0: one per sampling step)."""
    fwd_draws: int = 1
    """Forward-process losses: noise draws averaged inside one pair (FPO's N_mc)."""
    fwd_time: Literal["grid", "uniform"] = "grid"
    """Forward-process times: drawn from the sampling grid (NFT, AWM) or uniform in (0, 1) (FPO)."""
    awm_weighting: Literal["mse", "ghuber"] = "mse"
    """AWM's log-likelihood surrogate: -mse, or the generalised Huber -((mse + c)^p - c^p) t / p, p = 1/4."""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """AdamW learning rate."""
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    """Clip the gradient norm of each optimizer step (0: off)."""
    ema_decay: float = 0.0
    """EMA of the trained weights (diffusers' EMAModel); evaluation uses it. 0: off."""


@dataclass
class TrainConfig:
    domain: str = "toy"
    """Domain name (see `flowcoach domains`) or module:attr of a Domain."""
    algo: str = "flow-grpo"
    """Algorithm recipe (see `flowcoach domains`); its defaults fill every field you do not set."""
    steps: int = 100
    """RL steps: one step = one rollout of groups, rewards, advantages, then the inner updates."""
    seed: int = 0
    output_dir: str = "runs"
    """Runs are written to <output_dir>/<domain>__<algo>__<seed>__<time>/."""
    resume: str | None = None
    """'latest' (newest run of this domain/algo/seed under output_dir), or a run or checkpoint folder."""
    base: str | None = None
    """Base model folder (default: the domain's shipped base)."""
    groups_per_step: int = 16
    """Conditions per step (all processes together); each gets group_size samples."""
    group_size: int = 8
    """G: samples per condition; the group is the baseline of its advantages."""
    inner_epochs: int = 1
    """Passes over each rollout."""
    optimizer_steps_per_epoch: int = 1
    """Optimizer steps per pass; the (sample, trained step) pairs are split evenly among them."""
    micro_batch: int = 256
    """Pairs per forward/backward on one process; gradient accumulation is derived from it."""
    recompute_old_log_probs: bool = False
    """Recompute the old log-probs in the training's micro-batches before the first update (one
    extra forward per pair): the first ratio is then exactly 1 even for a model that is not
    batch-invariant. Off: the rollout's log-probs are used (exact when micro-batches are not tiny)."""
    rewards: tuple[str, ...] = ()
    """Rewards as NAME=WEIGHT (default: the domain's)."""
    reward_errors: Literal["raise", "floor", "skip"] = "raise"
    """When a reward raises on a sample: raise (stop with a one-line error naming the reward and the
    sample), floor (that sample gets the reward's floor: its ``floor`` attribute, else the batch's
    lowest score), or skip (the step makes no update, counted in skipped/nonfinite_reward). Each
    error is reported with the sample's index and a short repr, and counted in reward/errors."""
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    sample_every: int = 50
    """Write decoded samples (native formats) every this many steps (0: never)."""
    eval_every: int = 0
    """Run the held-out evaluator every this many steps (0: only at the end)."""
    eval_samples: int = 256
    time_budget_s: float = 0.0
    """Stop once the RL steps have used this many seconds of process CPU time (evaluation and
    checkpoints excluded; 0: run all steps). For equal-compute comparisons on a shared machine."""
    eval_every_s: float = 0.0
    """Also run the held-out evaluator after every this many training CPU seconds (0: off)."""
    tensorboard: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def resolved_clip(self) -> tuple[float, float]:
        from flowcoach.core.losses import default_clip

        low = self.loss.clip_low if self.loss.clip_low is not None else default_clip(self.sampler.logprob_reduction)
        high = self.loss.clip_high if self.loss.clip_high is not None else low
        return low, high


def set_fields(cfg, values: dict) -> None:
    """Set (dotted) fields of a nested config dataclass: {"sampler.noise_level": 0.5, "steps": 10}."""
    for key, value in values.items():
        target, *path = cfg, *key.split(".")
        for part in path[:-1]:
            target = getattr(target, part)
        if not hasattr(target, path[-1]):
            raise FlowcoachError(f"unknown config field '{key}'")
        setattr(target, path[-1], tuple(value) if isinstance(value, list) else value)


def get_field(cfg, key: str):
    """The value of a (dotted) field of a nested config dataclass: get_field(cfg, "sampler.noise_level")."""
    for part in key.split("."):
        if not hasattr(cfg, part):
            raise FlowcoachError(f"unknown config field '{key}'")
        cfg = getattr(cfg, part)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict):
    """Rebuild a (nested) config dataclass from a dict, as written to config.yaml."""
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in hints:
            raise FlowcoachError(f"unknown config field '{key}' for {cls.__name__}")
        default = hints[key].default_factory() if hints[key].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            value = from_dict(type(default), value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def save_yaml(cfg, path) -> None:
    """Write the config atomically (a temporary file renamed over it): a kill never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(_plain(to_dict(cfg)), f, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_yaml(cls, path):
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise FlowcoachError(f"config '{path}' is unreadable ({type(e).__name__})") from e
    if not isinstance(data, dict):
        raise FlowcoachError(f"config '{path}' is not a mapping of fields")
    return from_dict(cls, data)




def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value
