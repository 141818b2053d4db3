"""Reward functions and their composition.

A reward is ``fn(objects, conditions) -> (scores [B], info dict)`` on decoded objects, batched.
Invalid objects score a defined value (each reward documents it) and are counted in ``info``,
never crash a run. Rewards are registered by name in ``flowcoach.core.registry.REWARDS``; built-in
ones are registered lazily below so no science library is imported until a reward is used.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from flowcoach.core.registry import REWARDS, FlowcoachError

RewardFn = Callable[[list, Any], tuple[torch.Tensor, dict]]

REWARDS.register("toy-mode", "flowcoach.rewards.toy:mode_reward")
REWARDS.register("toy-on-manifold", "flowcoach.rewards.toy:on_manifold_reward")
REWARDS.register("episode-return", "flowcoach.rewards.episodes:episode_return")
REWARDS.register("episode-success", "flowcoach.rewards.episodes:episode_success")
REWARDS.register("episode-speed", "flowcoach.rewards.episodes:episode_speed")
REWARDS.register("mol-valid", "flowcoach.rewards.molecules:validity")
REWARDS.register("mol-atom-stability", "flowcoach.rewards.molecules:atom_stability")
REWARDS.register("mol-stability", "flowcoach.rewards.molecules:molecule_stability")
REWARDS.register("mol-qed", "flowcoach.rewards.molecules:qed")
REWARDS.register("mol-sa", "flowcoach.rewards.molecules:sa")
REWARDS.register("mol-logp-window", "flowcoach.rewards.molecules:logp_window")
REWARDS.register("mol-mw-window", "flowcoach.rewards.molecules:mw_window")
REWARDS.register("mol-smarts", "flowcoach.rewards.molecules:smarts")
REWARDS.register("mol-heavy-atoms", "flowcoach.rewards.molecules:heavy_atom_match")
REWARDS.register("mol-duplicate", "flowcoach.rewards.molecules:duplicate_penalty")
REWARDS.register("crystal-structure", "flowcoach.rewards.crystals:structure_validity")
REWARDS.register("crystal-smact", "flowcoach.rewards.crystals:composition_validity")
REWARDS.register("crystal-valid", "flowcoach.rewards.crystals:validity")
REWARDS.register("crystal-energy", "flowcoach.rewards.crystals:energy")
REWARDS.register("crystal-ehull", "flowcoach.rewards.crystals:ehull")
REWARDS.register("crystal-stable", "flowcoach.rewards.crystals:stable")
REWARDS.register("crystal-force", "flowcoach.rewards.crystals:force")
REWARDS.register("crystal-volume", "flowcoach.rewards.crystals:volume")
REWARDS.register("speech-prosody", "flowcoach.rewards.speech:prosody")
REWARDS.register("speech-mcd", "flowcoach.rewards.speech:mcd")
REWARDS.register("speech-voicing", "flowcoach.rewards.speech:voicing")
REWARDS.register("speech-clipping", "flowcoach.rewards.speech:clipping")
REWARDS.register("video-physics", "flowcoach.rewards.video:physics_reward")
REWARDS.register("video-persistence", "flowcoach.rewards.video:persistence_reward")
REWARDS.register("video-flicker", "flowcoach.rewards.video:flicker_reward")
REWARDS.register("video-warp", "flowcoach.rewards.video:warp_reward")


def get_reward(name: str) -> RewardFn:
    """A registered reward, a ``module:attr``, or a reward server's URL ``http://HOST:PORT/NAME``
    (scored remotely, see flowcoach.rewards.server)."""
    if name.strip().lower().startswith(("http://", "https://")):
        from flowcoach.rewards.server import RemoteReward

        return RemoteReward(name)
    return REWARDS.get(name)


class CompositeReward:
    """A weighted sum of named rewards; each component is also reported on its own.

    ``components`` in the info is [B, K] in the order of ``names`` (for per-reward advantages).
    """

    def __init__(self, weights: dict[str, float]):
        if not weights:
            raise FlowcoachError("no reward given; pass --rewards NAME=WEIGHT (see `flowcoach domains`)")
        self.names = list(weights)
        self.weights = torch.tensor([float(weights[n]) for n in self.names])
        self.fns: list[RewardFn] = [get_reward(n) for n in self.names]

    def __call__(self, objects: list, conditions: Any) -> tuple[torch.Tensor, dict]:
        parts, info = [], {}
        for name, fn in zip(self.names, self.fns):
            scores, part_info = fn(objects, conditions)
            scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
            if scores.shape[0] != len(objects):
                raise FlowcoachError(f"reward '{name}' returned {scores.shape[0]} scores for {len(objects)} objects")
            parts.append(scores)
            for k, v in part_info.items():
                info[f"{name}/{k}"] = v
        components = torch.stack(parts, dim=1)
        info["components"] = components
        return components @ self.weights, info


def parse_reward_spec(spec: tuple[str, ...] | list[str] | dict[str, float]) -> dict[str, float]:
    """["a=1", "b=0.5"] (or a dict) -> {"a": 1.0, "b": 0.5}; a bare name has weight 1.
    A name may be a reward server's URL: "http://host:8000/mol-qed?timeout=60=0.5"."""
    if isinstance(spec, dict):
        return {k: float(v) for k, v in spec.items()}
    weights = {}
    for item in spec:
        if item.strip().lower().startswith(("http://", "https://")):
            from flowcoach.rewards.server import split_weight

            name, weight = split_weight(item)
        else:
            name, _, weight = item.partition("=")
        try:
            weights[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise FlowcoachError(f"reward weight in '{item}' is not a number; write NAME=WEIGHT") from None
    return weights


def build_reward(spec: tuple[str, ...] | list[str] | dict[str, float]) -> CompositeReward:
    return CompositeReward(parse_reward_spec(spec))
