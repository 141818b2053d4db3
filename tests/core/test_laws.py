"""The math of the noise laws against the truth (DESIGN.md §8)."""

import math

import pytest
import torch

from flowcoach.core.sampling.laws import gaussian_kl_same_std, gaussian_log_prob, law_mean_std
from flowcoach.core.sampling.sampler import sample, time_grid

LAWS = [("flow-sde", 0.7), ("const-eta", 0.7), ("cps", 0.8)]

# A Gaussian data law N(M, S^2) (diagonal, 2-D): its exact flow velocity is closed-form.
M, S = torch.tensor([1.0, -0.5]), torch.tensor([0.5, 1.5])


def gaussian_velocity(mean=M, std=S):
    """v(x, t) = E[eps - x0 | x_t = x] for x0 ~ N(mean, std^2), x_t = (1 - t) x0 + t eps."""

    def velocity(x, t, cond=None):
        t = t.reshape(-1, 1)
        var_t = (1 - t) ** 2 * std**2 + t**2
        centred = x - (1 - t) * mean
        e_eps = t / var_t * centred
        e_x0 = mean + (1 - t) * std**2 / var_t * centred
        return e_eps - e_x0

    return velocity


@pytest.mark.parametrize("law,a", LAWS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_equals_torch_normal(law, a, reduction):
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(5, 3, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    t, t_next = torch.full((5,), 0.6), torch.full((5,), 0.5)
    mean, std = law_mean_std(law, x, v, t, t_next, a)
    x_next = mean + std.reshape(-1, 1, 1) * torch.randn(5, 3, 4, generator=g)
    ours = gaussian_log_prob(x_next, mean, std, reduction)
    per_dim = torch.distributions.Normal(mean, std.reshape(-1, 1, 1)).log_prob(x_next).reshape(5, -1)
    truth = per_dim.mean(1) if reduction == "mean" else per_dim.sum(1)
    torch.testing.assert_close(ours, truth, rtol=1e-5, atol=1e-5)


def test_flow_sde_std_matches_formula():
    # sigma_t = a sqrt(t / (1 - t)), std = sigma_t sqrt(|dt|); at t = 1, 1 - t_next replaces 1 - t.
    x = v = torch.zeros(2, 1)
    _, std = law_mean_std("flow-sde", x, v, torch.tensor([0.6, 1.0]), torch.tensor([0.5, 0.9]), 0.7)
    expected = [0.7 * math.sqrt(0.6 / 0.4) * math.sqrt(0.1), 0.7 * math.sqrt(1.0 / 0.1) * math.sqrt(0.1)]
    torch.testing.assert_close(std, torch.tensor(expected))


@pytest.mark.parametrize("law,a", LAWS)
def test_closed_form_kl_matches_monte_carlo(law, a):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 8, generator=g)
    v_p, v_q = torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)
    t, t_next = torch.tensor([0.7]), torch.tensor([0.6])
    mean_p, std = law_mean_std(law, x, v_p, t, t_next, a)
    mean_q, _ = law_mean_std(law, x, v_q, t, t_next, a)
    closed = gaussian_kl_same_std(mean_p, mean_q, std, "sum")
    n = 400_000
    draws = mean_p + std * torch.randn(n, 8, generator=g)
    mc = (gaussian_log_prob(draws, mean_p.expand(n, 8), std.expand(n), "sum")
          - gaussian_log_prob(draws, mean_q.expand(n, 8), std.expand(n), "sum")).mean()
    assert abs(mc.item() - closed.item()) / closed.item() < 0.02
    # mean reduction is the sum divided by the number of dimensions
    torch.testing.assert_close(gaussian_kl_same_std(mean_p, mean_q, std, "mean"), closed / 8)


