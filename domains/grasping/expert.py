"""A scripted, multimodal grasping expert for ``GraspEnv`` and the demonstrations made with it.

The expert picks one of three strategies per episode, at random:
  - ``top``: hover above the object, descend between the open fingers, close, lift;
  - ``side+x`` / ``side-x``: descend to grasp height beside the object (on its +x or -x side), slide
    in along x so the pads pass either side of it, close, lift.
From one start the three take different paths (the average of their actions follows none of them),
which a flow policy can represent and a unimodal Gaussian cannot.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from flowcoach.domains.grasping.env import DMAX, MAX_EPISODE_STEPS, MJCF, OBS_LAYOUT, RANGES, GraspEnv

MODES = ("top", "side+x", "side-x")
GRASP_Z = 0.028  # tcp height at the grasp: finger tips 8 mm above the floor, pads cover the whole object
LIFT_Z = 0.20
CLEARANCE = 0.045  # tcp above the object's top when hovering (tips 2.5 cm above it)
GAIN = 0.7  # fraction of the remaining distance commanded per step (below 1: no overshoot)
CLOSE_STEPS = 6  # control steps (0.3 s) with the fingers closing before the lift
PAD_HALF_X = 0.012


def _move(goal: np.ndarray, tcp: np.ndarray) -> np.ndarray:
    """Proportional step toward goal, scaled as a whole so the path stays straight."""
    v = GAIN * (goal - tcp) / DMAX
    return v / max(1.0, float(np.abs(v).max()))


class GraspExpert:
    """``reset(rng)`` draws a mode (or keeps a fixed one); ``act(obs)`` returns the action in [-1, 1]^4."""

    def __init__(self, mode: str | None = None):
        if mode is not None and mode not in MODES:
            raise ValueError(f"unknown expert mode {mode!r}; choose from {list(MODES)} or None (random)")
        self.fixed_mode = mode
        self.mode, self.phase, self._count, self._hold = MODES[0], 0, 0, np.zeros(2)

    def reset(self, rng: np.random.Generator) -> str:
        self.mode = self.fixed_mode or MODES[int(rng.integers(len(MODES)))]
        self.phase, self._count = 0, 0
        return self.mode

    def act(self, obs: np.ndarray) -> np.ndarray:
        tcp = obs[OBS_LAYOUT["gripper_pos"]].astype(np.float64)
        obj = obs[OBS_LAYOUT["object_pos"]].astype(np.float64)
        half = obs[OBS_LAYOUT["object_half_extents"]].astype(np.float64)
        if self._lost_it(tcp, obj, obs[OBS_LAYOUT["finger_contact"]]):
            self.phase, self._count = 0, 0  # the grasp missed or slipped: start this mode over
        plan = self._top if self.mode == "top" else self._side
        goal, grip = plan(tcp, obj, half)
        return np.append(_move(goal, tcp), grip).astype(np.float32)

    def _lost_it(self, tcp: np.ndarray, obj: np.ndarray, contact: np.ndarray) -> bool:
        """Lifting, well above the object, and no pad touches it."""
        lifting = self.phase == (3 if self.mode == "top" else 4)
        return lifting and tcp[2] > obj[2] + 0.05 and not contact.any()

    def _advance(self, done: bool):
        if done:
            self.phase, self._count = self.phase + 1, 0

    def _close_and_lift(self, tcp: np.ndarray, first_phase: int):
        """The shared ending: hold still while closing for CLOSE_STEPS, then go straight up."""
        if self.phase == first_phase:
            if self._count == 0:
                self._hold = tcp[:2].copy()  # closing pushes the object: hold the gripper, not the object
            self._count += 1
            self._advance(self._count > CLOSE_STEPS)
            return np.array([*self._hold, GRASP_Z]), -1.0
        return np.array([*self._hold, LIFT_Z]), -1.0

    def _top(self, tcp, obj, half):
        hover = np.array([obj[0], obj[1], 2.0 * half[2] + CLEARANCE])
        if self.phase == 0:
            self._advance(np.abs(hover - tcp)[:2].max() < 0.006 and abs(hover[2] - tcp[2]) < 0.015)
            return hover, 1.0
        if self.phase == 1:
            self._advance(tcp[2] < GRASP_Z + 0.006)
            return np.array([obj[0], obj[1], GRASP_Z]), 1.0
        return self._close_and_lift(tcp, 2)

    def _side(self, tcp, obj, half):
        sign = 1.0 if self.mode == "side+x" else -1.0
        offset = sign * (PAD_HALF_X + np.hypot(half[0], half[1]) + 0.02)  # pads clear even a turned box
        beside = np.array([obj[0] + offset, obj[1], 2.0 * half[2] + CLEARANCE])
        if self.phase == 0:
            self._advance(np.abs(beside - tcp)[:2].max() < 0.01 and abs(beside[2] - tcp[2]) < 0.02)
            return beside, 1.0
        if self.phase == 1:
            self._advance(tcp[2] < GRASP_Z + 0.006)
            return np.array([beside[0], beside[1], GRASP_Z]), 1.0
        if self.phase == 2:
            self._advance(np.abs(obj[:2] - tcp[:2]).max() < 0.005)
            return np.array([obj[0], obj[1], GRASP_Z]), 1.0
        return self._close_and_lift(tcp, 3)


def run_episode(env: GraspEnv, expert: GraspExpert, seed: int, rng: np.random.Generator,
                noise_std: float = 0.0, options: dict | None = None, max_steps: int = MAX_EPISODE_STEPS) -> dict:
    """One expert episode on the unwrapped env; the executed actions carry N(0, noise_std) noise.

    Returns the observations before each action [T, OBS_DIM], the executed actions [T, 4], the
    success flag, the mode and the per-step env rewards [T].
    """
    obs, _ = env.reset(seed=seed, options=options)
    mode = expert.reset(rng)
    observations, actions, rewards, success = [], [], [], False
    for _ in range(max_steps):
        action = expert.act(obs)
        if noise_std > 0:
            action = np.clip(action + rng.normal(0.0, noise_std, size=4), -1.0, 1.0).astype(np.float32)
        observations.append(obs)
        actions.append(action)
        obs, reward, terminated, _, info = env.step(action)
        rewards.append(reward)
        success = info["is_success"]
        if terminated:
            break
    return {"obs": np.stack(observations), "actions": np.stack(actions), "rewards": np.array(rewards),
            "success": bool(success), "mode": mode}


def episode_seeds(num_episodes: int, seed: int) -> list[tuple[int, np.random.Generator]]:
    """(env seed, expert rng) per episode, all derived from one seed."""
    children = np.random.SeedSequence(seed).spawn(num_episodes)
    return [(int(c.generate_state(1)[0]), np.random.default_rng(c)) for c in children]


def evaluate_expert(num_episodes: int, seed: int = 0, noise_std: float = 0.0, options: dict | None = None,
                    mode: str | None = None) -> dict:
    """Success rate overall and per mode, mean steps of the successes, wall seconds per episode."""
    env, expert = GraspEnv(), GraspExpert(mode)
    results, start = [], time.perf_counter()
    for env_seed, rng in episode_seeds(num_episodes, seed):
        results.append(run_episode(env, expert, env_seed, rng, noise_std, options))
    elapsed = time.perf_counter() - start
    env.close()
    by_mode = {m: [r["success"] for r in results if r["mode"] == m] for m in MODES}
    steps = [len(r["actions"]) for r in results if r["success"]]
    return {
        "success_rate": float(np.mean([r["success"] for r in results])),
        "per_mode": {m: float(np.mean(s)) for m, s in by_mode.items() if s},
        "mean_steps": float(np.mean(steps)) if steps else float("nan"),
        "seconds_per_episode": elapsed / num_episodes,
    }


@dataclass
class Demos:
    """(observation at a chunk's start, the H actions executed from there) pairs, with their episodes.

    obs [N, OBS_DIM] float32, actions [N, H, 4] float32, episode [N] and step [N] int64; per episode:
    success [E] bool, mode [E] int64 (index into MODES), length [E] int64. Chunks that run past the
    end of an episode repeat its last action.
    """

    obs: np.ndarray
    actions: np.ndarray
    episode: np.ndarray
    step: np.ndarray
    success: np.ndarray
    mode: np.ndarray
    length: np.ndarray

    def successful(self) -> Demos:
        """Only the pairs from successful episodes (episode-level arrays unchanged)."""
        keep = self.success[self.episode]
        return Demos(self.obs[keep], self.actions[keep], self.episode[keep], self.step[keep],
                     self.success, self.mode, self.length)

    def save(self, path: Path):
        tmp = Path(path).with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **{f.name: getattr(self, f.name) for f in fields(self)})
        tmp.replace(path)  # atomic: a reader never sees half a file

    @classmethod
    def load(cls, path: Path) -> Demos:
        with np.load(path) as z:
            return cls(**{f.name: z[f.name] for f in fields(cls)})


def _chunks(actions: np.ndarray, horizon: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Start steps and [len(starts), H, 4] chunks of one episode, padded with its last action."""
    padded = np.concatenate([actions, np.repeat(actions[-1:], horizon - 1, axis=0)])
    starts = np.arange(0, len(actions), stride)
    return starts, np.stack([padded[s : s + horizon] for s in starts])


def _cache_file(cache_dir: Path, num_episodes: int, seed: int, noise_std: float, chunk: int, stride: int) -> Path:
    # The scene and the expert's constants enter the name, so a changed env never reads stale demos.
    source = Path(__file__).read_bytes() + MJCF.encode() + repr(RANGES).encode()
    digest = hashlib.sha256(source).hexdigest()[:10]
    return Path(cache_dir) / f"grasp_demos_n{num_episodes}_s{seed}_noise{noise_std:g}_H{chunk}_st{stride}_{digest}.npz"


def make_demos(num_episodes: int, seed: int, noise_std: float = 0.1, chunk: int = 8, stride: int = 1,
               cache_dir: str | Path | None = None) -> Demos:
    """Expert demonstrations as chunk pairs; deterministic given the arguments; cached as npz if asked."""
    if num_episodes < 1 or chunk < 1 or stride < 1 or noise_std < 0:
        raise ValueError("num_episodes, chunk and stride must be >= 1 and noise_std >= 0")
    path = None if cache_dir is None else _cache_file(cache_dir, num_episodes, seed, noise_std, chunk, stride)
    if path is not None and path.exists():
        return Demos.load(path)
    demos = _generate(num_episodes, seed, noise_std, chunk, stride)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        demos.save(path)
    return demos


def _generate(num_episodes: int, seed: int, noise_std: float, chunk: int, stride: int) -> Demos:
    env, expert = GraspEnv(), GraspExpert()
    obs, acts, episode, step, success, mode, length = [], [], [], [], [], [], []
    for e, (env_seed, rng) in enumerate(episode_seeds(num_episodes, seed)):
        ep = run_episode(env, expert, env_seed, rng, noise_std)
        starts, chunks = _chunks(ep["actions"], chunk, stride)
        obs.append(ep["obs"][starts])
        acts.append(chunks)
        episode.append(np.full(len(starts), e))
        step.append(starts)
        success.append(ep["success"])
        mode.append(MODES.index(ep["mode"]))
        length.append(len(ep["actions"]))
    env.close()
    return Demos(np.concatenate(obs).astype(np.float32), np.concatenate(acts).astype(np.float32),
                 np.concatenate(episode).astype(np.int64), np.concatenate(step).astype(np.int64),
                 np.array(success), np.array(mode, dtype=np.int64), np.array(length, dtype=np.int64))
