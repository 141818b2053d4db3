"""Algorithms: named recipes over the one trainer. A recipe is a function that sets config defaults.

A new algorithm is one registered function ``recipe(cfg: TrainConfig) -> None`` that sets the
sampler, advantage and loss fields it needs; the user's own flags are applied after it.
"""

from __future__ import annotations

from flowcoach.core.config import TrainConfig
from flowcoach.core.registry import ALGORITHMS


@ALGORITHMS.register("flow-grpo")
def flow_grpo(cfg: TrainConfig) -> None:
    """Flow-GRPO (arXiv 2505.05470): flow-sde with a = 0.7 on every step but the last, 10 training
    steps (40 at evaluation), global-std group advantages clipped at 5, ratio clip 1e-4 on mean
    log-probs, KL to the base without the dt factor."""
    cfg.sampler.law = "flow-sde"
    cfg.sampler.noise_level = 0.7
    cfg.sampler.num_steps = 10
    cfg.sampler.eval_num_steps = 40
    cfg.sampler.sde_window_size = 0
    cfg.sampler.deterministic_last_step = True
    cfg.sampler.logprob_reduction = "mean"
    cfg.loss.advantage = "group"
    cfg.loss.std_scope = "global"
    cfg.loss.adv_clip = 5.0
    cfg.loss.kl_with_dt = False


@ALGORITHMS.register("flow-grpo-fast")
def flow_grpo_fast(cfg: TrainConfig) -> None:
    """Flow-GRPO-Fast (flow_grpo repo): the group shares its initial noise and one ODE prefix (computed
    once), then branches into a random window of 2 SDE steps inside the first half of the grid; ODE
    after it; only the window's steps are trained."""
    flow_grpo(cfg)
    cfg.sampler.sde_window_size = 2
    cfg.sampler.sde_window_range = (0, 5)
    cfg.sampler.same_noise_in_group = True


@ALGORITHMS.register("mix-grpo")
def mix_grpo(cfg: TrainConfig) -> None:
    """MixGRPO (arXiv 2507.21802): a window of 3 SDE steps slides from the noisiest step towards clean
    ones by 1 step every 10 RL steps over the noisier half of the grid (starts 0-4 of 10) and rolls
    back (progressive; also random, decay, exp-decay); ODE before and after it; only the window is
    trained."""
    flow_grpo(cfg)
    cfg.sampler.sde_window_size = 3
    cfg.sampler.sde_window_range = (0, 5)
    cfg.sampler.window_schedule = "progressive"
    cfg.sampler.window_every = 10
    cfg.sampler.window_stride = 1


@ALGORITHMS.register("mix-grpo-flash")
def mix_grpo_flash(cfg: TrainConfig) -> None:
    """MixGRPO-Flash: MixGRPO whose ODE after the window is DPM-Solver++(2M) on half as many steps."""
    mix_grpo(cfg)
    cfg.sampler.post_window_solver = "dpm2"
    cfg.sampler.post_window_steps = 0.5


@ALGORITHMS.register("dense-grpo")
def dense_grpo(cfg: TrainConfig) -> None:
    """DenseGRPO (arXiv 2601.20218): Flow-GRPO's rollouts, but each step is credited with its reward
    gain R(x0(x_{j+1})) - R(x0(x_j)), x0 the ODE completion of the state (--loss.dense-estimate
    tweedie: the one-step estimate x - t v), normalised across the group at each step."""
    flow_grpo(cfg)
    cfg.loss.advantage = "dense"
    cfg.loss.dense_estimate = "ode"


@ALGORITHMS.register("tree-grpo")
def tree_grpo(cfg: TrainConfig) -> None:
    """TreeGRPO / BranchGRPO (arXiv 2512.08153, 2509.06040): each group is a tree from one noise that
    splits in 2 at steps 0, 2 and 4 (8 leaves; SDE there, ODE elsewhere; shared prefixes computed
    once); a node's value is the mean of its leaves, each edge is trained with its child's
    advantage normalised over the tree's nodes of the same depth."""
    flow_grpo(cfg)
    cfg.sampler.structure = "tree"
    cfg.sampler.tree_branch_steps = (0, 2, 4)
    cfg.sampler.tree_branching = 2
    cfg.group_size = 8
    cfg.loss.advantage = "tree"


@ALGORITHMS.register("e-grpo")
def e_grpo(cfg: TrainConfig) -> None:
    """E-GRPO (arXiv 2601.00423): consecutive low-entropy steps merge into one SDE step until its
    entropy per dimension reaches 0.3 nats; the group follows one ODE anchor, half of it branches
    at one merged step and half at another (drawn per RL step), ODE elsewhere; advantages are
    normalised within the samples that share the merged step."""
    flow_grpo(cfg)
    cfg.sampler.structure = "merged"
    cfg.sampler.merge_entropy = 0.3
    cfg.sampler.merge_branch_points = 2
    cfg.loss.std_scope = "group"


