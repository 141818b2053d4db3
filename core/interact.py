"""Interact domains: a gymnasium environment driven by a flow policy over action chunks.

The two-level MDP of DPPO and pi-RL: at every environment decision the policy denoises an action
chunk [H, A] conditioned on the observation, the environment executes it, and so on until the
episode ends. Each chunk's denoising chain is one "sample" of an ordinary Rollout (cond = the
observation), so the log-prob of an episode is the sum of its chunks' stochastic steps and the
trainer's loss is unchanged; rewards and advantages are per episode and broadcast to its chunks.
A group is G episodes from the same initial state (the same reset seed).

``GymDomain`` makes any registered gymnasium environment id trainable from a scripted expert (or a
demonstration file) and a reward: demonstrations -> behaviour-cloned base (``flowcoach pretrain``)
-> RL (``flowcoach train``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from flowcoach.core.domain import Domain
from flowcoach.core.registry import FlowcoachError
from flowcoach.core.sampling.rollout import Rollout, cat_rollouts
from flowcoach.core.sampling.sampler import sample, time_grid

EVAL_SEED_OFFSET = 1_000_000  # held-out reset seeds start here; training seeds are drawn below it

# expert(env, rng) -> act(obs) -> action: called at each episode start, so it may keep a plan
Expert = Callable[[Any, np.random.Generator], Callable[[np.ndarray], np.ndarray]]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (well-behaved at 0% and 100%)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class InteractDomain(Domain):
    """A domain whose samples are episodes of a gymnasium environment.

    Subclasses give ``make_env`` and the chunk/episode sizes; conditions are reset seeds. Actions
    are modelled in [-1, 1]^A and mapped to the action space's bounds.
    """

    kind = "interact"
    chunk_size: int = 4
    max_chunks: int = 50
    eval_splits: tuple[str, ...] = ("eval",)  # the first is the main one; others are reported as <split>/...

    def make_env(self, render_mode: str | None = None):
        raise NotImplementedError

    def reset_options(self, split: str) -> dict | None:
        """``options`` for ``env.reset``; "ood" is the out-of-distribution evaluation split."""
        return None

    # --- shapes and conversions
    def _spaces(self):
        if not hasattr(self, "_space_cache"):
            env = self.make_env()
            self._space_cache = (env.observation_space, env.action_space)
            env.close()
        return self._space_cache

    @property
    def action_dim(self) -> int:
        return int(np.prod(self._spaces()[1].shape))

    @property
    def obs_dim(self) -> int:
        return int(np.prod(self._spaces()[0].shape))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.chunk_size, self.action_dim)

    def obs_to_cond(self, obs: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(obs, dtype=np.float32).reshape(-1))

    def to_env_actions(self, chunk: np.ndarray) -> np.ndarray:
        """[H, A] policy actions in [-1, 1] -> the action space's bounds."""
        space = self._spaces()[1]
        unit = np.clip(np.nan_to_num(chunk, nan=0.0), -1.0, 1.0)
        return (space.low + (unit + 1.0) * 0.5 * (space.high - space.low)).astype(space.dtype)

    def from_env_actions(self, actions: np.ndarray) -> np.ndarray:
        space = self._spaces()[1]
        return (2.0 * (np.asarray(actions) - space.low) / (space.high - space.low) - 1.0).astype(np.float32)

    # --- the Domain contract
    def train_conditions(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, EVAL_SEED_OFFSET, (n,), generator=generator)

    def eval_conditions(self, n: int) -> torch.Tensor:
        return EVAL_SEED_OFFSET + torch.arange(n)

    def decode(self, x: torch.Tensor) -> list:
        """Action chunks [B, H, A] -> the environment's actions, one [H, A] array per sample."""
        return [self.to_env_actions(c) for c in x.detach().float().cpu().numpy()]

    def evaluate(self, objects: list, conditions) -> dict[str, float]:
        """Success rate with its 95% interval, return, steps to success, over episodes (or chunks)."""
        episodes = [o for o in objects if isinstance(o, dict)]
        if not episodes:  # plain action chunks (check_domain): report that they are in bounds
            return {"actions_finite_rate": float(np.mean([np.isfinite(o).all() for o in objects]))}
        wins = [e["success"] for e in episodes]
        low, high = wilson_interval(int(sum(wins)), len(wins))
        to_success = [e["steps_to_success"] for e in episodes if e["success"]]
        return {
            "success_rate": float(np.mean(wins)),
            "success_ci_low": low,
            "success_ci_high": high,
            "mean_return": float(np.mean([e["return"] for e in episodes])),
            "mean_steps_to_success": float(np.mean(to_success)) if to_success else float("nan"),
            "mean_episode_steps": float(np.mean([e["steps"] for e in episodes])),
        }

    def save(self, objects: list, rewards: torch.Tensor | None, directory: Path) -> list[Path]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        rows = []
        for k, o in enumerate(objects):
            row = {k2: v for k2, v in o.items() if k2 != "frames"} if isinstance(o, dict) else {"actions": np.asarray(o).tolist()}
            if rewards is not None:
                row["reward"] = float(rewards[k])
            rows.append(row)
        path = directory / "episodes.json"
        path.write_text(json.dumps(rows, default=_jsonable))
        files = [path]
        frames = [o["frames"] for o in objects if isinstance(o, dict) and o.get("frames")]
        if frames:
            import imageio.v2 as imageio

            gif = directory / "rollouts.gif"
            imageio.mimsave(gif, [f for episode in frames[:4] for f in episode], duration=0.08, loop=0)
            files.append(gif)
        return files


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# ----------------------------------------------------------------------------- episodes
def env_pool(domain: InteractDomain, n: int, render_mode: str | None = None) -> list:
    """n environments, kept on the domain so later rollouts reuse them."""
    key = f"_flowcoach_envs_{render_mode}"
    pool = getattr(domain, key, [])
    while len(pool) < n:
        pool.append(domain.make_env(render_mode=render_mode) if render_mode else domain.make_env())
    setattr(domain, key, pool)
    return pool[:n]


