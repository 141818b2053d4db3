"""Per-element credit (--loss.element-weight): the log-prob's factorisation over elements, the
element advantages, and the loss gradient, each against an independent computation."""

import math

import numpy as np
import pytest
import torch

from flowcoach.core.advantages import element_advantages
from flowcoach.core.checkpoint import load_base
from flowcoach.core.domain import Domain
from flowcoach.core.policy import FlowPolicy
from flowcoach.core.registry import FlowcoachError
from flowcoach.core.sampling.laws import gaussian_log_prob, gaussian_log_prob_elements, law_mean_std
from flowcoach.core.trainer import ElementCredit, collect_rollout, pair_losses, recompute_log_probs, train
from flowcoach.domains.toy import ToyDomain
from flowcoach.rewards.toy import mode_reward
from tests.core.test_trainer import read_metrics, small_config


class PlainToy(ToyDomain):
    """The toy without per-element rewards."""

    element_rewards = Domain.element_rewards


def test_the_toy_s_element_rewards_multiply_to_its_reward():
    x = [np.array([1.5, 0.3]), np.array([-2.0, 0.1]), np.array([np.nan, 0.0])]
    factors = ToyDomain().element_rewards(x, torch.tensor([0, 4, 0]))
    assert torch.allclose(factors.prod(dim=1), mode_reward(x, torch.tensor([0, 4, 0]))[0])
    assert factors[2].tolist() == [0.0, 1.0]


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


@pytest.mark.parametrize("std_scope", ["group", "global"])
def test_element_advantages_by_hand(std_scope):
    nan = float("nan")
    # group 0: rows (1, 0, -) and (0, 0, -): row means (0.5, 0), centred (+-0.5, 0): std sqrt(0.5 / 4)
    # over the group's 4 credited elements, sqrt(0.5 / 10) over the batch's 10
    # group 1: every element equal -> no element signal, the sample advantage alone
    rewards = torch.tensor([[1.0, 0.0, nan], [0.0, 0.0, nan], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    adv, credited, signal, _ = element_advantages(torch.tensor([0.3, -0.3, 0.2, -0.2]), rewards,
                                                  torch.tensor([0, 0, 1, 1]), weight=2.0, std_scope=std_scope,
                                                  eps=0.0)
    z = 0.5 / math.sqrt(0.5 / (4 if std_scope == "group" else 10))
    # the third element of group 0 earns no credit (NaN): it keeps its sample's own advantage
    expected = torch.tensor([[0.3 + 2 * z, 0.3, 0.3], [-0.3 - 2 * z, -0.3, -0.3], [0.2] * 3, [-0.2] * 3])
    assert torch.allclose(adv, expected, atol=1e-5)
    assert credited.tolist() == [[True, True, False], [True, True, False]] + [[True] * 3] * 2
    assert signal.tolist() == [True, True, False, False]


def element_shares(policy, rollout, pairs):
    i, j = pairs[:, 0], pairs[:, 1]
    x = rollout.states[i, j]
    t, t_next = rollout.step_times(i, j)
    mean, std = law_mean_std(rollout.law, x, policy.velocity(x, t, rollout.cond[i]), t, t_next, rollout.noise_level)
    return gaussian_log_prob_elements(rollout.states[i, j + 1], mean, std, rollout.reduction), mean, std


def toy_rollout(tmp_path, reduction="mean"):
    domain = ToyDomain()
    cfg = small_config(tmp_path)
    cfg.sampler.logprob_reduction = reduction
    policy = FlowPolicy(load_base(domain)[0])
    rollout = collect_rollout(policy, domain, cfg, 0, "cpu")
    return cfg, policy, rollout, rollout.trained_pairs()


def grads(policy, loss):
    policy.model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten().clone() for p in policy.trainable_parameters()])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_on_policy_element_loss_gradient_is_the_factorised_policy_gradient(tmp_path, reduction):
    """At ratio 1 the gradient is -sum A_{b,e} grad log N_e(x_next | x), each log N_e computed here with
    torch.distributions."""
    cfg, policy, rollout, pairs = toy_rollout(tmp_path, reduction)
    B = rollout.batch_size
    element_adv = torch.randn(B, 2, generator=torch.Generator().manual_seed(2))
    old = recompute_log_probs(policy, rollout, [pairs], 1000, "cpu")
    credit = ElementCredit(element_adv)
    loss, info = pair_losses(policy, rollout, pairs, torch.zeros(B), cfg, old, elements=credit)
    assert torch.equal(info["ratio"], torch.ones_like(info["ratio"]))
    got = grads(policy, loss.sum())
    i, j = pairs[:, 0], pairs[:, 1]
    _, mean, std = element_shares(policy, rollout, pairs)
    log_n = torch.distributions.Normal(mean, std[:, None]).log_prob(rollout.states[i, j + 1])
    log_n = log_n / (2 if reduction == "mean" else 1)
    assert torch.allclose(got, grads(policy, -(element_adv[i] * log_n).sum()), rtol=1e-4, atol=1e-7)


