"""Every recipe of the Flow-GRPO family through the one trainer: it trains, it raises the toy's
reward, resume is exact, two processes equal one, and bad combinations fail with one line."""

import json

import pytest
import torch
from safetensors.torch import load_file

from flowcoach.core.algorithms import algorithm_defaults
from flowcoach.core.checkpoint import list_checkpoints, load_base
from flowcoach.core.policy import FlowPolicy
from flowcoach.core.registry import ALGORITHMS, FlowcoachError
from flowcoach.core.trainer import (AnchorData, anchor_batch, collect_rollout, optimizer_step_on, pair_losses,
                                    plan_batches, train)
from flowcoach.domains.toy import ToyDomain
from tests.core.test_trainer import final_weights, read_metrics

ALGOS = ALGORITHMS.names()
NEW = [a for a in ALGOS if a != "flow-grpo"]


def config(tmp_path, algo, **overrides):
    cfg = algorithm_defaults(algo)
    cfg.output_dir = str(tmp_path / "runs")
    cfg.groups_per_step = 4
    cfg.group_size = 8 if algo == "tree-grpo" else 4
    cfg.steps, cfg.eval_samples = 2, 64
    cfg.tensorboard, cfg.sample_every, cfg.checkpoint_every = False, 0, 1000
    for key, value in overrides.items():
        target = cfg
        *path, last = key.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, last, value)
    return cfg


def test_every_algorithm_is_listed_and_described():
    from flowcoach.core.algorithms import describe

    expected = {"flow-grpo", "flow-grpo-fast", "mix-grpo", "mix-grpo-flash", "dense-grpo", "tree-grpo", "e-grpo",
                "tempflow-grpo", "diffusion-nft", "awm", "fpo"}
    assert expected <= set(ALGOS)
    assert all(len(describe(a)) > 60 for a in ALGOS)


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_raises_the_toy_reward(tmp_path, algo):
    # base: ~1/8 of the samples on the target mode (eval reward 0.108); 30 steps of 16 groups, ~1-2 s each
    cfg = config(tmp_path, algo, steps=30, groups_per_step=16, eval_samples=500, checkpoint_every=30)
    cfg.group_size = 8
    run = train(cfg)
    rows = read_metrics(run)
    assert rows[-1]["eval/reward_mean"] > 0.108 + 0.25, rows[-1]["eval/reward_mean"]
    assert rows[-1]["nfe/total"] == sum(r["nfe/step"] for r in rows) > 0
    plan = plan_batches(cfg, 1)
    assert all(0 < r["train/pairs"] <= plan.pairs_per_process for r in rows)
    base = dict(load_base(ToyDomain())[0].named_parameters())
    trained = final_weights(run)
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert any(not torch.equal(v, base[k].detach()) for k, v in trained.items())


@pytest.mark.parametrize("algo", ["flow-grpo-fast", "mix-grpo-flash", "tree-grpo", "e-grpo", "tempflow-grpo",
                                  "dense-grpo", "awm", "fpo"])
def test_ratio_is_exactly_one_before_the_update(tmp_path, algo):
    run = train(config(tmp_path, algo, steps=1, micro_batch=7, recompute_old_log_probs=True))
    row = read_metrics(run)[0]
    assert row["policy/ratio_mean"] == 1.0 and row["policy/clipfrac"] == 0.0 and row["policy/approx_kl"] == 0.0


