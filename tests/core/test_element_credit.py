"""Per-element credit (--loss.element-weight): the log-prob's factorisation over elements, the
element advantages, and the loss gradient, each against an independent computation."""

import math

import numpy as np
import pytest
import torch

from flowcoach.core.advantages import element_advantages
from flowcoach.core.checkpoint import load_base
from flowcoach.core.policy import FlowPolicy
from flowcoach.core.registry import FlowcoachError
from flowcoach.core.sampling.laws import gaussian_log_prob, gaussian_log_prob_elements, law_mean_std
from flowcoach.core.trainer import (ElementCredit, collect_rollout, element_log_probs, pair_losses,
                                    recompute_log_probs, train)
from flowcoach.domains.toy import ToyDomain
from flowcoach.rewards.toy import mode_centres
from tests.core.test_trainer import read_metrics, small_config


class ElementToy(ToyDomain):
    """The toy with a reward per coordinate: each one's closeness to the target mode's."""

    def element_rewards(self, objects, conditions):
        x = torch.as_tensor(np.stack(objects)).reshape(-1, 2)
        return -(x - mode_centres()[torch.as_tensor(conditions).long()]) ** 2


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_element_shares_are_each_element_s_gaussian_and_sum_to_the_joint(reduction):
    g = torch.Generator().manual_seed(0)
    x_next, mean = torch.randn(5, 4, 3, generator=g), torch.randn(5, 4, 3, generator=g)
    std = torch.rand(5, generator=g) + 0.1
    shares = gaussian_log_prob_elements(x_next, mean, std, reduction)
    per_dim = torch.distributions.Normal(mean, std[:, None, None]).log_prob(x_next)
    truth = per_dim.sum(dim=2) / (12 if reduction == "mean" else 1)
    assert torch.allclose(shares, truth, atol=1e-5)
    assert torch.allclose(shares.sum(dim=1), gaussian_log_prob(x_next, mean, std, reduction), atol=1e-5)


def test_element_advantages_by_hand():
    nan = float("nan")
    # group 0: rows (1, 0, -) and (0, 0, -): row means (0.5, 0), centred (+-0.5, 0), group std sqrt(1/8)
    # group 1: every element equal -> no element signal, the sample advantage alone
    rewards = torch.tensor([[1.0, 0.0, nan], [0.0, 0.0, nan], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    adv, credited, signal, _ = element_advantages(torch.tensor([0.3, -0.3, 0.2, -0.2]), rewards,
                                                  torch.tensor([0, 0, 1, 1]), weight=2.0, eps=0.0)
    z = 0.5 / math.sqrt(1 / 8)
    expected = torch.tensor([[0.3 + 2 * z, 0.3, 0.0], [-0.3 - 2 * z, -0.3, 0.0], [0.2] * 3, [-0.2] * 3])
    assert torch.allclose(adv, expected, atol=1e-5)
    assert credited.tolist() == [[True, True, False], [True, True, False]] + [[True] * 3] * 2
    assert signal.tolist() == [True, True, False, False]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_on_policy_element_loss_gradient_is_the_factorised_policy_gradient(tmp_path, reduction):
    """The gradient of the element loss at ratio 1 is -sum A_{b,e} grad log N_e(x_next | x), each log N_e
    computed here with torch.distributions; with one advantage per sample (weight 0) it is exactly the
    per-sample loss's gradient."""
    domain = ToyDomain()
    cfg = small_config(tmp_path)
    cfg.sampler.logprob_reduction = reduction
    policy = FlowPolicy(load_base(domain)[0])
    rollout = collect_rollout(policy, domain, cfg, 0, "cpu")
    pairs = rollout.trained_pairs()
    old = element_log_probs(policy, rollout, pairs, 1000, "cpu")
    B = rollout.batch_size
    sample_adv = torch.randn(B, generator=torch.Generator().manual_seed(1))
    element_adv = torch.randn(B, 2, generator=torch.Generator().manual_seed(2))
    params = policy.trainable_parameters()

    def grads(loss):
        policy.model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten().clone() for p in params])

    for adv in (element_adv, sample_adv[:, None].expand(B, 2)):
        credit = ElementCredit(adv, torch.ones(B, 2, dtype=torch.bool), old)
        loss, info = pair_losses(policy, rollout, pairs, sample_adv, cfg, elements=credit)
        assert torch.equal(info["ratio"], torch.ones_like(info["ratio"]))
        got = grads(loss.sum())
        i, j = pairs[:, 0], pairs[:, 1]
        x = rollout.states[i, j]
        t, t_next = rollout.step_times(i, j)
        mean, std = law_mean_std(rollout.law, x, policy.velocity(x, t, rollout.cond[i]), t, t_next, rollout.noise_level)
        log_n = torch.distributions.Normal(mean, std[:, None]).log_prob(rollout.states[i, j + 1])
        log_n = log_n / (2 if reduction == "mean" else 1)
        truth = grads(-(adv[i] * log_n).sum())
        assert torch.allclose(got, truth, rtol=1e-4, atol=1e-7)
    old_joint = recompute_log_probs(policy, rollout, [pairs], 1000, "cpu")
    joint, _ = pair_losses(policy, rollout, pairs, sample_adv, cfg, old_joint)
    assert torch.allclose(got, grads(joint.sum()), rtol=1e-4, atol=1e-7)


def test_element_shares_of_a_rollout_sum_to_its_log_probs(tmp_path):
    domain = ToyDomain()
    cfg = small_config(tmp_path)
    policy = FlowPolicy(load_base(domain)[0])
    rollout = collect_rollout(policy, domain, cfg, 0, "cpu")
    pairs = rollout.trained_pairs()
    shares = element_log_probs(policy, rollout, pairs, 1000, "cpu")
    i, j = pairs[:, 0], pairs[:, 1]
    assert torch.allclose(shares[i, j].sum(dim=1), rollout.log_probs[i, j], atol=1e-5)


def test_a_run_with_element_credit_trains_and_reports_it(tmp_path):
    run = train(small_config(tmp_path, steps=2, **{"loss.element_weight": 1.0}), domain=ElementToy())
    rows = read_metrics(run)
    assert len(rows) == 2 and all("element/reward_mean" in r for r in rows)
    assert rows[0]["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-3) and rows[0]["train/pairs"] > 0


@pytest.mark.parametrize("overrides,message", [
    ({"loss.element_weight": 1.0}, "no per-element rewards"),
    ({"loss.element_weight": -1.0}, "must be >= 0"),
])
def test_element_credit_without_element_rewards_is_a_one_line_error(tmp_path, overrides, message):
    with pytest.raises(FlowcoachError, match=message):
        train(small_config(tmp_path, **overrides), domain=ToyDomain())


def test_element_credit_needs_the_ratio_loss(tmp_path):
    cfg = small_config(tmp_path, **{"loss.element_weight": 1.0, "loss.family": "nft"})
    with pytest.raises(FlowcoachError, match="ratio algorithm"):
        train(cfg, domain=ElementToy())


def test_element_credit_on_a_set_domain_needs_shared_noise(tmp_path):
    class SetToy(ElementToy):
        element_rows_match = False

    with pytest.raises(FlowcoachError, match="same-noise-in-group"):
        train(small_config(tmp_path, **{"loss.element_weight": 1.0}), domain=SetToy())
    run = train(small_config(tmp_path, steps=1, **{"loss.element_weight": 1.0, "sampler.same_noise_in_group": True}),
                domain=SetToy())
    assert "element/reward_mean" in read_metrics(run)[0]
