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


def algorithm_defaults(name: str) -> TrainConfig:
    """A TrainConfig with the recipe of algorithm ``name`` applied."""
    cfg = TrainConfig(algo=name)
    ALGORITHMS.get(name)(cfg)
    return cfg


def describe(name: str) -> str:
    doc = (ALGORITHMS.get(name).__doc__ or "").strip()
    return " ".join(doc.split())