@pytest.mark.parametrize("algo,extra", [
    ("diffusion-nft", {}),  # the soft-updated old policy is part of the state
    ("mix-grpo", {"sampler.window_every": 1}),  # the window's position depends on the step
    ("tree-grpo", {}),
    ("e-grpo", {}),
    ("awm", {"optimizer_steps_per_epoch": 2, "loss.anchor_weight": 0.5, "loss.anchor_batch": 16}),
    ("flow-grpo", {"loss.ratio_norm": True, "loss.best_of_n": 2, "loss.win_rate": True, "loss.diversity_bonus": 0.1,
                   "loss.kl_beta": 0.01, "rewards": ("toy-mode=1", "toy-on-manifold=0.2"), "loss.kl_gate": 0.5}),
])
def test_resume_equals_an_uninterrupted_run(tmp_path, algo, extra):
    kw = {"checkpoint_every": 2, **extra}
    straight = train(config(tmp_path / "straight", algo, steps=4, **kw))
    train(config(tmp_path / "split", algo, steps=2, **kw))
    resumed = train(config(tmp_path / "split", algo, steps=4, resume="latest", **kw))
    without_eval = lambda rows: [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in rows]  # noqa: E731
    assert without_eval(read_metrics(resumed)) == without_eval(read_metrics(straight))
    if "loss.anchor_weight" in extra:  # the anchoring loss is reported every step
        assert all(r["loss/anchor"] > 0 for r in read_metrics(straight))
    ws, wr = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(ws[k], wr[k]) for k in ws)
    if algo == "diffusion-nft":
        old_s = load_file(list_checkpoints(straight)[-1] / "old.safetensors")
        old_r = load_file(list_checkpoints(resumed)[-1] / "old.safetensors")
        assert all(torch.equal(old_s[k], old_r[k]) for k in old_s)
        assert any(not torch.equal(old_s[k], ws[k]) for k in old_s)  # the old policy lags the trained one


def test_tree_trains_each_edge_once_with_per_depth_advantages(tmp_path):
    cfg = config(tmp_path, "tree-grpo")
    policy = FlowPolicy(load_base(ToyDomain())[0])
    rollout = collect_rollout(policy, ToyDomain(), cfg, 0, "cpu")
    pairs = rollout.trained_pairs()
    assert len(pairs) == 4 * (2 + 4 + 8)  # edges of 4 binary trees of depth 3
    assert plan_batches(cfg, 1).pairs_per_process == len(pairs)
    assert rollout.nfe == 4 * (1 + 2 + 2 + 4 + 4 + 8 * 5)  # one path, 2 subtrees, 4, then 8 leaves to the end


def test_data_anchoring_draws_its_times_as_the_base_was_pretrained(tmp_path):
    x0, cond = ToyDomain().data("train")
    uniform = anchor_batch(AnchorData(x0, cond), config(tmp_path, "flow-grpo", **{"loss.anchor_batch": 20_000}),
                           0, 0, 1, 0)[2]
    assert abs(uniform.mean().item() - 0.5) < 0.01 and abs(uniform.var().item() - 1 / 12) < 0.003
    cfg = config(tmp_path, "flow-grpo", **{"loss.anchor_batch": 20_000, "loss.anchor_time_sampling": "logit-normal",
                                           "loss.anchor_logit_mean": -2.0, "loss.anchor_logit_std": 0.5})
    logits = torch.logit(anchor_batch(AnchorData(x0, cond), cfg, 0, 0, 1, 0)[2])  # logit(t) ~ N(-2, 0.5)
    assert abs(logits.mean().item() + 2.0) < 0.02 and abs(logits.std().item() - 0.5) < 0.015


