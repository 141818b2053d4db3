"""The grasping domain as a whole (domains/grasping/__init__.py): the contract, the shipped base against
its recorded figures, seeded rollouts, episode log-probs, one RL step and its evaluator metrics, the GIF.

The env and the expert have their own tests (test_grasping_env.py). ~20 s on 2 cores.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from flowcoach.core.algorithms import algorithm_defaults  # noqa: E402
from flowcoach.core.checkpoint import load_base  # noqa: E402
from flowcoach.core.domain import check_domain  # noqa: E402
from flowcoach.core.interact import EpisodeNoise, EpisodeSettings, evaluate_episodes, play_episodes  # noqa: E402
from flowcoach.core.sampling.laws import law_mean_std  # noqa: E402
from flowcoach.core.trainer import train  # noqa: E402
from flowcoach.domains.grasping import GraspingDomain  # noqa: E402


@pytest.fixture(scope="module")
def domain():
    return GraspingDomain()


@pytest.fixture(scope="module")
def base(domain):
    model, record = load_base(domain)
    return model.eval(), record


def stochastic_settings(num_steps=4, reduction="sum"):
    mask = torch.ones(num_steps, dtype=torch.bool)
    mask[-1] = False  # Flow-GRPO's deterministic last step
    return EpisodeSettings(law="flow-sde", noise_level=0.7, num_steps=num_steps, stochastic_mask=mask,
                           reduction=reduction)


def play(model, domain, seeds, settings, streams):
    noise = EpisodeNoise([torch.Generator().manual_seed(s) for s in streams], settings.num_steps)
    return play_episodes(model, domain, torch.tensor(seeds), torch.arange(len(seeds)) // 2, settings, noise)


def test_check_domain_passes_with_the_shipped_base(domain):
    passed = check_domain(domain)
    assert "episodes run in the environment" in passed and "base checkpoint loads" in passed


def test_shipped_base_reproduces_its_recorded_figures(domain, base):
    # The held-out split is recomputed in full (the same batch of seeds); the OOD split, the slower half
    # (its failures run to the time limit), is left to benchmarks/grasping. On the machine that made the
    # base the figures repeat bit for bit; on another CPU (AVX-512 Xeon vs the AMD EPYC that made it)
    # the matmul kernels round differently and contact dynamics amplify that, so a few of the 200
    # episodes flip (measured: 0.595 vs 0.605). The tolerance is 6 episodes.
    model, record = base
    recorded = record["eval"]
    assert recorded["num_samples"] >= 100  # the issue asks for >= 100 held-out seeds
    seeds = domain.eval_conditions(recorded["num_samples"])
    episodes = evaluate_episodes(model, domain, seeds, recorded["num_steps"], split=domain.eval_splits[0])
    metrics = domain.evaluate(episodes, seeds)
    assert metrics["success_rate"] == pytest.approx(recorded["metrics"]["success_rate"], abs=6 / recorded["num_samples"])
    for key in ("mean_steps_to_success", "mean_return"):
        assert metrics[key] == pytest.approx(recorded["metrics"][key], rel=0.05), key
    # an imperfect base, so RL has something to fix, and far worse out of distribution
    assert 0.4 <= metrics["success_rate"] <= 0.75
    assert recorded["metrics"]["ood/success_rate"] < metrics["success_rate"]
    assert recorded["metrics"]["denoising_steps_per_action"] == recorded["num_steps"] / domain.chunk_size
    assert [e["seed"] for e in episodes] == seeds.tolist() and min(seeds.tolist()) >= 1_000_000


def test_stochastic_rollouts_are_seeded(domain, base):
    model, _ = base
    settings = stochastic_settings()
    r1, owner1, ep1 = play(model, domain, [5, 5, 9, 9], settings, streams=[0, 1, 2, 3])
    r2, owner2, ep2 = play(model, domain, [5, 5, 9, 9], settings, streams=[0, 1, 2, 3])
    assert ep1 == ep2 and torch.equal(owner1, owner2)
    assert torch.equal(r1.states, r2.states) and torch.equal(r1.log_probs, r2.log_probs)
    # other noise, other episodes: the randomness is the noise, not hidden state
    r3, _, ep3 = play(model, domain, [5, 5, 9, 9], settings, streams=[10, 11, 12, 13])
    assert not torch.equal(r3.states[:4], r1.states[:4])


def test_episode_log_prob_is_the_sum_of_its_chunks_steps(domain, base):
    model, _ = base
    settings = stochastic_settings(num_steps=4)
    rollout, owner, episodes = play(model, domain, [3, 3], settings, streams=[7, 8])
    assert [e["chunks"] for e in episodes] == [int((owner == k).sum()) for k in range(2)]
    assert all(e["chunks"] >= 3 for e in episodes)  # several chunks, so the sum is over the outer MDP too
    for k in range(2):
        rows = (owner == k).nonzero().flatten().tolist()
        total = 0.0  # independently: each stochastic transition's Gaussian from torch.distributions
        for i in rows:
            for j in range(3):
                x, t = rollout.states[i : i + 1, j], rollout.timesteps[j : j + 1]
                t_next = rollout.timesteps[j + 1 : j + 2]
                with torch.no_grad():
                    v = model(x, t, rollout.cond[i : i + 1])
                mean, std = law_mean_std("flow-sde", x, v, t, t_next, 0.7)
                total += torch.distributions.Normal(mean, std).log_prob(rollout.states[i : i + 1, j + 1]).sum().item()
        assert rollout.log_probs[rows].sum().item() == pytest.approx(total, rel=1e-4)
        assert torch.all(rollout.log_probs[rows, 3] == 0)  # the deterministic last step has no log-prob


def test_one_rl_step_writes_the_evaluator_metrics(tmp_path, domain):
    cfg = algorithm_defaults("flow-grpo")
    cfg.steps, cfg.groups_per_step, cfg.group_size, cfg.eval_samples = 1, 2, 2, 4
    cfg.sampler.num_steps, cfg.sampler.eval_num_steps, cfg.sampler.logprob_reduction = 3, 2, "sum"
    cfg.tensorboard, cfg.sample_every, cfg.output_dir = False, 0, str(tmp_path)
    run = train(cfg, domain=domain)
    (row,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("eval/success_rate", "eval/success_ci_low", "eval/ood/success_rate", "eval/mean_steps_to_success"):
        assert key in row, key
    assert row["eval/denoising_steps_per_action"] == 2 / domain.chunk_size
    assert row["train/pairs"] > 0 and torch.isfinite(torch.tensor(row["policy/loss"]))
    saved = json.loads((run / "eval" / "samples" / "episodes.json").read_text())
    assert len(saved) == 4 and all("success" in e and "frames" not in e for e in saved)


GIF_SCRIPT = """
import json, pathlib, sys
import torch
from flowcoach.core.checkpoint import load_base
from flowcoach.core.interact import evaluate_episodes
from flowcoach.domains.grasping import GraspingDomain
domain = GraspingDomain()
model, _ = load_base(domain)
episodes = evaluate_episodes(model, domain, domain.eval_conditions(1), num_steps=2, render=True)
files = domain.save(episodes, None, pathlib.Path(sys.argv[1]))
ep = episodes[0]
print(json.dumps({"files": [str(f) for f in files], "frames": len(ep["frames"]), "steps": ep["steps"]}))
"""


def test_rollout_gif_is_written_when_egl_renders(tmp_path):
    # MUJOCO_GL is read when mujoco is imported, so the render runs in a fresh interpreter.
    env = {**os.environ, "MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl"}
    proc = subprocess.run([sys.executable, "-c", GIF_SCRIPT, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"
        if "egl" in proc.stderr.lower() or "opengl" in proc.stderr.lower():
            pytest.skip(f"EGL rendering unavailable here: {err}")
        pytest.fail(f"GIF script failed: {err}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    gif = tmp_path / "rollouts.gif"
    assert str(gif) in result["files"] and gif.stat().st_size > 1000
    assert result["frames"] == result["steps"] > 0  # one frame per control step
