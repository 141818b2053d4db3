"""The Flow-GRPO family's defining properties against independent computations (DESIGN.md §8):
rollout structures, solvers, advantages and losses, on closed-form velocities and hand-made trees."""

import math

import pytest
import torch

from flowcoach.core.advantages import best_of_n_keep, dense_advantages, kl_gate, tree_advantages
from flowcoach.core.algorithms import algorithm_defaults
from flowcoach.domains.toy import ToyDomain
from flowcoach.core.losses import (clipped_ratio_loss, fm_log_likelihood, nft_loss, nft_optimality,
                                   ratio_norm_log_ratio)
from flowcoach.core.registry import FlowcoachError
from flowcoach.core.sampling.laws import gaussian_kl_same_std, gaussian_log_prob, law_mean_std
from flowcoach.core.sampling.sampler import ode_completions, sample, time_grid
from flowcoach.core.sampling.structures import (compressed_tail, get_structure, merge_blocks, step_entropy,
                                                window_durations, window_start)
from flowcoach.rewards.diversity import (cluster_bonus, diversity_scaled_advantages, min_cosine_distance,
                                         spectral_clusters)
from flowcoach.rewards.winrate import win_rates
from tests.core.test_laws import gaussian_velocity


def counting(velocity):
    """A velocity that counts the rows it evaluates."""
    calls = {"rows": 0}

    def fn(x, t, cond=None):
        calls["rows"] += x.shape[0]
        return velocity(x, t, cond)

    return fn, calls


# ----------------------------------------------------------------------------- samplers
def test_all_ode_but_one_step_gives_the_ode_rollout_up_to_that_step():
    g = torch.Generator().manual_seed(0)
    x1, grid, k = torch.randn(16, 2, generator=g), time_grid(8), 3
    ode = sample(gaussian_velocity(), x1, grid, law="ode")
    mask = torch.zeros(16, 8, dtype=torch.bool)
    mask[:, k] = True
    one = sample(gaussian_velocity(), x1, grid, law="flow-sde", noise_level=0.7, stochastic=mask, generator=g,
                 record_means=True)
    assert torch.equal(one.states[:, :k + 1], ode.states[:, :k + 1])
    # the stochastic step is the law's Gaussian around the ODE state, and the log-prob is only there
    mean, std = law_mean_std("flow-sde", ode.states[:, k], gaussian_velocity()(ode.states[:, k], grid[k].expand(16)),
                             grid[k].expand(16), grid[k + 1].expand(16), 0.7)
    torch.testing.assert_close(one.means[:, k], mean)
    torch.testing.assert_close(one.log_probs[:, k], gaussian_log_prob(one.states[:, k + 1], mean, std))
    assert (one.log_probs[:, torch.arange(8) != k] == 0).all() and not torch.equal(one.samples, ode.samples)


def test_a_shared_prefix_is_computed_once_and_changes_nothing():
    # Flow-GRPO-Fast's shared prefix: one ODE path per group until the window, then G branches
    g = torch.Generator().manual_seed(1)
    G, T, groups = 6, 8, 2
    x1 = torch.randn(groups, 2, generator=g).repeat_interleave(G, 0)
    noise = torch.randn(groups * G, T, 2, generator=g)
    mask = torch.zeros(groups * G, T, dtype=torch.bool)
    mask[:, 3:5] = True
    gid = torch.arange(groups).repeat_interleave(G)
    fn, calls = counting(gaussian_velocity())
    plain = sample(gaussian_velocity(), x1, time_grid(T), law="flow-sde", stochastic=mask, noise=noise)
    shared = sample(fn, x1, time_grid(T), law="flow-sde", stochastic=mask, noise=noise, node_ids=gid)
    assert torch.equal(shared.states, plain.states) and torch.equal(shared.log_probs, plain.log_probs)
    # steps 0-3 evaluate one state per group; from the branch on, every sample is its own
    assert calls["rows"] == shared.nfe == groups * 4 + groups * G * (T - 4) < plain.nfe == groups * G * T
    assert len(shared.trained_pairs()) == groups * G * 2


