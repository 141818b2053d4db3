"""The console script: a smoke run of every command and one-line errors for bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowcoach.core.cli import main

FLOWCOACH = [sys.executable, "-m", "flowcoach.core.cli"]


def run_cli(*args, cwd):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*FLOWCOACH, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_train_eval_sample_smoke(tmp_path):
    out = run_cli("train", "toy", "--algo", "flow-grpo", "--steps", "3", "--groups-per-step", "4", "--group-size", "4",
                  "--eval-samples", "64", "--sample-every", "3", "--output-dir", "runs", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "batch arithmetic" in out.stdout and "eval:" in out.stdout
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("toy__flow-grpo__0__")
    for path in ("config.yaml", "metrics.jsonl", "checkpoints/checkpoint-3/trainable.safetensors",
                 "checkpoints/checkpoint-3/optimizer.pt", "checkpoints/checkpoint-3/state.json",
                 "samples/step-3/samples.png", "eval/metrics.json", "tensorboard"):
        assert (run / path).exists(), path
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3

    resumed = run_cli("train", "toy", "--steps", "4", "--groups-per-step", "4", "--group-size", "4",
                      "--eval-samples", "64", "--output-dir", "runs", "--resume", "latest", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "from checkpoint-3" in resumed.stdout

    ev = run_cli("eval", "toy", "--checkpoint", str(run), "--num-samples", "100", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert json.loads((run / "eval" / "metrics.json").read_text())["step"] == 4  # the run's own eval is kept
    assert (run / "eval" / "report.md").exists()
    cli_eval = run / "eval" / "checkpoint-4__n100__steps40"
    metrics = json.loads((cli_eval / "metrics.json").read_text())
    assert {"target_hit_rate", "on_manifold_rate", "reward_mean"} <= set(metrics)
    assert "| target_hit_rate |" in (cli_eval / "report.md").read_text() and "target_hit_rate" in ev.stdout

    sde = run_cli("eval", "toy", "--checkpoint", str(run), "--num-samples", "100", "--sde-noise-level", "0.7",
                  "--sde-t-max", "0.5", "--sde-t-min", "0.1", cwd=tmp_path)
    assert sde.returncode == 0, sde.stderr
    report = (run / "eval" / "checkpoint-4__n100__steps40__sde0.7_0.1-0.5" / "report.md").read_text()
    assert "flow SDE at 0.7 on t in (0.1, 0.5]" in report  # beside the ODE evaluation, not over it
    assert json.loads((cli_eval / "metrics.json").read_text()) == metrics

    sm = run_cli("sample", "toy", "--num-samples", "16", "--output", "out", cwd=tmp_path)
    assert sm.returncode == 0, sm.stderr
    assert (tmp_path / "out" / "samples.npy").exists()


def test_domains_and_check_domain(capsys):
    assert main(["domains"]) == 0
    listing = capsys.readouterr().out
    domains_line = next(line for line in listing.splitlines() if line.startswith("domains:"))
    assert "toy" in [w.strip(",") for w in domains_line.split()] and "flow-grpo" in listing and "toy-mode" in listing and "cps" in listing
    assert main(["check-domain", "toy"]) == 0
    assert "toy: " in capsys.readouterr().out


@pytest.mark.parametrize("args,expected", [
    (["train", "nope"], "unknown domain 'nope'; choose one of: "),
    (["train", "toy", "--algo", "nope"], "unknown algorithm 'nope'; choose one of: awm, dense-grpo, diffusion-nft, e-grpo, flow-grpo"),
    (["train", "toy", "--group-size", "1"], "group_size must be >= 2"),
    (["train", "toy", "--sampler.noise-level", "-0.5"], "noise_level must be >= 0"),
    (["train", "toy", "--sampler.law", "brownian"], "unknown noise law 'brownian'; choose one of: const-eta, cps, flow-sde, ode"),
    (["train", "toy", "--base", "no/such/folder"], "no base model at 'no/such/folder'"),
    (["train", "toy", "--resume", "latest", "--output-dir", "empty"], "no run of toy__flow-grpo__0 with a checkpoint"),
    (["eval", "toy", "--checkpoint", "no/such/run"], "checkpoint 'no/such/run' does not exist"),
    (["eval", "toy", "--sde-noise-level", "0.5", "--sde-t-min", "0.6", "--sde-t-max", "0.4"],
     "0 <= --sde-t-min < --sde-t-max <= 1"),
    (["frobnicate"], "unknown command 'frobnicate'; choose one of: domains, pretrain, train"),
])
def test_bad_input_is_one_line_naming_the_choices(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err and "Traceback" not in err


def test_pretrain_writes_a_loadable_base(tmp_path, capsys):
    assert main(["pretrain", "toy", "--steps", "50", "--eval-samples", "100", "--output", str(tmp_path / "base")]) == 0
    record = json.loads((tmp_path / "base" / "base.json").read_text())
    assert record["config"]["steps"] == 50 and "target_hit_rate" in record["eval"]["metrics"]
    assert main(["eval", "toy", "--base", str(tmp_path / "base"), "--num-samples", "50",
                 "--output", str(tmp_path / "ev")]) == 0
    weights = (tmp_path / "base" / "model.safetensors").read_bytes()
    capsys.readouterr()
    # a finished base (a shipped one, say) is never written over: a one-line error, the base as it was
    assert main(["pretrain", "toy", "--steps", "5", "--output", str(tmp_path / "base")]) != 0
    err = capsys.readouterr().err
    assert "already holds a base" in err and "Traceback" not in err
    assert (tmp_path / "base" / "model.safetensors").read_bytes() == weights


class StopsAfter:
    """The toy domain, stopped (as by Ctrl-C) on its n-th pretraining batch."""

    def __init__(self, n: int):
        from flowcoach.domains.toy import ToyDomain

        self.domain, self.calls, self.n = ToyDomain(), 0, n

    def __getattr__(self, name):
        return getattr(self.domain, name)

    def pretrain_batch(self, *args):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.domain.pretrain_batch(*args)


def test_a_stopped_pretraining_resumes_to_the_weights_of_an_unstopped_one(tmp_path):
    from safetensors.torch import load_file

    from flowcoach.core.pretrain import PretrainConfig, pretrain
    from flowcoach.core.registry import FlowcoachError
    from flowcoach.domains.toy import ToyDomain

    flags = dict(domain="toy", steps=12, batch_size=64, ema_decay=0.9, save_every=4, eval_samples=50)
    whole = pretrain(PretrainConfig(**flags, output=str(tmp_path / "whole")), ToyDomain())
    assert not (whole / "pretrain_state.pt").exists()  # a finished base carries no optimizer state
    out = str(tmp_path / "stopped")
    with pytest.raises(KeyboardInterrupt):
        pretrain(PretrainConfig(**flags, output=out), StopsAfter(11))  # stopped at step 11: last save at 8
    assert json.loads((tmp_path / "stopped" / "base.json").read_text())["step"] == 8
    with pytest.raises(FlowcoachError, match="--resume"):  # a plain rerun would overwrite it
        pretrain(PretrainConfig(**flags, output=out), ToyDomain())
    with pytest.raises(FlowcoachError, match="--lr"):
        pretrain(PretrainConfig(**{**flags, "lr": 1e-4}, output=out, resume=True), ToyDomain())
    state_path = tmp_path / "stopped" / "pretrain_state.pt"
    state = torch.load(state_path, weights_only=False)
    for key in ("time_sampling", "logit_mean", "logit_std"):  # a state saved before these flags existed
        del state["config"][key]
    torch.save(state, state_path)
    resumed = pretrain(PretrainConfig(**flags, output=out, resume=True), ToyDomain())
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same EMA weights, bit for bit
    with pytest.raises(FlowcoachError, match="nothing to resume"):
        pretrain(PretrainConfig(**flags, output=str(tmp_path / "none"), resume=True), ToyDomain())


def test_logit_normal_flow_times_reach_the_pretraining_loss(tmp_path, monkeypatch):
    import flowcoach.core.pretrain as pretraining
    from flowcoach.core.registry import FlowcoachError
    from flowcoach.domains.toy import ToyDomain

    # t = sigmoid(u), u ~ N(-2, 0.5): median sigmoid(-2), and P(t < sigmoid(-1.5)) = Phi(1)
    t = pretraining.flow_times(40_000, torch.Generator().manual_seed(0), "logit-normal", -2.0, 0.5)
    assert abs(t.median().item() - 1 / (1 + math.exp(2.0))) < 0.003
    assert abs((t < 1 / (1 + math.exp(1.5))).float().mean().item() - 0.8413) < 0.006
    seen = []
    loss = pretraining.flow_matching_loss
    monkeypatch.setattr(pretraining, "flow_matching_loss", lambda *a, t=None, **k: seen.append(t) or loss(*a, t=t, **k))
    pretraining.pretrain(pretraining.PretrainConfig(domain="toy", steps=5, batch_size=512, eval_samples=20,
                                                    time_sampling="logit-normal", logit_mean=-2.0, logit_std=0.5,
                                                    output=str(tmp_path / "b")), ToyDomain())
    logits = torch.logit(torch.cat(seen))
    assert len(seen) == 5 and abs(logits.mean().item() + 2.0) < 0.05 and abs(logits.std().item() - 0.5) < 0.04
    with pytest.raises(FlowcoachError, match="--logit-std"):
        pretraining.pretrain(pretraining.PretrainConfig(domain="toy", time_sampling="logit-normal", logit_std=0.0,
                                                        output=str(tmp_path / "c")), ToyDomain())


def test_a_structure_weight_needs_a_domain_with_a_structure_loss(tmp_path):
    from flowcoach.core.pretrain import PretrainConfig, pretrain
    from flowcoach.core.registry import FlowcoachError
    from flowcoach.domains.toy import ToyDomain

    with pytest.raises(FlowcoachError, match="no structure loss; drop --structure-weight"):
        pretrain(PretrainConfig(domain="toy", steps=2, structure_weight=0.1, output=str(tmp_path / "a")), ToyDomain())
    assert not (tmp_path / "a").exists()  # refused before anything was written


def test_init_from_continues_a_finished_base(tmp_path):
    from safetensors.torch import load_file

    from flowcoach.core.pretrain import PretrainConfig, pretrain
    from flowcoach.domains.toy import ToyDomain

    first = pretrain(PretrainConfig(domain="toy", steps=20, eval_samples=50, output=str(tmp_path / "a")), ToyDomain())
    again = pretrain(PretrainConfig(domain="toy", steps=3, lr=1e-6, seed=1, eval_samples=50, init_from=str(first),
                                    output=str(tmp_path / "b")), ToyDomain())
    a, b = load_file(first / "model.safetensors"), load_file(again / "model.safetensors")
    # 3 AdamW steps of lr 1e-6 move each weight by at most ~3e-6 from the base it started from
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # and it did train