@pytest.mark.parametrize("law,a", LAWS)
def test_noise_level_zero_is_the_ode_bit_for_bit(law, a):
    g = torch.Generator().manual_seed(2)
    x1 = torch.randn(64, 2, generator=g)
    grid = time_grid(10, shift=3.0)
    ode = sample(gaussian_velocity(), x1, grid, law="ode")
    zero = sample(gaussian_velocity(), x1, grid, law=law, noise_level=0.0, generator=g)
    assert torch.equal(ode.states, zero.states)
    assert not zero.stochastic.any() and torch.equal(zero.log_probs, torch.zeros_like(zero.log_probs))


def _moments(law, a, steps, n=20_000, seed=0, solver="euler"):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, 2, generator=g)
    out = sample(gaussian_velocity(), x1, time_grid(steps), law=law, noise_level=a, generator=g,
                 ode_solver=solver).samples
    return out.mean(0), out.var(0)


@pytest.mark.parametrize("law,a", [("flow-sde", 0.7), ("const-eta", 0.7)])
def test_sde_marginals_equal_ode_marginals_on_a_gaussian(law, a):
    n = 20_000
    ode_mean, ode_var = _moments("ode", 0.0, 200, n, seed=10, solver="heun")
    sde_mean, sde_var = _moments(law, a, 200, n, seed=11)
    # the ODE is itself right (Heun, 200 steps), then the SDE matches within sampling error:
    # 4 standard errors of a mean (std / sqrt n) and of a variance (var sqrt(2 / n), twice: both sampled)
    torch.testing.assert_close(ode_var, S**2, rtol=0.03, atol=0)
    assert ((sde_mean - ode_mean).abs() < 4 * torch.sqrt(2 * S**2 / n)).all()
    assert ((sde_var - ode_var).abs() < 4 * S**2 * math.sqrt(2 / n) * math.sqrt(2) + 0.01 * S**2).all()


def test_cps_keeps_the_mean_and_is_exact_when_the_prediction_is():
    # CPS preserves the noise coefficient, not the variance of an imperfect x0 prediction: with a
    # spread target its variance shrinks with every step (measured: 0.18 vs 0.25 at 200 steps, a =
    # 0.7), so only the mean is preserved there. With a point target (x0_hat exact) it is exact.
    n = 20_000
    ode_mean, _ = _moments("ode", 0.0, 50, n, seed=10, solver="heun")
    cps_mean, _ = _moments("cps", 0.8, 50, n, seed=12)
    assert ((cps_mean - ode_mean).abs() < 4 * torch.sqrt(2 * S**2 / n)).all()
    point = torch.tensor([0.3, -1.0])
    g = torch.Generator().manual_seed(3)
    grid = time_grid(10)
    r = sample(gaussian_velocity(point, torch.zeros(2)), torch.randn(n, 2, generator=g), grid, law="cps",
               noise_level=0.8, generator=g)
    for j in range(1, 10):  # x_t = (1 - t) x0 + t eps: mean (1 - t) x0, variance t^2
        t = grid[j]
        torch.testing.assert_close(r.states[:, j].mean(0), (1 - t) * point, atol=4 * t / math.sqrt(n), rtol=0)
        torch.testing.assert_close(r.states[:, j].var(0), (t**2).expand(2), rtol=4 * math.sqrt(2 / n), atol=0)
    torch.testing.assert_close(r.samples, point.expand(n, 2), atol=1e-5, rtol=0)


def test_rollout_log_probs_recompute_exactly():
    from flowcoach.core.sampling.sampler import pair_log_probs

    g = torch.Generator().manual_seed(4)
    r = sample(gaussian_velocity(), torch.randn(16, 2, generator=g), time_grid(6), law="flow-sde",
               noise_level=0.7, generator=g)
    pairs = r.trained_pairs()
    lp, _, _ = pair_log_probs(gaussian_velocity(), r, pairs)
    torch.testing.assert_close(lp, r.log_probs[pairs[:, 0], pairs[:, 1]], rtol=0, atol=1e-6)