def tree_rollout(velocity, g, steps=(1, 3), k=2, T=5, groups=1):
    G = k ** len(steps)
    rows = groups * G
    x1 = torch.randn(groups, 2, generator=g).repeat_interleave(G, 0)
    mask = torch.zeros(rows, T, dtype=torch.bool)
    keys = torch.zeros(rows, T, dtype=torch.long)
    leaf = torch.arange(rows) % G
    for d, j in enumerate(steps):
        mask[:, j] = True
        keys[:, j] = leaf // (G // k ** (d + 1))
    return sample(velocity, x1, time_grid(T), law="flow-sde", noise_level=0.7, stochastic=mask, generator=g,
                  node_ids=torch.arange(groups).repeat_interleave(G), branch_keys=keys)


def test_tree_rollout_shares_its_prefixes():
    fn, calls = counting(gaussian_velocity())
    r = tree_rollout(fn, torch.Generator().manual_seed(2))
    s = r.states
    assert all(torch.equal(s[0, j], s[b, j]) for b in range(4) for j in range(2))  # one path until step 1 branches
    assert torch.equal(s[0, 3], s[1, 3]) and torch.equal(s[2, 3], s[3, 3]) and not torch.equal(s[0, 3], s[2, 3])
    assert len({tuple(s[b, 5].tolist()) for b in range(4)}) == 4
    # evaluations: 1 + 1 (root path) + 2 + 2 (two subtrees) + 4 (leaves) instead of 4 x 5
    assert calls["rows"] == r.nfe == 10
    # every edge is trained once: 2 edges into depth 1 (at step 1), 4 into the leaves (step 3)
    assert r.trained_pairs().tolist() == [[0, 1], [0, 3], [1, 3], [2, 1], [2, 3], [3, 3]]


def test_tree_advantages_on_a_hand_made_tree():
    # leaves 0..3 with rewards 1, 2, 4, 8; nodes after step 1: {0, 1} and {2, 3}; after step 3: each leaf
    rewards = torch.tensor([1.0, 2.0, 4.0, 8.0])
    nodes = torch.tensor([[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 3, 3]])
    stochastic = torch.zeros(4, 5, dtype=torch.bool)
    stochastic[:, [1, 3]] = True
    adv, keep, _ = tree_advantages(rewards, nodes, stochastic, torch.zeros(4, dtype=torch.long), clip=0.0)
    # depth 1: values 1.5 and 6 -> -1, +1 (population std 2.25); on the first leaf of each node
    torch.testing.assert_close(adv[[0, 2], 1], torch.tensor([-2.25, 2.25]) / (2.25 + 1e-4))
    # depth 2: the leaves, normalised over the tree's 4 leaves
    std = math.sqrt(((rewards - 3.75) ** 2).mean().item())
    torch.testing.assert_close(adv[:, 3], (rewards - 3.75) / (std + 1e-4))
    assert keep.sum() == 6 and keep[[0, 2], 1].all() and not keep[[1, 3], 1].any()
    # softmax values: a node is the softmax(edge log-prob)-weighted value of its children
    log_probs = torch.zeros(4, 5)
    log_probs[:, 3] = torch.tensor([0.0, math.log(3.0), 0.0, 0.0])  # leaf 1 is 3x likelier than leaf 0
    adv, _, _ = tree_advantages(rewards, nodes, stochastic, torch.zeros(4, dtype=torch.long), log_probs, "softmax", 0.0)
    v_left, v_right = 0.25 * 1 + 0.75 * 2, 6.0
    d = (v_right - v_left) / 2
    torch.testing.assert_close(adv[[0, 2], 1], torch.tensor([-d, d]) / (d + 1e-4))


def test_tree_structure_plans_a_full_binary_tree_and_refuses_a_wrong_group_size():
    cfg = algorithm_defaults("tree-grpo")
    plan = get_structure("tree").plan(cfg, 0, 2, torch.Generator().manual_seed(0))
    assert plan.shared_root and plan.stochastic.shape == (16, 10)
    assert plan.stochastic.any(0).nonzero().flatten().tolist() == [0, 2, 4]
    assert plan.branch_keys[:8, 4].tolist() == list(range(8)) and plan.branch_keys[:8, 0].tolist() == [0] * 4 + [1] * 4
    assert get_structure("tree").pairs_per_sample(cfg) == (2 + 4 + 8) / 8
    cfg.group_size = 6
    with pytest.raises(FlowcoachError, match="set --group-size 8"):
        get_structure("tree").plan(cfg, 0, 2, torch.Generator())