@dataclass
class EpisodeNoise:
    """One generator per episode: each chunk draws its initial noise and its step noises in turn."""

    generators: list[torch.Generator]
    num_steps: int

    def draw(self, episodes: list[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        x1, noise = [], []
        for e in episodes:
            g = self.generators[e]
            x1.append(torch.randn(shape, generator=g))
            noise.append(torch.randn(self.num_steps, *shape, generator=g))
        return torch.stack(x1), torch.stack(noise)


@dataclass
class EpisodeSettings:
    law: str = "ode"
    noise_level: float = 0.0
    num_steps: int = 10
    shift: float = 1.0
    stochastic_mask: torch.Tensor | None = None  # [T] bool, or [E, T] one row per episode
    reduction: str = "mean"
    ode_solver: str | tuple[str, ...] = "euler"
    timesteps: torch.Tensor | None = None  # [T+1] or [E, T+1]; default: time_grid(num_steps, shift)
    split: str = "train"
    render: bool = False
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def play_episodes(velocity, domain: InteractDomain, seeds: torch.Tensor, group_ids: torch.Tensor,
                  settings: EpisodeSettings, noise: EpisodeNoise, device="cpu"):
    """Run one episode per seed with the flow policy, all in lockstep.

    Returns (chunk rollout or None, chunk -> episode index [N], episodes: list of dicts with
    seed, return, success, steps, steps_to_success, chunks, and frames when rendering).
    """
    n = len(seeds)
    envs = env_pool(domain, n, "rgb_array" if settings.render else None)
    grid = settings.timesteps if settings.timesteps is not None else time_grid(settings.num_steps, settings.shift)
    steps = grid.shape[-1] - 1
    options = domain.reset_options(settings.split)
    obs = [env.reset(seed=int(s), options=options)[0] for env, s in zip(envs, seeds.tolist())]
    episodes = [{"seed": int(s), "return": 0.0, "success": False, "steps": 0, "steps_to_success": None,
                 "chunks": 0, "frames": [] if settings.render else None} for s in seeds.tolist()]
    active = list(range(n))
    rollouts, owners = [], []
    for _ in range(domain.max_chunks):
        if not active:
            break
        cond = torch.stack([domain.obs_to_cond(obs[e]) for e in active]).to(device)
        x1, step_noise = noise.draw(active, tuple(domain.sample_shape))
        mask = settings.stochastic_mask if settings.stochastic_mask is not None else torch.zeros(steps, dtype=torch.bool)
        mask = mask[active] if mask.dim() == 2 else mask.expand(len(active), -1)
        r = sample(velocity, x1.to(device), grid[active] if grid.dim() == 2 else grid, cond=cond, law=settings.law,
                   noise_level=settings.noise_level, stochastic=mask, group_ids=group_ids[active],
                   reduction=settings.reduction, ode_solver=settings.ode_solver, noise=step_noise[:, :steps])
        rollouts.append(r.to("cpu"))
        owners.append(torch.tensor(active))
        chunks = domain.decode(r.samples)
        still = []
        for e, chunk in zip(active, chunks):
            ep, done = episodes[e], False
            ep["chunks"] += 1
            for action in chunk:
                obs[e], reward, terminated, truncated, info = envs[e].step(action)
                ep["return"] += float(reward)
                ep["steps"] += 1
                if info.get("is_success") and not ep["success"]:
                    ep["success"], ep["steps_to_success"] = True, ep["steps"]
                if settings.render:
                    ep["frames"].append(envs[e].render())
                if terminated or truncated:
                    done = True
                    break
            if not done:
                still.append(e)
        active = still
    for ep in episodes:
        if not ep["frames"]:
            ep.pop("frames")
    if not rollouts:
        return None, torch.zeros(0, dtype=torch.long), episodes
    return cat_rollouts(rollouts), torch.cat(owners), episodes


def collect_episodes(policy, domain: InteractDomain, cfg, step: int, device, world_size: int = 1, rank: int = 0):
    """This process's share of step ``step``'s groups of episodes (G episodes per reset seed).

    Returns (chunk rollout, chunk -> local episode index, episodes, their seeds).
    """
    from flowcoach.core.sampling.structures import get_structure
    from flowcoach.core.trainer import forward_draws, step_generator

    s = cfg.sampler
    g = step_generator(cfg.seed, step)
    all_seeds = domain.train_conditions(cfg.groups_per_step, g)
    per_process = cfg.groups_per_step // world_size
    # the step's plan for every episode (a row per episode); episodes share no state, so a plan's
    # sharing (shared_root, branch keys) does not apply here, only its masks, grids and solvers
    plan = get_structure(s.structure).plan(cfg, step, cfg.groups_per_step, g)
    plan = plan.rows(torch.arange(rank * per_process * cfg.group_size, (rank + 1) * per_process * cfg.group_size))
    groups = torch.arange(rank * per_process, (rank + 1) * per_process)
    seeds = all_seeds[groups].repeat_interleave(cfg.group_size)
    group_ids = groups.repeat_interleave(cfg.group_size)
    episode_ids = group_ids * cfg.group_size + torch.arange(len(group_ids)) % cfg.group_size
    noise = EpisodeNoise([step_generator(cfg.seed, step, stream=10_000 + int(e)) for e in episode_ids], s.num_steps)
    settings = EpisodeSettings(law=s.law, noise_level=s.noise_level, num_steps=s.num_steps, shift=s.shift,
                               stochastic_mask=plan.stochastic, reduction=s.logprob_reduction, ode_solver=plan.solvers,
                               timesteps=plan.timesteps)
    rollout, owner, episodes = play_episodes(policy.sampling_model(), domain, seeds, group_ids, settings, noise, device)
    if plan.adv_groups is not None:
        rollout.adv_groups = plan.adv_groups[owner]
    if cfg.loss.family != "ratio":  # forward-process draws of each chunk, from its episode and index
        index = torch.zeros(len(owner), dtype=torch.long)
        seen: dict[int, int] = {}
        for r, e in enumerate(owner.tolist()):
            index[r] = seen.get(e, 0)
            seen[e] = index[r].item() + 1
        gens = [step_generator(cfg.seed, step, stream=20_000_000 + int(episode_ids[e]) * 1_000 + int(c))
                for e, c in zip(owner.tolist(), index.tolist())]
        rollout.fwd_t, rollout.fwd_noise = forward_draws(cfg, time_grid(s.num_steps, s.shift), tuple(domain.sample_shape), gens)
    return rollout, owner, episodes, seeds


def evaluate_episodes(model, domain: InteractDomain, seeds: torch.Tensor, num_steps: int, shift: float = 1.0,
                      split: str = "eval", render: bool = False, device="cpu") -> list[dict]:
    """Deterministic (ODE) episodes from the given reset seeds."""
    noise = EpisodeNoise([torch.Generator().manual_seed(int(s)) for s in seeds], num_steps)
    settings = EpisodeSettings(num_steps=num_steps, shift=shift, split=split, render=render)
    _, _, episodes = play_episodes(model, domain, seeds, torch.arange(len(seeds)), settings, noise, device)
    return episodes


# ----------------------------------------------------------------------------- demonstrations
def make_demonstrations(domain: InteractDomain, expert: Expert, num_episodes: int, seed: int,
                        action_noise: float = 0.0, split: str = "train") -> dict[str, np.ndarray]:
    """Run the expert (with Gaussian action noise) and cut its episodes into (obs, chunk) pairs.

    Returns obs [N, O] (the observation at each chunk's start), chunks [N, H, A] in [-1, 1] policy
    units, and per-episode success. Deterministic given the seed.
    """
    rng = np.random.default_rng(seed)
    env = domain.make_env()
    options = domain.reset_options(split)
    space = env.action_space
    obs_rows, chunk_rows, successes = [], [], []
    for k in range(num_episodes):
        obs, _ = env.reset(seed=int(seed * 100_003 + k), options=options)
        act = expert(env, rng)
        actions, observations, success = [], [], False
        for _ in range(domain.max_chunks * domain.chunk_size):
            a = np.asarray(act(obs), dtype=np.float64)
            a = np.clip(a + action_noise * rng.standard_normal(a.shape) * (space.high - space.low) / 2, space.low, space.high)
            observations.append(np.asarray(obs, dtype=np.float32).reshape(-1))
            actions.append(domain.from_env_actions(a))
            obs, _, terminated, truncated, info = env.step(a.astype(space.dtype))
            success = success or bool(info.get("is_success"))
            if terminated or truncated:
                break
        H = domain.chunk_size
        padded = actions + [actions[-1]] * ((-len(actions)) % H)  # the last chunk repeats its final action
        for start in range(0, len(actions), H):
            obs_rows.append(observations[start])
            chunk_rows.append(np.stack(padded[start:start + H]))
        successes.append(success)
    env.close()
    return {"obs": np.stack(obs_rows).astype(np.float32), "chunks": np.stack(chunk_rows).astype(np.float32),
            "success": np.array(successes)}


class NormalizedChunkVelocity(torch.nn.Module):
    """Flow policy over action chunks: the observation is standardised (statistics stored with the
    weights), the chunk flattened through an MLP velocity field."""

    def __init__(self, chunk_size: int, action_dim: int, obs_mean: list[float], obs_std: list[float],
                 width: int = 256, depth: int = 3):
        super().__init__()
        from flowcoach.core.nets.mlp import MLPVelocity

        self.shape = (chunk_size, action_dim)
        self.register_buffer("obs_mean", torch.tensor(obs_mean, dtype=torch.float32))
        self.register_buffer("obs_std", torch.tensor(obs_std, dtype=torch.float32))
        self.net = MLPVelocity(dim=chunk_size * action_dim, width=width, depth=depth, cond_dim=len(obs_mean))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        obs = (cond.float() - self.obs_mean) / self.obs_std
        v = self.net(x_t.reshape(x_t.shape[0], -1), t, obs)
        return v.reshape(x_t.shape)


class GymDomain(InteractDomain):
    """Any gymnasium environment id + a scripted expert (or a demonstration .npz) + rewards.

    ``success_fn(info) -> bool`` marks success when the environment does not set
    ``info["is_success"]``. The base policy is behaviour cloning (flow matching) on the expert's
    noisy demonstrations; the default rewards are the episode return, or success when defined.
    """

    def __init__(self, env_id: str, expert: Expert | None = None, demo_file: str | None = None, name: str | None = None,
                 chunk_size: int = 4, max_chunks: int = 50, num_demo_episodes: int = 200, demo_noise: float = 0.1,
                 rewards: dict[str, float] | None = None, env_kwargs: dict | None = None,
                 success_fn: Callable[[dict], bool] | None = None, model_width: int = 256, model_depth: int = 3,
                 base_dir: str | None = None, cache_dir: str = "runs/cache"):
        if expert is None and demo_file is None:
            raise FlowcoachError(f"GymDomain('{env_id}') needs an expert or a demo_file to learn from")
        self.env_id, self.expert, self.demo_file = env_id, expert, demo_file
        self.name = name or env_id.lower().replace("/", "-")
        self.chunk_size, self.max_chunks = chunk_size, max_chunks
        self.num_demo_episodes, self.demo_noise = num_demo_episodes, demo_noise
        self.rewards = rewards or {"episode-return": 1.0}
        self.env_kwargs = env_kwargs or {}
        self.success_fn = success_fn
        self.model_width, self.model_depth = model_width, model_depth
        self.base_dir, self.cache_dir = base_dir, cache_dir

    def make_env(self, render_mode: str | None = None):
        import gymnasium

        try:
            env = gymnasium.make(self.env_id, render_mode=render_mode, **self.env_kwargs)
        except gymnasium.error.Error as e:
            raise FlowcoachError(f"gymnasium cannot make '{self.env_id}': {e}") from e
        return SuccessInfo(env, self.success_fn) if self.success_fn else env

    def demonstrations(self) -> dict[str, np.ndarray]:
        if self.demo_file is not None:
            with np.load(self.demo_file) as f:
                return {k: f[k] for k in f.files}
        path = Path(self.cache_dir) / f"{self.name}__demos__{self.num_demo_episodes}__{self.demo_noise}__{self.chunk_size}.npz"
        if path.exists():
            with np.load(path) as f:
                return {k: f[k] for k in f.files}
        demos = make_demonstrations(self, self.expert, self.num_demo_episodes, seed=0, action_noise=self.demo_noise)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **demos)
        return demos

    def data(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        demos = self.demonstrations()
        return torch.as_tensor(demos["chunks"]), torch.as_tensor(demos["obs"])

    def model_config(self) -> dict:
        obs = self.demonstrations()["obs"]
        return {"chunk_size": self.chunk_size, "action_dim": self.action_dim,
                "obs_mean": obs.mean(0).tolist(), "obs_std": (obs.std(0) + 1e-3).tolist(),
                "width": self.model_width, "depth": self.model_depth}

    def build_model(self, **config) -> NormalizedChunkVelocity:
        return NormalizedChunkVelocity(**config)

    def base_checkpoint(self) -> Path | None:
        return Path(self.base_dir) if self.base_dir else None

    def default_rewards(self) -> dict[str, float]:
        return dict(self.rewards)


class SuccessInfo:
    """Wraps an env so that ``info["is_success"]`` follows ``success_fn(info)``."""

    def __init__(self, env, success_fn):
        self._env, self._fn = env, success_fn

    def __getattr__(self, name):
        return getattr(self._env, name)

    def step(self, action):
        obs, reward, terminated, truncated, info = self._env.step(action)
        info = {**info, "is_success": bool(self._fn(info))}
        return obs, reward, terminated, truncated, info

    def reset(self, **kwargs):
        return self._env.reset(**kwargs)