def test_with_one_advantage_per_sample_the_element_loss_is_the_per_sample_ppo_loss(tmp_path):
    """Off policy too: old log-probs moved so that some ratios are inside the clip and some past it
    on either side; the element loss's gradient and value equal the per-sample clipped loss's."""
    cfg, policy, rollout, pairs = toy_rollout(tmp_path)
    B, clip = rollout.batch_size, cfg.resolved_clip()[0]
    old = recompute_log_probs(policy, rollout, [pairs], 1000, "cpu")
    shift = torch.tensor([-3.0, -0.5, 0.5, 3.0]).repeat(len(pairs) // 4 + 1)[:len(pairs)] * clip
    old[pairs[:, 0], pairs[:, 1]] += shift
    adv = torch.randn(B, generator=torch.Generator().manual_seed(3))
    credit = ElementCredit(adv[:, None].expand(B, 2))
    element_loss, info = pair_losses(policy, rollout, pairs, adv, cfg, old, elements=credit)
    got = grads(policy, element_loss.sum())
    joint_loss, joint_info = pair_losses(policy, rollout, pairs, adv, cfg, old)
    assert torch.allclose(got, grads(policy, joint_loss.sum()), rtol=1e-4, atol=1e-7)
    assert torch.allclose(element_loss, joint_loss, atol=1e-6)
    assert 0 < joint_info["clipped"].mean() < 1
    assert torch.equal(info["clipped"].reshape(-1, 2)[:, 0], joint_info["clipped"])


def test_a_run_with_element_credit_trains_and_reports_it(tmp_path):
    run = train(small_config(tmp_path, steps=2, **{"loss.element_weight": 1.0}), domain=ToyDomain())
    rows = read_metrics(run)
    assert len(rows) == 2 and all("element/reward_mean" in r for r in rows)
    assert rows[0]["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-3) and rows[0]["train/pairs"] > 0


@pytest.mark.parametrize("overrides,message", [
    ({"loss.element_weight": 1.0}, "no per-element rewards"),
    ({"loss.element_weight": -1.0}, "must be >= 0"),
])
def test_element_credit_without_element_rewards_is_a_one_line_error(tmp_path, overrides, message):
    with pytest.raises(FlowcoachError, match=message):
        train(small_config(tmp_path, **overrides), domain=PlainToy())


def test_element_credit_needs_the_ratio_loss(tmp_path):
    cfg = small_config(tmp_path, **{"loss.element_weight": 1.0, "loss.family": "nft"})
    with pytest.raises(FlowcoachError, match="ratio algorithm"):
        train(cfg, domain=ToyDomain())


def test_element_credit_on_a_set_domain_needs_shared_noise(tmp_path):
    class SetToy(ToyDomain):
        element_rows_match = False

    with pytest.raises(FlowcoachError, match="same-noise-in-group"):
        train(small_config(tmp_path, **{"loss.element_weight": 1.0}), domain=SetToy())
    run = train(small_config(tmp_path, steps=1, **{"loss.element_weight": 1.0, "sampler.same_noise_in_group": True}),
                domain=SetToy())
    assert "element/reward_mean" in read_metrics(run)[0]


def test_an_element_is_dropped_only_where_the_step_s_ratio_is_past_the_clip_its_way(tmp_path):
    """A step whose ratio is above 1 + clip: its elements with A > 0 get no gradient (PPO's bound),
    its elements with A < 0 still train, with gradient -r A grad(share)."""
    cfg, policy, rollout, pairs = toy_rollout(tmp_path)
    B, clip = rollout.batch_size, cfg.resolved_clip()[0]
    old = recompute_log_probs(policy, rollout, [pairs], 1000, "cpu")
    old[pairs[:, 0], pairs[:, 1]] -= 3 * clip  # every ratio is now exp(3 clip) > 1 + clip
    adv = torch.tensor([[1.0, -1.0]]).expand(B, 2)
    credit = ElementCredit(adv)
    loss, info = pair_losses(policy, rollout, pairs, torch.zeros(B), cfg, old, elements=credit)
    assert info["clipped"].reshape(-1, 2)[:, 0].all() and not info["clipped"].reshape(-1, 2)[:, 1].any()
    got = grads(policy, loss.sum())
    shares, _, _ = element_shares(policy, rollout, pairs)
    assert torch.allclose(got, grads(policy, math.exp(3 * clip) * shares[:, 1].sum()), rtol=1e-4, atol=1e-7)


def test_check_domain_checks_element_rewards():
    from flowcoach.core.domain import check_domain

    assert "element_rewards returns one reward per sample row" in check_domain(ToyDomain())

    class WrongRows(ToyDomain):
        def element_rewards(self, objects, conditions):
            return torch.zeros(len(objects), 3)

    with pytest.raises(FlowcoachError, match="element_rewards returns one reward per sample row"):
        check_domain(WrongRows())