# ----------------------------------------------------------------------------- windows (MixGRPO)
def test_the_window_moves_on_schedule():
    # progressive: 3 RL steps at each start 0, 1, 2, 3, then it rolls back to 0
    starts = [window_start(k, "progressive", 0, 4, every=3) for k in range(14)]
    assert starts == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3 + [0] * 2
    assert [window_start(k, "progressive", 1, 6, every=2, stride=2) for k in range(8)] == [1, 1, 3, 3, 5, 5, 1, 1]
    assert [window_start(k, "progressive", 2, 6, every=2, stride=0) for k in range(5)] == [2] * 5  # Flash*: frozen
    # decay: fewer steps at later positions, linearly; exp-decay: every exp(-k ReLU(l - n/2))
    assert window_durations("decay", 4, 8) == [8, 6, 4, 2]
    assert window_durations("exp-decay", 6, 10, decay=0.5) == [10, 10, 10, 10, round(10 * math.exp(-0.5)),
                                                                  round(10 * math.exp(-1.0))]
    assert [window_start(k, "decay", 0, 4, every=8) for k in (0, 7, 8, 13, 14, 17, 18, 19, 20)] == [0, 0, 1, 1, 2, 2, 3, 3, 0]
    # random: reproducible from the generator, inside the range
    a = [window_start(k, "random", 2, 7, generator=torch.Generator().manual_seed(k)) for k in range(30)]
    b = [window_start(k, "random", 2, 7, generator=torch.Generator().manual_seed(k)) for k in range(30)]
    assert a == b and set(a) <= set(range(2, 7)) and len(set(a)) > 2


def test_mix_grpo_rollouts_put_the_window_where_the_schedule_says():
    cfg = algorithm_defaults("mix-grpo")
    cfg.sampler.window_every = 2
    structure = get_structure("window")
    for step in range(20):
        plan = structure.plan(cfg, step, 1, torch.Generator())
        trained = plan.stochastic[0].nonzero().flatten().tolist()
        start = (step // 2) % 5  # starts 0..4: the noisier half of the grid
        assert trained == [start, start + 1, start + 2]


def test_flash_compresses_the_tail_and_dpm2_is_diffusers_dpm_solver():
    from diffusers import DPMSolverMultistepScheduler

    grid = time_grid(10)
    short = compressed_tail(grid, 4, 0.5)
    assert torch.equal(short[:5], grid[:5]) and short[-1] == 0 and len(short) == 5 + 3
    assert set(short.tolist()) <= set(grid.tolist())
    cfg = algorithm_defaults("mix-grpo-flash")
    plan = get_structure("window").plan(cfg, 0, 1, torch.Generator())
    assert plan.num_steps == 3 + 4 and plan.solvers == ("euler",) * 3 + ("dpm2",) * 4
    # DPM-Solver++(2M) in our sampler equals diffusers' DPMSolverMultistepScheduler on flow sigmas
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, use_flow_sigmas=True, flow_shift=1.0,
                                            prediction_type="flow_prediction", solver_order=2,
                                            algorithm_type="dpmsolver++", solver_type="midpoint",
                                            lower_order_final=True, final_sigmas_type="zero")
    scheduler.set_timesteps(10)
    velocity = gaussian_velocity()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    ours = sample(velocity, x, scheduler.sigmas.float(), law="ode", ode_solver="dpm2").samples
    theirs = x.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        theirs = scheduler.step(velocity(theirs, scheduler.sigmas[i].float().expand(64)), timestep, theirs).prev_sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    euler = sample(velocity, x, scheduler.sigmas.float(), law="ode").samples
    assert (euler - theirs).abs().max() > 100 * (ours - theirs).abs().max()