@ALGORITHMS.register("tempflow-grpo")
def tempflow_grpo(cfg: TrainConfig) -> None:
    """TempFlow-GRPO (arXiv 2508.04324): the group shares its noise and ODE path up to one branching
    SDE step drawn per group, ODE after, so the reward is credited to that step; noise-aware step
    weights (std / mean std) make high-noise steps count more."""
    flow_grpo(cfg)
    cfg.sampler.structure = "branch"
    cfg.loss.step_weight = "noise"


@ALGORITHMS.register("diffusion-nft")
def diffusion_nft(cfg: TrainConfig) -> None:
    """DiffusionNFT (arXiv 2509.16117): deterministic DPM-Solver++ rollouts from a soft-updated old
    policy; the samples are re-noised at every sampling time and trained by flow matching toward
    the implicit positive policy (1 - b) v_old + b v and away from the negative one, weighted by
    r = 1/2 + A / (2 A_max); beta 1, velocity KL 1e-4; old <- eta old + (1 - eta) new, eta =
    min(0.001 k, 0.5)."""
    flow_grpo(cfg)
    cfg.sampler.law = "ode"
    cfg.sampler.noise_level = 0.0
    cfg.sampler.ode_solver = "dpm2"
    cfg.loss.family = "nft"
    cfg.loss.nft_beta = 1.0
    cfg.loss.kl_beta = 1e-4
    cfg.loss.fwd_time = "grid"
    cfg.loss.fwd_timesteps = 0


@ALGORITHMS.register("awm")
def awm(cfg: TrainConfig) -> None:
    """Advantage Weighted Matching (arXiv 2509.25050): stochastic (CPS, a = 0.4) rollouts; the
    pretraining flow-matching loss at 6 of the sampling times is weighted by the advantage, as a
    clipped ratio of the pseudo log-likelihoods -||v - (eps - x0)||^2 (on-policy: ratio 1)."""
    flow_grpo(cfg)
    cfg.sampler.law = "cps"
    cfg.sampler.noise_level = 0.4
    cfg.loss.family = "awm"
    cfg.loss.fwd_time = "grid"
    cfg.loss.fwd_timesteps = 6


@ALGORITHMS.register("fpo")
def fpo(cfg: TrainConfig) -> None:
    """Flow Policy Optimization (arXiv 2507.21053), for interact domains and any other: ODE rollouts
    (exploration from the initial noise), the likelihood-free ratio exp(L_old - L) of the
    flow-matching loss over 8 draws (t uniform) per sample, summed over dimensions, PPO-clipped at 0.2."""
    flow_grpo(cfg)
    cfg.sampler.law = "ode"
    cfg.sampler.noise_level = 0.0
    cfg.sampler.logprob_reduction = "sum"
    cfg.loss.family = "fpo"
    cfg.loss.fwd_time = "uniform"
    cfg.loss.fwd_timesteps = 1
    cfg.loss.fwd_draws = 8


def algorithm_defaults(name: str) -> TrainConfig:
    """A TrainConfig with the recipe of algorithm ``name`` applied."""
    cfg = TrainConfig(algo=name)
    ALGORITHMS.get(name)(cfg)
    return cfg


def train_config(domain_name: str, algo: str | None = None) -> TrainConfig:
    """What `flowcoach train DOMAIN [--algo NAME]` starts from, before the user's flags.

    A domain's train_defaults tune its default algorithm ("algo" there, else flow-grpo). For that
    algorithm they all apply over its recipe. For any other algorithm they apply except on the fields
    that algorithm's recipe sets differently from the default algorithm's recipe: those define the
    algorithm (FPO's ODE rollouts, AWM's noise level, dense-grpo's step advantages), and a domain's
    tuning of another algorithm must not undo them."""
    from flowcoach.core.config import get_field, set_fields
    from flowcoach.core.domain import get_domain

    domain_defaults = dict(get_domain(domain_name).train_defaults())
    default_algo = domain_defaults.pop("algo", "flow-grpo")
    algo = algo or default_algo
    cfg = algorithm_defaults(algo)
    cfg.domain = domain_name
    if algo != default_algo:
        reference = algorithm_defaults(default_algo)
        domain_defaults = {key: value for key, value in domain_defaults.items()
                           if get_field(cfg, key) == get_field(reference, key)}
    set_fields(cfg, domain_defaults)
    return cfg


def describe(name: str) -> str:
    doc = (ALGORITHMS.get(name).__doc__ or "").strip()
    return " ".join(doc.split())
