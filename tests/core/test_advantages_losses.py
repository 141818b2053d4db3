"""Advantages and losses against hand computations."""

import math

import pytest
import torch

from flowcoach.core.advantages import group_normalized, group_stats, per_reward_normalized
from flowcoach.core.losses import clipped_ratio_loss, default_clip, kl_to_reference
from flowcoach.core.registry import FlowcoachError


def test_group_advantages_are_zero_mean_per_group_and_match_hand_values():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 13.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv, keep, info = group_normalized(rewards, groups, std_scope="group", clip=0.0)
    std0 = math.sqrt(2 / 3)
    torch.testing.assert_close(adv[:3], torch.tensor([-1.0, 0.0, 1.0]) / (std0 + 1e-4))
    for g in (0, 1):
        assert abs(adv[groups == g].sum().item()) < 1e-5
    assert keep.all() and info["group/zero_std_ratio"] == 0.0


def test_global_std_divides_by_the_batch_std():
    rewards = torch.tensor([0.0, 2.0, 4.0, 8.0])
    groups = torch.tensor([0, 0, 1, 1])
    adv, _, _ = group_normalized(rewards, groups, std_scope="global", clip=0.0)
    batch_std = rewards.std(unbiased=False)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -2.0, 2.0]) / (batch_std + 1e-4))


def test_zero_std_groups_give_zero_advantage_never_nan():
    rewards = torch.tensor([5.0, 5.0, 5.0, 1.0, 2.0, 3.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    for scope in ("group", "global"):
        adv, keep, info = group_normalized(rewards, groups, std_scope=scope)
        assert torch.isfinite(adv).all()
        assert torch.equal(adv[:3], torch.zeros(3)) and not keep[:3].any() and keep[3:].all()
        assert info["group/zero_std_ratio"] == 0.5
    adv, keep, _ = group_normalized(torch.ones(4), torch.tensor([0, 0, 1, 1]))
    assert torch.equal(adv, torch.zeros(4)) and not keep.any()


def test_advantage_clipping():
    rewards = torch.tensor([0.0] * 99 + [1000.0])
    adv, _, _ = group_normalized(rewards, torch.zeros(100, dtype=torch.long), std_scope="group", clip=5.0)
    assert adv.max().item() == 5.0


def test_group_of_one_is_refused():
    with pytest.raises(FlowcoachError, match="at least 2"):
        group_normalized(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))


def test_per_reward_normalisation_is_scale_free():
    groups = torch.tensor([0, 0, 0, 0])
    small = torch.tensor([0.0, 1.0, 2.0, 3.0])
    comps = torch.stack([small, 1000 * small.flip(0)], dim=1)
    adv, _, _ = per_reward_normalized(comps, torch.tensor([1.0, 1.0]), groups, clip=0.0)
    # each reward normalised alone: the huge one does not drown the small one, they cancel exactly
    torch.testing.assert_close(adv, torch.zeros(4), atol=1e-3, rtol=0)
    mean, std = group_stats(small, groups)
    torch.testing.assert_close(mean, torch.full((4,), 1.5))


def test_clipped_loss_matches_ppo_by_hand():
    lp_old = torch.zeros(4)
    lp = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, info = clipped_ratio_loss(lp, lp_old, adv, 0.2, 0.2)
    # positive advantage: ratio capped at 1.2 above; negative advantage: ratio floored at 0.8
    torch.testing.assert_close(loss, torch.tensor([-1.2, -0.5, 1.5, 0.8]))
    assert info["clipped"].tolist() == [1.0, 0.0, 0.0, 1.0]
    loss_asym, _ = clipped_ratio_loss(lp, lp_old, adv, 0.1, 0.3)
    torch.testing.assert_close(loss_asym, torch.tensor([-1.3, -0.5, 1.5, 0.9]))


def test_clip_default_follows_the_reduction():
    assert default_clip("mean") == 1e-4 and default_clip("sum") == 0.2
    with pytest.raises(FlowcoachError):
        default_clip("max")


def test_kl_with_and_without_dt():
    mean, ref = torch.ones(3, 2), torch.zeros(3, 2)
    std, dt = torch.full((3,), 0.5), torch.full((3,), -0.1)
    exact = kl_to_reference(mean, ref, std, dt, "sum", with_dt=True)
    torch.testing.assert_close(exact, torch.full((3,), 2 * 1.0 / (2 * 0.25)))
    torch.testing.assert_close(kl_to_reference(mean, ref, std, dt, "sum", with_dt=False), exact * 0.1)


def test_flow_matching_loss_is_zero_for_the_exact_conditional_velocity_and_uses_the_coupling():
    from flowcoach.core.losses import flow_matching_loss

    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))

    # one data point: the marginal velocity is known in closed form, (x_t - x0) / t, so its loss is 0
    point = x0[:1].expand(64, 3)
    exact = lambda x, t, c: (x - point) / t[:, None]  # noqa: E731
    assert float(flow_matching_loss(exact, point, None, generator=torch.Generator().manual_seed(0))) < 1e-10

    # a coupling that moves each x0 onto its own noise makes the target eps - x0 zero: v = 0 is exact
    zero = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    onto_noise = lambda x, eps, c: eps  # noqa: E731
    assert float(flow_matching_loss(zero, x0, None, generator=torch.Generator().manual_seed(0), couple=onto_noise)) == 0.0
    assert float(flow_matching_loss(zero, x0, None, generator=torch.Generator().manual_seed(0))) > 1.0


def test_flow_matching_loss_adds_the_structure_loss_on_the_implied_clean_sample():
    from flowcoach.core.losses import flow_matching_loss

    x0 = torch.randn(16, 2, 3, generator=torch.Generator().manual_seed(2))
    t = torch.linspace(0.05, 1.0, 16)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))  # what the loss draws first
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    half = lambda x, tt, c: 0.5 * x  # noqa: E731
    seen = []

    def structure(x0_hat, data, cond):
        seen.append(x0_hat)
        return (x0_hat - data).abs().sum((1, 2))

    plain = flow_matching_loss(half, x0, None, generator=torch.Generator().manual_seed(0), t=t)
    both = flow_matching_loss(half, x0, None, generator=torch.Generator().manual_seed(0), t=t,
                              structure=structure, structure_weight=0.3)
    x0_hat = x_t - t[:, None, None] * 0.5 * x_t  # an Euler step from x_t to t = 0 with v = x_t / 2
    torch.testing.assert_close(seen[0], x0_hat)
    torch.testing.assert_close(both, plain + 0.3 * (x0_hat - x0).abs().sum((1, 2)).mean())
    assert flow_matching_loss(half, x0, None, generator=torch.Generator().manual_seed(0), t=t,
                              structure=structure, structure_weight=0.0) == plain and len(seen) == 1