# ----------------------------------------------------------------------------- E-GRPO
def test_merged_step_entropy_equals_the_closed_form():
    grid = time_grid(10)
    a, i, m = 0.7, 5, 3
    # flow-sde: one step t_i -> t_{i+m} has std sigma(t_i) sqrt(t_i - t_{i+m}), sigma(t) = a sqrt(t / (1 - t))
    sigma = a * math.sqrt(grid[i] / (1 - grid[i]))
    std = sigma * math.sqrt(grid[i] - grid[i + m])
    closed = 0.5 * math.log(2 * math.pi * math.e * std**2)
    h = step_entropy("flow-sde", a, grid[i], grid[i + m])
    torch.testing.assert_close(h, torch.tensor([closed]))
    torch.testing.assert_close(h, torch.distributions.Normal(0.0, torch.tensor([std])).entropy())
    # merging raises the entropy by 1/2 log(|dt_merged| / |dt_i|) per dimension
    gain = h - step_entropy("flow-sde", a, grid[i], grid[i + 1])
    torch.testing.assert_close(gain, torch.tensor([0.5 * math.log(m)]), atol=1e-5, rtol=0)
    # blocks: single early steps, merged late ones, each reaching the threshold (but the last)
    blocks = merge_blocks(grid, "flow-sde", a, 0.3, 9)
    assert blocks == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 2), (6, 3)]
    for b, (start, length) in enumerate(blocks[:-1]):
        assert float(step_entropy("flow-sde", a, grid[start], grid[start + length])) >= 0.3
        if length > 1:
            assert float(step_entropy("flow-sde", a, grid[start], grid[start + length - 1])) < 0.3


def test_merged_rollouts_branch_from_the_anchor_with_the_merged_std():
    cfg = algorithm_defaults("e-grpo")
    cfg.group_size = 4
    g = torch.Generator().manual_seed(4)
    plan = get_structure("merged").plan(cfg, 0, 1, g)
    (i0,), (i1,) = plan.stochastic[0].nonzero().flatten().tolist(), plan.stochastic[2].nonzero().flatten().tolist()
    assert plan.adv_groups.tolist() == [0, 0, 1, 1] and i0 != i1
    fn, calls = counting(gaussian_velocity())
    x1 = torch.randn(1, 2, generator=g).expand(4, 2)
    r = sample(fn, x1, plan.timesteps, law="flow-sde", noise_level=0.7, stochastic=plan.stochastic, generator=g,
               node_ids=torch.zeros(4, dtype=torch.long), ode_solver=plan.solvers)
    fine = time_grid(10)
    anchor = sample(gaussian_velocity(), x1[:1], fine, law="ode")
    for row, i in ((0, i0), (2, i1)):
        (start, length), = [b for b in merge_blocks(fine, "flow-sde", 0.7, 0.3, 9) if b[0] == i]
        assert torch.equal(r.states[row, :i + 1], anchor.states[0, :i + 1])  # on the ODE anchor until the branch
        expected = 0.7 * math.sqrt(fine[i] / (1 - fine[i])) * math.sqrt(fine[i] - fine[i + length])
        assert abs(r.stds[row, i].item() - expected) < 1e-6
        assert torch.equal(r.states[row, i + 1], r.states[row, i + length])  # zero-length steps stand still
    assert calls["rows"] == r.nfe < 4 * 10


# ----------------------------------------------------------------------------- DenseGRPO
def test_dense_gains_telescope_and_completions_are_the_ode():
    from flowcoach.core.checkpoint import load_base
    from flowcoach.core.policy import FlowPolicy
    from flowcoach.core.trainer import collect_rollout, dense_step_rewards
    from flowcoach.domains.toy import ToyDomain
    from flowcoach.rewards import build_reward

    domain = ToyDomain()
    policy = FlowPolicy(load_base(domain)[0])
    cfg = algorithm_defaults("dense-grpo")
    cfg.groups_per_step, cfg.group_size = 2, 4
    rollout = collect_rollout(policy, domain, cfg, 0, "cpu")
    reward = build_reward({"toy-mode": 1.0})
    final, _ = reward(domain.decode(rollout.samples), rollout.cond)
    r = dense_step_rewards(policy, domain, rollout, reward, rollout.cond, cfg, final)
    # r_0 is the reward of the plain ODE sample from the same initial noise; r_T the sample's own
    ode = sample(policy.sampling_model(), rollout.states[:, 0], rollout.timesteps, cond=rollout.cond, law="ode")
    torch.testing.assert_close(r[:, 0], reward(domain.decode(ode.samples), rollout.cond)[0], atol=1e-6, rtol=0)
    gains = r[:, 1:] - r[:, :-1]
    torch.testing.assert_close(gains.sum(1), final - r[:, 0], atol=1e-5, rtol=0)
    # each completion is the ODE from that state on the rest of the grid
    j = 4
    done = ode_completions(policy.sampling_model(), rollout, [j])[j]
    alone = sample(policy.sampling_model(), rollout.states[:, j], rollout.timesteps[j:], cond=rollout.cond, law="ode")
    torch.testing.assert_close(done, alone.samples, atol=1e-6, rtol=0)
    # Tweedie: the recorded one-step estimates are x_j - t_j v(x_j)
    cfg.loss.dense_estimate = "tweedie"
    tw = collect_rollout(policy, domain, cfg, 0, "cpu")
    v = policy.velocity(tw.states[:, j], tw.timesteps[j].expand(8), tw.cond)
    torch.testing.assert_close(tw.x0_hats[:, j], tw.states[:, j] - tw.timesteps[j] * v, atol=1e-6, rtol=0)


