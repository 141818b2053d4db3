"""The interact path (two-level MDP) on a tiny point-reaching environment written here."""

import gymnasium
import numpy as np
import pytest
import torch

from flowcoach.core.algorithms import algorithm_defaults
from flowcoach.core.domain import check_domain
from flowcoach.core.interact import (EpisodeNoise, EpisodeSettings, GymDomain, evaluate_episodes, play_episodes,
                                     wilson_interval)
from flowcoach.core.pretrain import PretrainConfig, pretrain
from flowcoach.core.sampling.laws import law_mean_std
from flowcoach.core.trainer import train


class PointReach(gymnasium.Env):
    """A point on a line must reach a target drawn at reset; success within 0.05."""

    def __init__(self, render_mode=None):
        self.observation_space = gymnasium.spaces.Box(-2, 2, (2,), np.float32)
        self.action_space = gymnasium.spaces.Box(-0.2, 0.2, (1,), np.float32)
        self.render_mode = render_mode

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.pos = float(self.np_random.uniform(-1, 1))
        self.target = float(self.np_random.uniform(-1, 1))
        self.t = 0
        return self._obs(), {}

    def _obs(self):
        return np.array([self.pos, self.target], dtype=np.float32)

    def step(self, action):
        self.pos = float(np.clip(self.pos + float(np.asarray(action).reshape(-1)[0]), -2, 2))
        self.t += 1
        dist = abs(self.pos - self.target)
        success = dist < 0.05
        return self._obs(), -dist, success, self.t >= 24, {"is_success": success}


if "flowcoach-test/PointReach-v0" not in gymnasium.registry:
    gymnasium.register("flowcoach-test/PointReach-v0", entry_point=PointReach)


def greedy_expert(env, rng):
    overshoot = rng.choice([0.5, 1.0])  # two styles: cautious and direct (multimodal demonstrations)

    def act(obs):
        return np.clip([overshoot * (obs[1] - obs[0])], -0.2, 0.2)

    return act


def make_domain(tmp_path, **kw):
    return GymDomain("flowcoach-test/PointReach-v0", expert=greedy_expert, name="point-reach", chunk_size=4,
                     max_chunks=6, num_demo_episodes=60, demo_noise=0.3, model_width=64, model_depth=2,
                     rewards={"episode-success": 1.0, "episode-return": 0.5}, cache_dir=str(tmp_path / "cache"), **kw)


def test_wilson_interval():
    low, high = wilson_interval(50, 100)
    assert abs(low - 0.4038) < 1e-3 and abs(high - 0.5962) < 1e-3
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


def test_demonstrations_are_deterministic_and_chunked(tmp_path):
    domain = make_domain(tmp_path)
    x0, obs = domain.data("train")
    x0b, obsb = make_domain(tmp_path / "other").data("train")
    assert torch.equal(x0, x0b) and torch.equal(obs, obsb)
    assert x0.shape[1:] == (4, 1) and obs.shape[1] == 2 and x0.abs().max() <= 1.0
    assert domain.demonstrations()["success"].mean() > 0.9


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interact")
    domain = make_domain(tmp)
    base = pretrain(PretrainConfig(steps=300, batch_size=128, lr=3e-3, eval_samples=16, eval_num_steps=4,
                                   output=str(tmp / "base")), domain=domain)
    return tmp, base


def test_check_domain_passes_for_an_interact_domain(pretrained):
    tmp, base = pretrained
    passed = check_domain(make_domain(tmp, base_dir=str(base)))
    assert "episodes run in the environment" in passed and "base checkpoint loads" in passed


def test_episode_log_prob_is_the_sum_of_its_chunks_steps(pretrained):
    tmp, base = pretrained
    from flowcoach.core.checkpoint import load_base

    domain = make_domain(tmp, base_dir=str(base))
    model, _ = load_base(domain)
    seeds = torch.tensor([3, 3, 7])
    settings = EpisodeSettings(law="flow-sde", noise_level=0.7, num_steps=5,
                               stochastic_mask=torch.tensor([True, True, True, True, False]), reduction="sum")
    noise = EpisodeNoise([torch.Generator().manual_seed(k) for k in range(3)], 5)
    rollout, owner, episodes = play_episodes(model, domain, seeds, torch.tensor([0, 0, 1]), settings, noise)
    assert [e["chunks"] for e in episodes] == [int((owner == k).sum()) for k in range(3)]
    for k in range(3):
        rows = (owner == k).nonzero().flatten()
        # independent: recompute every transition's Gaussian with torch.distributions, sum over chunks and steps
        total = 0.0
        for i in rows.tolist():
            for j in range(4):
                x, t = rollout.states[i : i + 1, j], rollout.timesteps[j : j + 1]
                v = model(x, t, rollout.cond[i : i + 1])
                mean, std = law_mean_std("flow-sde", x, v, t, rollout.timesteps[j + 1 : j + 2], 0.7)
                total += torch.distributions.Normal(mean, std).log_prob(rollout.states[i : i + 1, j + 1]).sum().item()
        assert abs(rollout.log_probs[rows].sum().item() - total) < 1e-3 * abs(total)
    # the two episodes of seed 3 start in the same state but take different actions
    assert episodes[0]["seed"] == episodes[1]["seed"]
    first = rollout.cond[owner == 0][0], rollout.cond[owner == 1][0]
    assert torch.equal(*first) and not torch.equal(rollout.samples[owner == 0][0], rollout.samples[owner == 1][0])


def test_evaluation_is_deterministic(pretrained):
    tmp, base = pretrained
    from flowcoach.core.checkpoint import load_base

    domain = make_domain(tmp, base_dir=str(base))
    model, _ = load_base(domain)
    a = evaluate_episodes(model, domain, domain.eval_conditions(8), num_steps=4)
    b = evaluate_episodes(model, domain, domain.eval_conditions(8), num_steps=4)
    assert a == b and len(a) == 8


def test_flow_grpo_trains_an_interact_domain_and_resumes(pretrained):
    tmp, base = pretrained
    domain = make_domain(tmp, base_dir=str(base))
    cfg = algorithm_defaults("flow-grpo")
    cfg.groups_per_step, cfg.group_size, cfg.steps, cfg.eval_samples = 4, 4, 3, 16
    cfg.sampler.num_steps, cfg.sampler.eval_num_steps = 4, 4
    cfg.tensorboard, cfg.checkpoint_every, cfg.sample_every = False, 2, 3
    cfg.output_dir = str(tmp / "runs")
    run = train(cfg, domain=domain)
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["policy/ratio_mean"] == 1.0 and rows[0]["train/pairs"] > 0
    assert {"eval/success_rate", "eval/success_ci_low", "eval/mean_steps_to_success"} <= set(rows[-1])
    assert (run / "samples" / "step-3" / "episodes.json").exists()
    cfg2 = algorithm_defaults("flow-grpo")
    cfg2.output_dir, cfg2.resume, cfg2.steps = cfg.output_dir, str(run), 4
    resumed = train(cfg2, domain=domain)
    assert resumed == run
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
