"""A run never loses work: kill -9 during a checkpoint save, corrupt and wrong-domain checkpoints,
configs that do not fit, non-finite losses and rewards, and rewards that raise on one sample."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowcoach.core.checkpoint import (checkpoint_problem, clean_stale, list_checkpoints, load_trained,
                                       save_checkpoint)
from flowcoach.core.cli import main
from flowcoach.core.domain import get_domain
from flowcoach.core.registry import FlowcoachError
from flowcoach.domains.toy import ToyDomain
from flowcoach.core.sampling.rollout import index_cond
from flowcoach.rewards import CompositeReward, short_repr

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--groups-per-step", "4", "--group-size", "4", "--eval-samples", "64", "--sample-every", "0",
         "--no-tensorboard", "--output-dir", "runs"]

# Runs the real `flowcoach` CLI; the checkpoint writer is wrapped so the process stops, at a known
# point of step KILL_STEP's save, writes a marker and sleeps until the test sends SIGKILL.
HOOK = r'''
import os, sys, time
from pathlib import Path
from flowcoach.core import checkpoint
from flowcoach.core.cli import main

STAGE, STEP, MARK = os.environ["KILL_STAGE"], int(os.environ["KILL_STEP"]), Path(os.environ["KILL_MARK"])

def hold(stage, step):
    if stage == STAGE and step == STEP:
        MARK.write_text(stage)
        time.sleep(600)

save_file = checkpoint.save_file
def save_file_then_hold(tensors, path, *a, **k):  # "weights": trainable.safetensors written, the rest not
    save_file(tensors, path, *a, **k)
    if Path(path).name == "trainable.safetensors":
        hold("weights", int(Path(path).parent.name.rsplit("-", 1)[1]))
checkpoint.save_file = save_file_then_hold

commit = checkpoint._commit
def hold_then_commit(tmp, final):  # "state": the folder is complete, state.json too, not yet renamed
    hold("state", int(final.name.rsplit("-", 1)[1]))
    commit(tmp, final)
checkpoint._commit = hold_then_commit

prune = checkpoint._prune
def hold_then_prune(run_dir, keep):  # "prune": the new checkpoint is in place, the old not yet removed
    hold("prune", max(int(p.name.rsplit("-", 1)[1]) for p in checkpoint.list_checkpoints(run_dir)))
    prune(run_dir, keep)
checkpoint._prune = hold_then_prune

sys.exit(main(sys.argv[1:]))
'''


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def cli_in(cwd: Path, args: list[str]) -> int:
    """core.cli.main in-process, in folder ``cwd``, on one torch thread like the killed subprocess
    (OMP_NUM_THREADS=1): runs compared bit for bit must sum in the same order."""
    old, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(cwd)
    torch.set_num_threads(1)
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)
        os.chdir(old)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted 6-step CLI run: what a killed and resumed one must end equal to."""
    cwd = tmp_path_factory.mktemp("straight")
    assert cli_in(cwd, ["train", "toy", "--steps", "6", "--checkpoint-every", "1", *SMALL]) == 0
    (run,) = (cwd / "runs").iterdir()
    return run