def test_dense_advantages_by_hand():
    # two groups of 2; step rewards r_0..r_2: gains per step normalised across the group
    r = torch.tensor([[0.0, 1.0, 1.0], [0.0, 3.0, 2.0], [5.0, 5.0, 5.0], [1.0, 1.0, 4.0]])
    stochastic = torch.ones(4, 2, dtype=torch.bool)
    adv, keep, _ = dense_advantages(r, stochastic, torch.tensor([0, 0, 1, 1]), clip=0.0)
    # group 0: step-0 gains 1, 3 -> -1, 1; step-1 gains 0, -1 -> 1, -1 (population std 1 and 0.5)
    torch.testing.assert_close(adv[:2], torch.tensor([[-1.0, 0.5 / 0.5001], [1.0, -0.5 / 0.5001]]) * torch.tensor([1 / 1.0001, 1.0]))
    # group 1: step-0 gains 0, 0 carry no signal (dropped); step-1 gains 0, 3
    assert not keep[2:, 0].any() and keep[2:, 1].all() and keep[:2].all()
    torch.testing.assert_close(adv[2:, 1], torch.tensor([-1.0, 1.0]) * 1.5 / 1.5001)


# ----------------------------------------------------------------------------- losses
def test_ratio_norm_centres_the_log_ratio_and_unifies_its_spread():
    g = torch.Generator().manual_seed(5)
    n, d = 200_000, 4
    for std in (0.05, 0.5):  # two steps with very different noise levels
        mu_old = torch.randn(1, d, generator=g).expand(n, d)
        mu = mu_old + 0.01 * torch.randn(1, d, generator=g)
        z = torch.randn(n, d, generator=g)
        x_next = mu_old + std * z
        stds = torch.full((n,), std)
        raw = gaussian_log_prob(x_next, mu, stds) - gaussian_log_prob(x_next, mu_old, stds)
        normed = ratio_norm_log_ratio(gaussian_log_prob(x_next, mu, stds), gaussian_log_prob(x_next, mu_old, stds),
                                      mu, mu_old, stds)
        # exact identity: (log r + KL) std = mean_d((mu - mu_old) z), whatever the std
        torch.testing.assert_close(normed, ((mu - mu_old) * z).mean(1), atol=1e-6, rtol=1e-4)
        kl = gaussian_kl_same_std(mu[:1], mu_old[:1], stds[:1])
        assert abs(raw.mean() + kl) < 0.05 * kl + 4 * raw.std() / math.sqrt(n)  # raw: shifted left by KL
        assert abs(normed.mean()) < 4 * normed.std() / math.sqrt(n)  # normalised: centred on 0
        expected_spread = ((mu - mu_old)[0] ** 2).sum().sqrt() / d
        assert abs(normed.std() - expected_spread) < 0.01 * expected_spread  # and the same spread at both steps


def test_asymmetric_clip_bounds_each_side():
    lp = torch.log(torch.tensor([1.5, 0.5]))
    loss, info = clipped_ratio_loss(lp, torch.zeros(2), torch.tensor([1.0, -1.0]), 0.05, 0.28)
    torch.testing.assert_close(loss, torch.tensor([-1.28, 0.95]))  # clip-higher: 1 + 0.28 above, 1 - 0.05 below
    assert info["clipped"].tolist() == [1.0, 1.0]