@pytest.mark.parametrize("structure_weight", [0.0, 0.5])
def test_data_anchoring_adds_the_flow_matching_gradient_on_real_data(tmp_path, structure_weight):
    """And with loss.anchor_structure_weight, the structure term on x_t - t v, as pretraining adds it."""
    from accelerate import Accelerator

    domain = ToyDomain()
    cfg = config(tmp_path, "flow-grpo", **{"loss.anchor_weight": 0.3, "loss.anchor_batch": 12, "optim.max_grad_norm": 0.0,
                                           "loss.anchor_structure_weight": structure_weight})
    model = load_base(domain)[0]
    policy = FlowPolicy(model)
    rollout = collect_rollout(policy, domain, cfg, 0, "cpu")
    x0, cond = domain.data("train")
    structure = lambda x0_hat, data, c: (x0_hat - data).pow(2).sum(-1).sqrt()  # noqa: E731  (a toy's: how far off)
    part = anchor_batch(AnchorData(x0, cond, None, structure if structure_weight else None), cfg, 0, 0, 1, 0)
    assert part.structure is (structure if structure_weight else None)
    # the shares of 2 processes are the batch of 1
    halves = [anchor_batch(AnchorData(x0, cond), cfg, 0, 0, 2, r) for r in (0, 1)]
    assert all(torch.equal(torch.cat([h[i] for h in halves]), part[i]) for i in range(4))
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
    pairs = rollout.trained_pairs()
    stats = {k: [] for k in ("loss", "ratio", "clipped", "approx_kl", "kl")}
    optimizer_step_on(pairs, pairs[:1], policy, optimizer, Accelerator(cpu=True), rollout,
                      torch.zeros(rollout.batch_size), None, cfg, stats, anchor=part)
    # zero advantages: the step is the anchoring loss's gradient alone, computed here independently
    reference = load_base(domain)[0]
    xb, cb, t, eps = part[:4]
    tb = t[:, None]
    x_t = (1 - tb) * xb + tb * eps
    v = reference(x_t, t, cb)
    fm = ((v - (eps - xb)) ** 2).mean()
    off = (x_t - tb * v - xb).norm(dim=-1).mean()  # the Euler step to t = 0 against the data
    assert stats["anchor"] == [pytest.approx(float(fm), rel=1e-5)]  # the logged loss/anchor, unweighted
    assert stats.get("anchor_structure", []) == ([pytest.approx(float(off), rel=1e-5)] if structure_weight else [])
    (0.3 * (fm + structure_weight * off)).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(start[name] - p.detach(), dict(reference.named_parameters())[name].grad,
                                   atol=1e-6, rtol=1e-4)
    if structure_weight:
        with pytest.raises(FlowcoachError, match="set loss.anchor_weight > 0 too"):
            train(config(tmp_path, "flow-grpo", **{"loss.anchor_structure_weight": 0.5}), domain)
        with pytest.raises(FlowcoachError, match="no structure loss; drop loss.anchor_structure_weight"):
            train(config(tmp_path, "flow-grpo", **{"loss.anchor_weight": 0.3, "loss.anchor_structure_weight": 0.5}), domain)


def test_the_kl_gate_limits_the_kl_to_the_gated_samples(tmp_path):
    domain = ToyDomain()
    cfg = config(tmp_path, "flow-grpo", **{"loss.kl_beta": 1.0})
    base = load_base(domain)[0]
    policy = FlowPolicy(base, need_reference=True)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.01)  # now the policy differs from its reference
    rollout = collect_rollout(policy, domain, cfg, 0, "cpu")
    pairs = rollout.trained_pairs()
    zero = torch.zeros(rollout.batch_size)
    gate = torch.arange(rollout.batch_size) % 2 == 0
    _, full = pair_losses(policy, rollout, pairs, zero, cfg)
    _, gated = pair_losses(policy, rollout, pairs, zero, cfg, gate=gate)
    on = gate[pairs[:, 0]]
    assert (full["kl"] > 0).all() and torch.equal(gated["kl"][on], full["kl"][on]) and (gated["kl"][~on] == 0).all()


def test_a_time_budget_stops_the_run_with_its_final_evaluation(tmp_path):
    run = train(config(tmp_path, "flow-grpo", steps=50, time_budget_s=1e-9))
    rows = read_metrics(run)
    assert len(rows) == 1 and "eval/reward_mean" in rows[0]
    assert list_checkpoints(run)[-1].name == "checkpoint-1"
    assert json.loads((run / "eval" / "metrics.json").read_text())["step"] == 1