def kill_during_save(tmp_path: Path, stage: str, step: int = 3) -> Path:
    """Start `flowcoach train toy` (6 steps, a checkpoint every step), SIGKILL it inside step
    ``step``'s save at ``stage``; returns the run folder."""
    (tmp_path / "hook.py").write_text(HOOK)
    mark = tmp_path / "held"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_STAGE": stage, "KILL_STEP": str(step), "KILL_MARK": str(mark)}
    log = open(tmp_path / "stderr.txt", "w")  # a file, not a pipe: a full pipe would block the run
    proc = subprocess.Popen([sys.executable, str(tmp_path / "hook.py"), "train", "toy", "--steps", "6",
                             "--checkpoint-every", "1", *SMALL], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 240
        while not mark.exists():
            assert proc.poll() is None, f"training ended before the save was held: {(tmp_path / 'stderr.txt').read_text()}"
            assert time.monotonic() < deadline, "the save was never reached"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    (run,) = (tmp_path / "runs").iterdir()
    return run


@pytest.mark.parametrize("stage,left,resumes_from", [
    ("weights", ["checkpoint-1", "checkpoint-2"], "checkpoint-2"),   # killed mid-write, in the temp folder
    pytest.param("state", ["checkpoint-1", "checkpoint-2"], "checkpoint-2",  # complete temp folder, not renamed
                 marks=pytest.mark.slow),
    pytest.param("prune", ["checkpoint-1", "checkpoint-2", "checkpoint-3"], "checkpoint-3",  # renamed, old kept
                 marks=pytest.mark.slow),
])
def test_kill_9_during_a_checkpoint_keeps_the_previous_one_and_resume_continues(tmp_path, capsys, straight_run,
                                                                                stage, left, resumes_from):
    run = kill_during_save(tmp_path, stage)
    assert [p.name for p in list_checkpoints(run)] == left
    tmp = run / "checkpoints" / ".tmp-checkpoint-3"
    assert tmp.exists() == (stage != "prune")
    if stage == "weights":
        assert (tmp / "trainable.safetensors").exists() and not (tmp / "state.json").exists()
    assert steps_logged(run) == [1, 2, 3]  # step 3 was logged before its save

    assert cli_in(tmp_path, ["train", "toy", "--steps", "6", "--resume", "latest", *SMALL]) == 0
    assert f"from {resumes_from}" in capsys.readouterr().out
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["checkpoint-5", "checkpoint-6"]  # the stale temp folder is gone, keep=2 pruned the rest
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]  # steps after the checkpoint were redone, once
    # the killed-and-resumed run ends exactly where the uninterrupted one does
    resumed = load_file(run / "checkpoints" / "checkpoint-6" / "trainable.safetensors")
    straight = load_file(straight_run / "checkpoints" / "checkpoint-6" / "trainable.safetensors")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert json.loads((run / "eval" / "metrics.json").read_text()) == \
        json.loads((straight_run / "eval" / "metrics.json").read_text())


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    assert cli_in(tmp_path, ["train", "toy", "--steps", "2", "--checkpoint-every", "1", *SMALL]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    shutil.rmtree(run / "checkpoints" / "checkpoint-2")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward/me')  # a kill in the middle of a write
    assert cli_in(tmp_path, ["train", "toy", "--steps", "3", "--resume", "latest", *SMALL]) == 0
    assert steps_logged(run) == [1, 2, 3]


# ----------------------------------------------------------------------------- checkpoint folder logic
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))


def save(run, step, keep=2, value=None):
    model = Tiny()
    if value is not None:
        model.w.data.fill_(value)
    opt = torch.optim.AdamW(model.parameters())
    return save_checkpoint(run, step, model, opt, None, {"domain": "toy"}, keep)