def test_nft_gradient_points_toward_positive_samples():
    # a velocity that is one free vector c; at c = c_old the gradient is closed-form
    x0_pos, x0_neg = torch.tensor([[1.0, 2.0]]), torch.tensor([[-2.0, 0.5]])
    eps = torch.tensor([[0.3, -0.4]])
    t, beta = torch.tensor([0.6]), 0.7
    c_old = torch.tensor([[0.2, -0.1]])
    for x0, adv in ((x0_pos, 5.0), (x0_neg, -5.0)):
        x_t = (1 - t) * x0 + t * eps
        c = c_old.clone().requires_grad_(True)
        r = nft_optimality(torch.tensor([adv]), 5.0)
        loss = nft_loss(c, c_old, x_t, x0, t, r, beta, 5.0)
        loss.sum().backward()
        p = x_t - t * c_old  # x0_hat of v+ and v- at c = c_old
        w = (p - x0).abs().mean()
        sign = 1.0 if adv > 0 else -1.0  # d x0_hat(v+)/dc = -t beta, d x0_hat(v-)/dc = +t beta
        closed = -sign * 2 * t * (p - x0) / (w * 2) * 5.0  # mean over 2 dims, A_max = 5
        torch.testing.assert_close(c.grad, closed)
        stepped = x_t - t * (c_old - 0.01 * c.grad)
        before, after = (p - x0).norm(), (stepped - x0).norm()
        assert (after < before) if adv > 0 else (after > before)  # toward the positive, away from the negative
    assert nft_optimality(torch.tensor([-7.0, 0.0, 2.5]), 5.0).tolist() == [0.0, 0.5, 0.75]


def test_flow_matching_log_likelihood_and_the_fpo_ratio():
    v, target = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    assert fm_log_likelihood(v, target, torch.tensor([0.5]), "sum").item() == -5.0
    assert fm_log_likelihood(v, target, torch.tensor([0.5]), "mean").item() == -2.5
    gh = fm_log_likelihood(v, target, torch.tensor([0.5]), "mean", "ghuber").item()
    assert abs(gh - (-((2.5 + 1e-3) ** 0.25 - 1e-3**0.25) * 0.5 / 0.25)) < 1e-6
    # FPO's ratio is exp(L_old - L): a smaller flow-matching loss than the old policy's raises it
    old, new = fm_log_likelihood(v, target, torch.tensor([0.5]), "sum"), fm_log_likelihood(0.5 * v, target, torch.tensor([0.5]), "sum")
    _, info = clipped_ratio_loss(new, old, torch.tensor([1.0]), 0.2, 0.2)
    torch.testing.assert_close(info["ratio"], torch.exp(torch.tensor([5.0 - 1.25])))


# ----------------------------------------------------------------------------- options
def test_best_of_n_keeps_each_groups_extremes():
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.0, 5.0, 4.0, 3.0, 2.0, 1.0, 6.0])
    groups = torch.arange(2).repeat_interleave(6)
    keep = best_of_n_keep(rewards, groups, 4)
    assert keep.nonzero().flatten().tolist() == [0, 1, 4, 5, 6, 9, 10, 11]
    with pytest.raises(FlowcoachError, match="even"):
        best_of_n_keep(rewards, groups, 3)


