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
from flowcoach.core.sampling.rollout import index_cond

RewardFn = Callable[[list, Any], tuple[torch.Tensor, dict]]

REWARDS.register("toy-mode", "flowcoach.rewards.toy:mode_reward")
REWARDS.register("toy-on-manifold", "flowcoach.rewards.toy:on_manifold_reward")
REWARDS.register("episode-return", "flowcoach.rewards.episodes:episode_return")
REWARDS.register("episode-success", "flowcoach.rewards.episodes:episode_success")
REWARDS.register("episode-speed", "flowcoach.rewards.episodes:episode_speed")
REWARDS.register("mol-valid", "flowcoach.rewards.molecules:validity")
REWARDS.register("mol-atom-stability", "flowcoach.rewards.molecules:atom_stability")
REWARDS.register("mol-stability", "flowcoach.rewards.molecules:molecule_stability")
REWARDS.register("mol-connected-stability", "flowcoach.rewards.molecules:connected_stability")
REWARDS.register("mol-near-stability", "flowcoach.rewards.molecules:near_stability")
REWARDS.register("mol-qed", "flowcoach.rewards.molecules:qed")
REWARDS.register("mol-qed-in-group", "flowcoach.rewards.molecules:qed_in_group")
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
REWARDS.register("crystal-volume-ref", "flowcoach.rewards.crystals:volume_reference")
REWARDS.register("crystal-distance", "flowcoach.rewards.crystals:distance")
REWARDS.register("crystal-elements", "flowcoach.rewards.crystals:element_count")
REWARDS.register("crystal-formula-duplicate", "flowcoach.rewards.crystals:formula_duplicate")
REWARDS.register("crystal-duplicate", "flowcoach.rewards.crystals:duplicate")
REWARDS.register("speech-prosody", "flowcoach.rewards.speech:prosody")
REWARDS.register("speech-mcd", "flowcoach.rewards.speech:mcd")
REWARDS.register("speech-voicing", "flowcoach.rewards.speech:voicing")
REWARDS.register("speech-clipping", "flowcoach.rewards.speech:clipping")
REWARDS.register("video-physics", "flowcoach.rewards.video:physics_reward")
REWARDS.register("video-persistence", "flowcoach.rewards.video:persistence_reward")
REWARDS.register("video-flicker", "flowcoach.rewards.video:flicker_reward")
REWARDS.register("video-warp", "flowcoach.rewards.video:warp_reward")


REWARD_ERRORS = ("raise", "floor", "skip")
"""What a CompositeReward does when a reward raises on a sample (TrainConfig.reward_errors)."""