def test_save_prunes_only_after_the_new_checkpoint_is_in_place_and_cleans_stale_folders(tmp_path):
    for step in (1, 2):
        save(tmp_path, step)
    stale = tmp_path / "checkpoints" / ".tmp-checkpoint-7"
    stale.mkdir()
    (stale / "trainable.safetensors").write_bytes(b"half")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]  # ignored
    save(tmp_path, 3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-3" / "state.json").read_text())
    assert state["step"] == 3 and set(state["files"]) == {"trainable.safetensors", "optimizer.pt"}


def test_a_same_step_checkpoint_moved_aside_by_a_killed_save_is_restored(tmp_path):
    final = save(tmp_path, 4, value=1.0)
    aside = final.with_name(".old-checkpoint-4")
    os.replace(final, aside)  # a kill between the two renames of a same-step save
    (tmp_path / "checkpoints" / ".tmp-checkpoint-4").mkdir()
    assert list_checkpoints(tmp_path) == []
    clean_stale(tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4"]
    assert not aside.exists() and not (tmp_path / "checkpoints" / ".tmp-checkpoint-4").exists()
    save(tmp_path, 4, value=2.0)  # a same-step save replaces it whole
    assert float(load_file(final / "trainable.safetensors")["w"][0, 0]) == 2.0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-4"]


def test_completeness_sees_truncated_and_missing_files_and_bad_state(tmp_path):
    path = save(tmp_path, 1)
    assert checkpoint_problem(path) is None
    weights = path / "trainable.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert "trainable.safetensors has" in checkpoint_problem(path)
    weights.write_bytes(data)
    (path / "optimizer.pt").unlink()
    assert checkpoint_problem(path) == "optimizer.pt is missing"
    (path / "state.json").write_text("{not json")
    assert "state.json is unreadable" in checkpoint_problem(path)
    assert list_checkpoints(tmp_path) == []


# ----------------------------------------------------------------------------- one-line CLI errors
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 3-step toy run with checkpoints 2 and 3 (made in-process by the CLI)."""
    cwd = tmp_path_factory.mktemp("finished")
    assert cli_in(cwd, ["train", "toy", "--steps", "3", "--checkpoint-every", "1", *SMALL]) == 0
    (run,) = (cwd / "runs").iterdir()
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(finished_run, tmp_path / "runs" / finished_run.name)
    return tmp_path / "runs" / finished_run.name


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys, args) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 3])


class OtherToy(ToyDomain):
    """The toy under another name: a checkpoint of the toy is not one of this domain."""

    name = "other-toy"


def test_truncated_weights_of_a_named_checkpoint(run_copy, capsys):
    ckpt = run_copy / "checkpoints" / "checkpoint-3"
    truncate(ckpt / "trainable.safetensors")
    before = snapshot(run_copy)
    err = one_line_error(capsys, ["train", "toy", "--steps", "5", "--resume", str(ckpt), *SMALL])
    assert "checkpoint-3' is incomplete or corrupt: trainable.safetensors has" in err
    assert "resume from an older one" in err
    err = one_line_error(capsys, ["eval", "toy", "--checkpoint", str(ckpt), "--num-samples", "16"])
    assert "incomplete or corrupt" in err
    assert snapshot(run_copy) == before  # nothing already written is touched


def test_resume_latest_passes_over_a_corrupt_newest_checkpoint(run_copy, capsys):
    truncate(run_copy / "checkpoints" / "checkpoint-3" / "optimizer.pt")
    assert main(["train", "toy", "--steps", "4", "--resume", "latest", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "warning: skipping checkpoint-3 (optimizer.pt has" in out and "from checkpoint-2" in out
    assert steps_logged(run_copy) == [1, 2, 3, 4]


def test_eval_of_a_run_passes_over_a_corrupt_newest_checkpoint(run_copy, capsys):
    truncate(run_copy / "checkpoints" / "checkpoint-3" / "trainable.safetensors")
    assert main(["eval", "toy", "--checkpoint", str(run_copy), "--num-samples", "16"]) == 0
    out = capsys.readouterr().out
    assert "warning: skipping checkpoint-3 (trainable.safetensors has" in out and "using checkpoint-2" in out
    assert (run_copy / "eval" / "checkpoint-2__n16__steps40" / "metrics.json").exists()
    for name in ("checkpoint-2", "checkpoint-3"):
        shutil.rmtree(run_copy / "checkpoints" / name, ignore_errors=True)
    (run_copy / "checkpoints" / "checkpoint-1").mkdir(exist_ok=True)
    err = one_line_error(capsys, ["eval", "toy", "--checkpoint", str(run_copy), "--num-samples", "16"])
    assert "holds no complete checkpoint (checkpoint-1: it has no state.json)" in err


def test_same_size_corruption_is_caught_by_the_hash(run_copy, capsys):
    ckpt = run_copy / "checkpoints" / "checkpoint-3"
    data = bytearray((ckpt / "trainable.safetensors").read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the last weight: same size, still parses
    (ckpt / "trainable.safetensors").write_bytes(bytes(data))
    err = one_line_error(capsys, ["train", "toy", "--steps", "5", "--resume", str(ckpt), *SMALL])
    assert "is corrupt: trainable.safetensors does not match its recorded sha256" in err


@pytest.mark.parametrize("state_text,expected", [
    ("{\"step\": 3, \"domain\": \"to", "its state.json is unreadable (JSONDecodeError)"),
    ("[1, 2]", "its state.json has no step"),
])
def test_bad_state_json(run_copy, capsys, state_text, expected):
    ckpt = run_copy / "checkpoints" / "checkpoint-3"
    (ckpt / "state.json").write_text(state_text)
    before = snapshot(run_copy)
    for args in (["train", "toy", "--steps", "5", "--resume", str(ckpt), *SMALL],
                 ["eval", "toy", "--checkpoint", str(ckpt), "--num-samples", "16"]):
        assert expected in one_line_error(capsys, args)
    assert snapshot(run_copy) == before


def test_missing_state_json_of_a_named_checkpoint(run_copy, capsys):
    ckpt = run_copy / "checkpoints" / "checkpoint-3"
    (ckpt / "state.json").unlink()
    err = one_line_error(capsys, ["train", "toy", "--steps", "5", "--resume", str(ckpt), *SMALL])
    assert "checkpoint-3' is incomplete or corrupt: it has no state.json" in err


def test_checkpoint_of_another_domain(run_copy, capsys):
    other = "tests.core.test_reliability:OtherToy"
    before = snapshot(run_copy)
    err = one_line_error(capsys, ["train", other, "--steps", "5", "--resume", str(run_copy), *SMALL])
    assert "was trained on domain 'toy', not 'other-toy'" in err
    err = one_line_error(capsys, ["eval", other, "--checkpoint", str(run_copy), "--num-samples", "16"])
    assert "was trained on domain 'toy', not 'other-toy'" in err
    assert snapshot(run_copy) == before
    with pytest.raises(FlowcoachError, match="not 'other-toy'"):
        load_trained(get_domain(other), run_copy / "checkpoints" / "checkpoint-2")


def test_unreadable_run_config(run_copy, capsys):
    (run_copy / "config.yaml").write_text("steps: [unclosed")
    before = snapshot(run_copy)
    err = one_line_error(capsys, ["train", "toy", "--steps", "5", "--resume", str(run_copy), *SMALL])
    assert "config.yaml' is unreadable" in err
    assert snapshot(run_copy) == before


def test_steps_behind_the_checkpoint(run_copy, capsys):
    before = snapshot(run_copy)
    err = one_line_error(capsys, ["train", "toy", "--steps", "2", "--resume", "latest", *SMALL])
    assert "checkpoint-3 is at step 3; --steps 2 is behind it" in err
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("flags,expected", [
    (["--groups-per-step", "0"], "groups_per_step must be >= 1, got 0"),
    (["--micro-batch", "0"], "micro_batch must be >= 1, got 0"),
    (["--inner-epochs", "0"], "inner_epochs must be >= 1"),
    (["--optimizer-steps-per-epoch", "1000"], "optimizer_steps_per_epoch=1000 exceeds the 144 (sample, step) pairs"),
    (["--checkpoint-every", "0"], "checkpoint_every must be >= 1, got 0"),
    (["--eval-samples", "0"], "eval_samples must be >= 1, got 0"),
    (["--sample-every", "-1"], "sample_every must be >= 0, got -1"),
    (["--loss.anchor-weight", "1", "--loss.anchor-batch", "0"], "loss.anchor_batch must be >= 1"),
    (["--loss.anchor-time-sampling", "logit-normal", "--loss.anchor-logit-std", "0"], "loss.anchor_logit_std must be > 0"),
    (["--sampler.num-steps", "0"], "sampler.num_steps and sampler.eval_num_steps must be >= 1"),
    (["--loss.advantage", "tree"], "tree advantages need the tree rollout structure"),
])
def test_configs_that_do_not_fit(tmp_path, monkeypatch, capsys, flags, expected):
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, ["train", "toy", "--steps", "2", *SMALL, *flags])
    assert expected in err
    assert not (tmp_path / "runs").exists()  # refused before anything is written


def test_a_resume_that_does_not_fit_leaves_the_run_as_it_was(run_copy, capsys):
    cfg = (run_copy / "config.yaml").read_text()
    (run_copy / "config.yaml").write_text(cfg.replace("group_size: 4", "group_size: 1"))
    before = snapshot(run_copy)
    err = one_line_error(capsys, ["train", "toy", "--steps", "5", "--resume", "latest", *SMALL])
    assert "group_size must be >= 2" in err
    assert snapshot(run_copy) == before


# ----------------------------------------------------------------------------- non-finite losses
def test_a_non_finite_loss_skips_the_optimizer_step_and_is_counted(tmp_path, monkeypatch):
    from flowcoach.core import trainer
    from tests.core.test_trainer import final_weights, read_metrics, small_config

    real = trainer.pair_losses
    calls = {"n": 0}

    def nan_first_loss(*args, **kwargs):
        loss, info = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 1 else loss), info

    monkeypatch.setattr(trainer, "pair_losses", nan_first_loss)
    domain = ToyDomain()
    base = dict(trainer.load_base(domain)[0].named_parameters())
    run = trainer.train(small_config(tmp_path, steps=2, checkpoint_every=1, optimizer_steps_per_epoch=2), domain=domain)
    rows = read_metrics(run)
    assert [r["skipped/nonfinite_loss"] for r in rows] == [1, 0]
    assert [r["skipped/optimizer_steps_total"] for r in rows] == [1, 1]
    assert all(r["skipped/nonfinite_reward"] == 0 for r in rows)
    assert all(torch.isfinite(v).all() for v in final_weights(run).values())
    assert any(not torch.equal(v, base[k].detach()) for k, v in final_weights(run).items())  # later steps trained


# ----------------------------------------------------------------------------- rewards that raise
def fragile_reward(objects, conditions):
    """Raises on any point with x > 100 (a reward's bug on an odd sample); else 1 + x."""
    x = torch.as_tensor([float(o[0]) for o in objects])
    if (x > 100).any():
        raise ValueError(f"cannot score x={float(x.max()):g}")
    return 1 + x, {"scored": len(objects)}


def batch_only_reward(objects, conditions):
    if len(objects) > 1:
        raise RuntimeError("needs one at a time")
    return torch.zeros(len(objects)), {}


def floored_reward(objects, conditions):
    return fragile_reward(objects, conditions)


floored_reward.floor = -5.0


OBJECTS = [torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([500.0, 7.0]), torch.tensor([2.0, 0.0])]
COND = torch.arange(4)


def test_a_reward_that_raises_is_reported_with_its_sample_and_raised_by_default():
    reward = CompositeReward({"tests.core.test_reliability:fragile_reward": 1.0})
    with pytest.raises(FlowcoachError) as e:
        reward(OBJECTS, COND)
    message = str(e.value)
    assert "reward 'tests.core.test_reliability:fragile_reward' raised on sample 2 of 4 (tensor([500., 7.]))" in message
    assert "ValueError: cannot score x=500" in message and "--reward-errors floor|skip" in message
    assert "\n" not in message


def test_floor_gives_the_failing_sample_the_floor_and_counts_it(capsys):
    name = "tests.core.test_reliability:fragile_reward"
    scores, info = CompositeReward({name: 2.0}, on_error="floor")(OBJECTS, COND)
    assert scores.tolist() == [2.0, 4.0, 2.0, 6.0]  # the batch's lowest score (1.0) x weight 2
    assert info["errors"] == 1 and info[f"{name}/errors"] == 1 and info[f"{name}/scored"] == 3  # the others, once
    assert "raised on sample 2 of 4" in capsys.readouterr().out
    scores, _ = CompositeReward({"tests.core.test_reliability:floored_reward": 1.0}, on_error="floor")(OBJECTS, COND)
    assert scores.tolist() == [1.0, 2.0, -5.0, 3.0]  # the reward's own floor attribute


def test_skip_scores_nan_and_a_batch_only_failure_always_raises():
    scores, info = CompositeReward({"tests.core.test_reliability:fragile_reward": 1.0}, on_error="skip")(OBJECTS, COND)
    assert torch.isnan(scores[2]) and torch.isfinite(scores[[0, 1, 3]]).all() and info["errors"] == 1
    with pytest.raises(FlowcoachError, match="raised on the batch of 4 but on no sample alone: RuntimeError"):
        CompositeReward({"tests.core.test_reliability:batch_only_reward": 1.0}, on_error="floor")(OBJECTS, COND)
    ok, info = CompositeReward({"toy-mode": 1.0})(OBJECTS[:2], COND[:2])
    assert info["errors"] == 0


def test_index_cond_and_short_repr():
    assert index_cond(None, [1]) is None
    assert index_cond({"a": torch.arange(3), "b": [5, 6, 7]}, [2])["b"] == [7]
    assert torch.equal(index_cond(torch.arange(5), [3]), torch.tensor([3]))
    assert len(short_repr(list(range(1000)))) == 60 and "\n" not in short_repr(torch.zeros(30, 30))


class FragileToy(ToyDomain):
    """The toy whose reward raises on one sample of the first rollout (its samples are points)."""

    def default_rewards(self):
        return {"tests.core.test_reliability:raise_on_a_point": 1.0}


_bad: dict = {}


def raise_on_a_point(objects, conditions):
    """Raises on any batch holding sample 5 of the first batch it saw (a reward's bug on one odd
    object); else scores -|x|."""
    x = torch.as_tensor([list(map(float, o)) for o in objects])
    _bad.setdefault("point", x[5].clone() if len(x) > 5 else None)
    if _bad["point"] is not None and (x == _bad["point"]).all(dim=1).any():
        raise ZeroDivisionError("odd sample")
    return -x.norm(dim=1), {}


@pytest.mark.parametrize("mode", ["raise", "floor", "skip"])
def test_reward_errors_through_the_cli(tmp_path, monkeypatch, capsys, mode):
    monkeypatch.chdir(tmp_path)
    _bad.clear()
    args = ["train", "tests.core.test_reliability:FragileToy", "--steps", "2", "--checkpoint-every", "1",
            "--reward-errors", mode, *SMALL]
    if mode == "raise":
        err = one_line_error(capsys, args)
        assert "reward 'tests.core.test_reliability:raise_on_a_point' raised on sample 5 of 16" in err
        assert "ZeroDivisionError: odd sample" in err
        return
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "raised on sample 5 of 16" in out and f"reward_errors={mode}" in out
    (run,) = (tmp_path / "runs").iterdir()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["reward/errors"] == 1 and rows[1]["reward/errors"] == 0
    assert rows[0]["skipped/nonfinite_reward"] == (1 if mode == "skip" else 0)
    if mode == "floor":
        assert rows[0]["train/pairs"] == 144  # the step trained, the sample floored
    assert list_checkpoints(run)[-1].name == "checkpoint-2"