def test_win_rates_turn_near_ties_into_halves():
    # pointwise 1.0 and 1.0001 are a tie (tol 1e-3): each wins half of it; 3.0 beats both
    comps = torch.tensor([[1.0], [1.0001], [3.0]])
    torch.testing.assert_close(win_rates(comps, torch.tensor([1.0]), torch.zeros(3, dtype=torch.long)),
                               torch.tensor([0.25, 0.25, 1.0]))
    # two components, weights 3 and 1 (negative weight: lower is better)
    comps = torch.tensor([[1.0, 5.0], [2.0, 1.0]])
    rates = win_rates(comps, torch.tensor([3.0, -1.0]), torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(rates, torch.tensor([0.0, 1.0]))
    rates = win_rates(comps, torch.tensor([3.0, 1.0]), torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(rates, torch.tensor([0.25, 0.75]))


def test_spectral_clusters_and_the_diversity_bonus():
    g = torch.Generator().manual_seed(6)
    blob = lambda centre, n: torch.tensor(centre) + 0.01 * torch.randn(n, 2, generator=g)  # noqa: E731
    feats = torch.cat([blob([0.0, 0.0], 3), blob([5.0, 5.0], 1), blob([5.0, -5.0], 4), blob([-5.0, 0.0], 4)])
    labels = spectral_clusters(feats[:4])
    assert labels[:3].unique().numel() == 1 and labels[3] != labels[0]
    bonus = cluster_bonus(feats, torch.tensor([0] * 4 + [1] * 8))
    torch.testing.assert_close(bonus, torch.tensor([1 / 3] * 3 + [1.0] + [0.25] * 8))
    assert torch.equal(spectral_clusters(torch.ones(5, 3)), torch.zeros(5, dtype=torch.long))


def test_gardo_diversity_scales_only_positive_advantages():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.01], [-1.0, 0.0]])
    groups = torch.zeros(4, dtype=torch.long)
    d = min_cosine_distance(feats, groups)
    cos02 = 1 / math.sqrt(1 + 1e-4)
    torch.testing.assert_close(d, torch.tensor([1 - cos02, 1 - 0.01 / math.sqrt(1 + 1e-4), 1 - cos02, 1.0]))
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    adv, keep = diversity_scaled_advantages(rewards, groups, d, clip=0.0)
    centred = rewards - 3.0
    scale = d / d.mean()
    torch.testing.assert_close(adv, torch.tensor([centred[0], centred[1], 0.0, centred[3] * scale[3]]))
    assert keep.all()


def test_kl_gate_picks_the_samples_the_main_reward_likes_alone():
    # main reward ranks sample 3 top while the auxiliary rewards rank it bottom: the likeliest hack
    comps = torch.tensor([[0.0, 3.0, 3.0], [1.0, 2.0, 2.0], [2.0, 1.0, 1.0], [3.0, 0.0, 0.0]])
    assert kl_gate(comps, 0.25).tolist() == [False, False, False, True]
    assert kl_gate(comps, 0.5).tolist() == [False, False, True, True]
    with pytest.raises(FlowcoachError, match="at least 2 reward components"):
        kl_gate(comps[:, :1], 0.5)


class TunedToy(ToyDomain):
    """A domain whose tuning of flow-grpo touches fields that other recipes define."""

    def train_defaults(self) -> dict:
        return {"sampler.noise_level": 0.9, "sampler.sde_window_size": 3, "loss.advantage": "per-reward",
                "optim.lr": 5e-4}


class TunedAwmToy(TunedToy):
    """The same tuning, made for the domain's own default algorithm, AWM."""

    def train_defaults(self) -> dict:
        return {**super().train_defaults(), "algo": "awm"}


def test_domain_tuning_does_not_undo_what_defines_a_recipe():
    from flowcoach.core.algorithms import train_config

    name = f"{__name__}:TunedToy"
    flow = train_config(name, "flow-grpo")  # the tuned algorithm: every field applies
    assert (flow.sampler.noise_level, flow.sampler.sde_window_size, flow.loss.advantage, flow.optim.lr) == \
        (0.9, 3, "per-reward", 5e-4)
    assert train_config(name).sampler.noise_level == 0.9  # no algo given: the domain's (flow-grpo)
    # each recipe keeps the fields it sets unlike flow-grpo; the rest of the tuning still applies
    assert (train_config(name, "awm").sampler.noise_level, train_config(name, "awm").optim.lr) == (0.4, 5e-4)
    assert train_config(name, "fpo").sampler.law == "ode" and train_config(name, "fpo").sampler.noise_level == 0.0
    assert train_config(name, "flow-grpo-fast").sampler.sde_window_size == 2
    assert train_config(name, "dense-grpo").loss.advantage == "dense"
    assert train_config(name, "tree-grpo").loss.advantage == "tree"
    assert train_config(name, "tempflow-grpo").loss.advantage == "per-reward"  # tempflow keeps group advantages
    # a domain whose default is AWM tuned AWM: all of its fields apply to AWM
    awm_name = f"{__name__}:TunedAwmToy"
    assert train_config(awm_name).algo == "awm" and train_config(awm_name).sampler.noise_level == 0.9
    assert train_config(awm_name, "flow-grpo").sampler.noise_level == 0.7  # flow-grpo's own, unlike AWM's