def short_repr(obj: Any, limit: int = 60) -> str:
    """A one-line repr of at most ``limit`` characters (numpy and torch summarise big arrays)."""
    text = " ".join(repr(obj).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def get_reward(name: str) -> RewardFn:
    """A registered reward, a ``module:attr``, or a reward server's URL ``http://HOST:PORT/NAME``
    (scored remotely, see flowcoach.rewards.server)."""
    if name.strip().lower().startswith(("http://", "https://")):
        from flowcoach.rewards.server import RemoteReward

        return RemoteReward(name)
    return REWARDS.get(name)


class CompositeReward:
    """A weighted sum of named rewards; each component is also reported on its own.

    ``components`` in the info is [B, K] in the order of ``names`` (for per-reward advantages);
    ``errors`` counts the samples on which a reward raised. A reward that raises on the batch is
    called on each sample alone to find the ones that raise, then once more on the others (so
    rewards that look at the whole batch still see it); ``on_error`` decides what the failing
    samples get (see ``REWARD_ERRORS``): raise a FlowcoachError naming the reward and the sample,
    the reward's floor (its ``floor`` attribute, else the lowest score of the others, else 0), or
    NaN so the trainer skips the step. A reward that raises on the batch but on no sample alone
    is raised as a FlowcoachError whatever ``on_error`` says.
    """

    def __init__(self, weights: dict[str, float], on_error: str = "raise"):
        if not weights:
            raise FlowcoachError("no reward given; pass --rewards NAME=WEIGHT (see `flowcoach domains`)")
        if on_error not in REWARD_ERRORS:
            raise FlowcoachError(f"reward_errors must be one of {', '.join(REWARD_ERRORS)}, got '{on_error}'")
        self.names = list(weights)
        self.weights = torch.tensor([float(weights[n]) for n in self.names])
        self.fns: list[RewardFn] = [get_reward(n) for n in self.names]
        self.on_error = on_error

    def _scores(self, name: str, fn: RewardFn, objects: list, conditions: Any) -> tuple[torch.Tensor, dict]:
        scores, info = fn(objects, conditions)
        scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
        if scores.shape[0] != len(objects):
            raise FlowcoachError(f"reward '{name}' returned {scores.shape[0]} scores for {len(objects)} objects")
        return scores, dict(info)

    def _isolate(self, name: str, fn: RewardFn, objects: list, conditions: Any,
                 batch_error: Exception) -> tuple[torch.Tensor, dict, int]:
        """Scores when ``fn`` raised on the batch: find the failing samples and handle them."""
        failed = []
        for i in range(len(objects)):
            try:
                fn([objects[i]], index_cond(conditions, [i]))
            except FlowcoachError:
                raise
            except Exception as e:  # noqa: BLE001 - a reward's own bug, reported with its sample
                failed.append((i, e))
        B = len(objects)
        if not failed:
            raise FlowcoachError(f"reward '{name}' raised on the batch of {B} but on no sample alone: "
                                 f"{_one_line(batch_error)}") from batch_error
        i, e = failed[0]
        where = f"sample {i} of {B} ({short_repr(objects[i])})"
        more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
        if self.on_error == "raise":
            raise FlowcoachError(f"reward '{name}' raised on {where}{more}: {_one_line(e)}; fix the reward "
                                 "or set --reward-errors floor|skip") from e
        bad = [i for i, _ in failed]
        good = [i for i in range(B) if i not in bad]
        scores = torch.full((B,), float("nan"))
        info: dict = {}
        if good:
            try:
                part, info = self._scores(name, fn, [objects[i] for i in good], index_cond(conditions, good))
            except FlowcoachError:
                raise
            except Exception as e2:  # noqa: BLE001
                raise FlowcoachError(f"reward '{name}' raised on {where}{more}, and again on the other samples: "
                                     f"{_one_line(e2)}") from e2
            scores[good] = part
        if self.on_error == "floor":
            floor = getattr(fn, "floor", None)
            finite = scores[torch.isfinite(scores)]
            floor = float(floor) if floor is not None else (float(finite.min()) if len(finite) else 0.0)
            scores[bad] = floor
            outcome = f"scored {floor:g} (its floor)"
        else:
            outcome = "scored NaN: the step is skipped"
        print(f"warning: reward '{name}' raised on {where}{more}: {_one_line(e)}; {outcome} (reward_errors={self.on_error})")
        info["errors"] = len(failed)
        return scores, info, len(failed)

    def __call__(self, objects: list, conditions: Any) -> tuple[torch.Tensor, dict]:
        parts, info, errors = [], {}, 0
        for name, fn in zip(self.names, self.fns):
            try:
                scores, part_info = self._scores(name, fn, objects, conditions)
            except FlowcoachError:
                raise
            except Exception as e:  # noqa: BLE001 - isolate the failing samples
                scores, part_info, n = self._isolate(name, fn, objects, conditions, e)
                errors += n
            parts.append(scores)
            for k, v in part_info.items():
                info[f"{name}/{k}"] = v
        components = torch.stack(parts, dim=1)
        info["components"] = components
        info["errors"] = errors
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


def build_reward(spec: tuple[str, ...] | list[str] | dict[str, float], on_error: str = "raise") -> CompositeReward:
    return CompositeReward(parse_reward_spec(spec), on_error)
