"""The trainer end to end on the toy domain: on-policy ratio, determinism, resume, reward rise."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowcoach.core.algorithms import algorithm_defaults
from flowcoach.core.checkpoint import load_base, list_checkpoints
from flowcoach.core.domain import get_domain
from flowcoach.core.policy import FlowPolicy
from flowcoach.core.registry import FlowcoachError
from flowcoach.core.trainer import (collect_rollout, pair_losses, plan_batches, recompute_log_probs,
                                    step_generator, train)
from flowcoach.domains.toy import ToyDomain

TIME_KEYS = ("time/",)


def small_config(tmp_path, **overrides):
    cfg = algorithm_defaults("flow-grpo")
    cfg.output_dir = str(tmp_path / "runs")
    cfg.groups_per_step, cfg.group_size = 4, 4
    cfg.steps, cfg.eval_samples = 2, 64
    cfg.tensorboard, cfg.sample_every, cfg.checkpoint_every = False, 0, 1000
    for key, value in overrides.items():
        target = cfg
        *path, last = key.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, last, value)
    return cfg


def read_metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(TIME_KEYS)} for row in rows]


def final_weights(run_dir: Path) -> dict:
    return load_file(list_checkpoints(run_dir)[-1] / "trainable.safetensors")


@pytest.mark.parametrize("micro_batch,recompute", [(16, False), (1000, False), (7, True), (1, True)])
def test_ratio_is_exactly_one_on_policy(tmp_path, micro_batch, recompute):
    domain = ToyDomain()
    cfg = small_config(tmp_path, micro_batch=micro_batch)
    policy = FlowPolicy(load_base(domain)[0])
    rollout = collect_rollout(policy, domain, cfg, 0, "cpu")
    pairs = rollout.trained_pairs()
    pairs = pairs[torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))]
    old = recompute_log_probs(policy, rollout, [pairs], micro_batch, "cpu") if recompute else None
    adv = torch.randn(rollout.batch_size)
    for micro in pairs.split(micro_batch):
        _, info = pair_losses(policy, rollout, micro, adv, cfg, old)
        assert torch.equal(info["ratio"], torch.ones_like(info["ratio"]))
        assert info["clipped"].sum() == 0


def test_tiny_micro_batches_are_not_batch_invariant_but_stay_far_inside_the_clip(tmp_path):
    # Why recompute_old_log_probs exists: a 7-row matmul takes another kernel than the rollout's 16.
    domain = ToyDomain()
    cfg = small_config(tmp_path)
    policy = FlowPolicy(load_base(domain)[0])
    rollout = collect_rollout(policy, domain, cfg, 0, "cpu")
    for micro in rollout.trained_pairs().split(7):
        _, info = pair_losses(policy, rollout, micro, torch.randn(16), cfg)
        assert (info["ratio"] - 1).abs().max() < 1e-5 < cfg.resolved_clip()[0] and info["clipped"].sum() == 0


def test_metrics_of_a_run_show_ratio_one_before_the_update(tmp_path):
    run = train(small_config(tmp_path, steps=1, micro_batch=5, recompute_old_log_probs=True))
    row = read_metrics(run)[0]
    assert row["policy/ratio_mean"] == 1.0 and row["policy/clipfrac"] == 0.0 and row["policy/approx_kl"] == 0.0


class PartlyFrozenToy(ToyDomain):
    """The toy with its input layer frozen: RL must leave it bit-identical."""

    def build_model(self, **config):
        model = super().build_model(**config)
        model.inp.requires_grad_(False)
        return model


def test_trainable_parameters_change_and_frozen_ones_do_not(tmp_path):
    domain = PartlyFrozenToy()
    base, _ = load_base(domain)
    run = train(small_config(tmp_path, steps=1, checkpoint_every=1), domain=domain)
    trained = final_weights(run)
    assert not any(name.startswith("inp.") for name in trained)
    base_params = dict(base.named_parameters())
    for name, value in trained.items():
        assert not torch.equal(value, base_params[name].detach()), f"{name} did not change"
    from flowcoach.core.checkpoint import load_trained

    model = load_trained(domain, run, use_ema=False)
    assert torch.equal(model.inp.weight, base.inp.weight) and torch.equal(model.inp.bias, base.inp.bias)


def test_same_seed_same_metrics_and_weights(tmp_path):
    a = train(small_config(tmp_path / "a", steps=3))
    b = train(small_config(tmp_path / "b", steps=3))
    assert read_metrics(a) == read_metrics(b)
    wa, wb = final_weights(a), final_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = train(small_config(tmp_path / "c", steps=3, seed=1))
    assert read_metrics(c) != read_metrics(a)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    kwargs = dict(checkpoint_every=2, **{"optim.ema_decay": 0.9, "loss.kl_beta": 0.01})
    straight = train(small_config(tmp_path / "straight", steps=4, **kwargs))
    first = train(small_config(tmp_path / "split", steps=2, **kwargs))
    resumed = train(small_config(tmp_path / "split", steps=4, resume="latest", **kwargs))
    assert resumed == first
    assert "steps: 4" in (resumed / "config.yaml").read_text()
    # the split run evaluated at its end (step 2); everything else is the same, number for number
    without_eval = lambda rows: [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in rows]
    assert without_eval(read_metrics(resumed)) == without_eval(read_metrics(straight))
    assert read_metrics(resumed)[-1] == read_metrics(straight)[-1]
    ws, wr = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(ws[k], wr[k]) for k in ws)
    ema_s = torch.load(list_checkpoints(straight)[-1] / "ema.pt", weights_only=False)
    ema_r = torch.load(list_checkpoints(resumed)[-1] / "ema.pt", weights_only=False)
    assert all(torch.equal(x, y) for x, y in zip(ema_s["shadow_params"], ema_r["shadow_params"]))


def test_flow_grpo_raises_the_toy_reward(tmp_path):
    # Base: ~1/8 of the samples on the target mode (eval reward ~0.11). 40 steps take ~10 s here.
    cfg = small_config(tmp_path, steps=40, groups_per_step=16, group_size=8, eval_samples=500)
    run = train(cfg)
    rows = read_metrics(run)
    first = sum(r["reward/mean"] for r in rows[:5]) / 5
    last = sum(r["reward/mean"] for r in rows[-5:]) / 5
    final_eval = rows[-1]["eval/reward_mean"]
    base_eval = load_base(ToyDomain())[1]["eval"]["metrics"]["reward_mean"]
    assert last > first + 0.25, (first, last)
    assert final_eval > base_eval + 0.3, (base_eval, final_eval)
    assert rows[-1]["eval/target_hit_rate"] > 0.5


class NaNRewardToy(ToyDomain):
    """Decodes one sample of every rollout to NaN: its reward is then non-finite."""

    def default_rewards(self):
        return {"tests.core.test_trainer:nan_reward": 1.0}


def nan_reward(objects, conditions):
    scores = torch.ones(len(objects))
    scores[0] = float("nan")
    return scores, {}


def test_non_finite_reward_is_reported_and_the_step_skipped(tmp_path, capsys):
    domain = NaNRewardToy()
    base, _ = load_base(domain)
    run = train(small_config(tmp_path, steps=1, checkpoint_every=1), domain=domain)
    row = read_metrics(run)[0]
    assert row["skipped/nonfinite_reward"] == 1 and row["skipped/steps_total"] == 1
    out = capsys.readouterr().out
    assert "non-finite reward" in out
    assert "1 RL step(s) made no update (non-finite rewards)" in out  # the run's end says it too
    state = json.loads((list_checkpoints(run)[-1] / "state.json").read_text())
    assert state["totals"]["skipped_steps"] == 1  # kept for a resumed run to count on
    trained = final_weights(run)
    base_params = dict(base.named_parameters())
    assert all(torch.equal(v, base_params[k].detach()) for k, v in trained.items())


def test_batch_arithmetic_is_validated(tmp_path):
    cfg = small_config(tmp_path)
    plan = plan_batches(cfg, world_size=1)
    assert plan.samples_per_process == 16 and plan.trained_steps_per_sample == 9 and plan.pairs_per_process == 144
    assert plan_batches(cfg, world_size=2).samples_per_process == 8
    with pytest.raises(FlowcoachError, match="multiple of 3"):
        plan_batches(cfg, world_size=3)
    with pytest.raises(FlowcoachError, match="group_size must be >= 2"):
        plan_batches(small_config(tmp_path, group_size=1), 1)
    with pytest.raises(FlowcoachError, match="noise_level must be >= 0"):
        plan_batches(small_config(tmp_path, **{"sampler.noise_level": -0.1}), 1)
    cfg.micro_batch = 50
    assert plan_batches(cfg, 1).grad_accumulation == 3


def test_sde_window_trains_only_the_window(tmp_path):
    cfg = small_config(tmp_path, **{"sampler.sde_window_size": 2, "sampler.sde_window_range": (0, 4)})
    rollout = collect_rollout(FlowPolicy(load_base(ToyDomain())[0]), ToyDomain(), cfg, 0, "cpu")
    steps = rollout.stochastic.any(dim=0).nonzero().flatten().tolist()
    assert len(steps) == 2 and steps[1] == steps[0] + 1 and steps[0] < 4
    assert rollout.stochastic.all(dim=0)[steps].all()  # the window is shared by the batch
    assert plan_batches(cfg, 1).trained_steps_per_sample == 2


def test_same_noise_in_group(tmp_path):
    cfg = small_config(tmp_path, **{"sampler.same_noise_in_group": True})
    rollout = collect_rollout(FlowPolicy(load_base(ToyDomain())[0]), ToyDomain(), cfg, 0, "cpu")
    x1 = rollout.states[:, 0]
    assert torch.equal(x1[0], x1[3]) and not torch.equal(x1[0], x1[4])
    assert not torch.equal(rollout.samples[0], rollout.samples[1])  # the SDE noise still differs


def test_unknown_names_list_the_choices(tmp_path):
    with pytest.raises(FlowcoachError, match="choose one of: .*toy"):
        train(small_config(tmp_path, domain="nope"))
    with pytest.raises(FlowcoachError, match="choose one of: .*flow-grpo"):
        train(small_config(tmp_path, algo="nope"))
    with pytest.raises(FlowcoachError, match="no base model"):
        train(small_config(tmp_path, base=str(tmp_path / "missing")))