@pytest.mark.parametrize("overrides,message", [
    ({"sampler.structure": "tree", "group_size": 6}, "set --group-size 8"),
    ({"loss.advantage": "tree"}, "tree advantages need the tree rollout structure"),
    ({"loss.family": "nft", "loss.advantage": "dense"}, "takes one advantage per sample"),
    ({"sampler.structure": "forest"}, "unknown rollout structure 'forest'; choose one of: branch, merged, tree, window"),
    ({"sampler.structure": "merged", "sampler.merge_branch_points": 3}, "must split into"),
    ({"loss.kl_beta": 0.1, "loss.kl_gate": 0.5}, "at least 2 reward components"),
])
def test_bad_combinations_fail_with_one_line(tmp_path, overrides, message):
    with pytest.raises(FlowcoachError, match=message):
        train(config(tmp_path, "flow-grpo", steps=1, **overrides))


def test_interact_domains_refuse_tree_and_dense_and_train_fpo(tmp_path):
    from flowcoach.core.pretrain import PretrainConfig, pretrain
    from tests.core.test_interact import make_domain

    domain = make_domain(tmp_path)
    base = pretrain(PretrainConfig(domain="point-reach", steps=150, batch_size=128, eval_samples=8,
                                   output=str(tmp_path / "base")), domain=domain)
    for algo, message in (("tree-grpo", "shares denoising states"), ("dense-grpo", "scores whole episodes")):
        with pytest.raises(FlowcoachError, match=message):
            train(config(tmp_path, algo, base=str(base)), domain=domain)
    for algo in ("fpo", "e-grpo", "diffusion-nft"):
        run = train(config(tmp_path / algo, algo, steps=2, base=str(base), eval_samples=8), domain=domain)
        rows = read_metrics(run)
        assert rows[-1]["train/pairs"] > 0 and all(r["grad_norm"] > 0 for r in rows)


def _run_cli(cwd, processes: int, args: list[str], port: int):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "flowcoach.core.cli", *args]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
               str(port), "-m", "flowcoach.core.cli", *args]
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (cwd / "runs").iterdir()
    return run_dir


@pytest.mark.parametrize("algo,extra", [
    ("tree-grpo", []),  # shared states, per-edge advantages computed per process on whole trees
    pytest.param("diffusion-nft", ["--loss.anchor-weight", "0.5", "--loss.anchor-batch", "16"], marks=pytest.mark.slow),
    pytest.param("e-grpo", ["--loss.win-rate"], marks=pytest.mark.slow),
    pytest.param("dense-grpo", ["--loss.dense-estimate", "tweedie"], marks=pytest.mark.slow),
])
def test_two_processes_match_one(tmp_path, algo, extra):
    args = ["train", "toy", "--algo", algo, "--steps", "2", "--groups-per-step", "4", "--group-size",
            "8" if algo == "tree-grpo" else "4", "--eval-samples", "32", "--device", "cpu", "--no-tensorboard",
            "--output-dir", "runs", *extra]
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    one = _run_cli(tmp_path / "one", 1, args, 0)
    two = _run_cli(tmp_path / "two", 2, args, 29531)
    w1 = load_file(list_checkpoints(one)[-1] / "trainable.safetensors")
    w2 = load_file(list_checkpoints(two)[-1] / "trainable.safetensors")
    # equal up to the order of a float sum, which AdamW can blow up to part of one lr-sized (3e-4)
    # step on elements whose gradient is near its eps (see tests/core/test_distributed.py): nearly
    # every element must agree to 1e-6 and none may differ by half a step
    for name in w1:
        diff = (w2[name] - w1[name]).abs()
        assert float(diff.max()) < 1.5e-4 and float((diff > 1e-6).float().mean()) < 1e-3, name
    m1, m2 = read_metrics(one), read_metrics(two)
    for a, b in zip(m1, m2):
        assert abs(a["reward/mean"] - b["reward/mean"]) < 1e-6 and a["nfe/total"] == b["nfe/total"]