def test_heun_is_second_order_and_euler_first():
    # Error of the final variance against the truth S^2 as the step count doubles.
    reference = _moments("ode", 0.0, 200, n=20_000, seed=5, solver="heun")[1]  # same noise: only dt differs

    def err(solver, steps):
        _, var = _moments("ode", 0.0, steps, n=20_000, seed=5, solver=solver)
        return (var - reference).abs().max().item()

    e10, e20 = err("euler", 10), err("euler", 20)
    h10, h20 = err("heun", 10), err("heun", 20)
    assert 1.6 < e10 / e20 < 2.4  # halving dt halves Euler's error
    assert h10 / h20 > 3.0 and h10 < e10 / 5  # and quarters Heun's


def test_heuns_last_step_to_zero_is_euler():
    # v = x / t flows x_1 to x_t = t x_1: singular at t = 0, where Euler's last step lands exactly
    # on 0. Heun must not evaluate it there (Karras et al. 2022, Alg. 1): every other step is
    # Heun's (2 evaluations), the last one Euler's.
    calls = []

    def velocity(x, t, cond):
        t = torch.as_tensor(t).reshape(-1, 1)
        calls.append(float(t.min()))
        return x / t

    x1 = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    r = sample(velocity, x1, time_grid(5), law="ode", noise_level=0.0, ode_solver="heun")
    assert torch.isfinite(r.samples).all() and r.samples.abs().max() < 1e-6
    assert min(calls) > 0 and len(calls) == 2 * 5 - 1 and r.nfe == 4 * (2 * 5 - 1)
    # on a grid that ends above 0 every step is Heun's, and exact for this linear flow
    grid = torch.tensor([1.0, 0.6, 0.3, 0.1])
    r = sample(velocity, x1, grid, law="ode", noise_level=0.0, ode_solver="heun")
    torch.testing.assert_close(r.samples, 0.1 * x1, rtol=0, atol=1e-5)


def test_rollout_round_trips_through_a_file(tmp_path):
    from flowcoach.core.sampling.rollout import Rollout

    g = torch.Generator().manual_seed(6)
    r = sample(gaussian_velocity(), torch.randn(4, 2, generator=g), time_grid(5), cond={"c": torch.arange(4)},
               law="cps", noise_level=0.8, generator=g, record_means=True)
    r.save(tmp_path / "r.pt")
    back = Rollout.load(tmp_path / "r.pt")
    assert torch.equal(back.states, r.states) and torch.equal(back.means, r.means)
    assert torch.equal(back.cond["c"], r.cond["c"]) and back.law == "cps" and back.noise_level == 0.8


def test_evaluation_sde_window_keeps_the_data_law_and_repeats_from_its_seed():
    """generate's SDE window (the evaluation sampler of domains whose ODE collapses samples) draws
    from the same law as the ODE, N(M, S^2), with the exact velocity; it is the ODE outside the window."""
    from types import SimpleNamespace

    from flowcoach.core.trainer import generate, sde_steps

    grid = time_grid(10)
    assert sde_steps(grid, 0.1, 0.7).nonzero().flatten().tolist() == [3, 4, 5, 6, 7, 8]  # t = 0.7 ... 0.2
    velocity = gaussian_velocity()
    model = lambda x, t, cond: velocity(x, t)  # noqa: E731
    domain = SimpleNamespace(sample_shape=(2,))
    cond = torch.zeros(40_000)
    ode = generate(model, domain, cond, 200, seed=3)
    sde = generate(model, domain, cond, 200, seed=3, sde_noise_level=0.7, sde_t_max=0.7, sde_t_min=0.1)
    for x in (ode, sde):
        torch.testing.assert_close(x.mean(0), M, atol=0.03, rtol=0)
        torch.testing.assert_close(x.std(0), S, atol=0.03, rtol=0)
    assert not torch.equal(ode, sde)
    assert torch.equal(sde, generate(model, domain, cond, 200, seed=3, sde_noise_level=0.7, sde_t_max=0.7, sde_t_min=0.1))
    # a window that holds no step's start is the ODE, bit for bit
    assert torch.equal(ode, generate(model, domain, cond, 200, seed=3, sde_noise_level=0.7, sde_t_max=0.001, sde_t_min=0.0))
