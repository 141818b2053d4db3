"""Two CPU processes (gloo, torchrun) give the same run as one process at the same global batch."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from flowcoach.core.checkpoint import list_checkpoints

ARGS = ["train", "toy", "--steps", "2", "--groups-per-step", "4", "--group-size", "4", "--eval-samples", "32",
        "--device", "cpu", "--no-tensorboard", "--output-dir", "runs"]


def run(cwd, processes: int):
    cmd = [sys.executable, "-m", "flowcoach.core.cli", *ARGS]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
               "29517", "-m", "flowcoach.core.cli", *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (cwd / "runs").iterdir()
    return run_dir, out.stdout


def test_two_processes_match_one(tmp_path):
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    one, _ = run(tmp_path / "one", 1)
    two, stdout = run(tmp_path / "two", 2)
    assert "over 2 process(es) -> 8 samples/process" in stdout
    w1 = load_file(list_checkpoints(one)[-1] / "trainable.safetensors")
    w2 = load_file(list_checkpoints(two)[-1] / "trainable.safetensors")
    # The gradients differ only in the order of a float sum (an all-reduce against one sum); AdamW
    # divides by sqrt(v), so an element whose gradient is near AdamW's eps turns that 1e-7 relative
    # noise into up to a few percent of one lr-sized (3e-4) step. Nearly every element must agree to
    # 1e-6 and none may differ by more than a tenth of a step.
    for name in w1:
        diff = (w2[name] - w1[name]).abs()
        assert float(diff.max()) < 3e-5, (name, float(diff.max()))
        assert float((diff > 1e-6).float().mean()) < 1e-3, (name, int((diff > 1e-6).sum()))
    m1 = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(m1) == len(m2) == 2
    for a, b in zip(m1, m2):  # same samples, same rewards (up to the order of a float sum)
        assert abs(a["reward/mean"] - b["reward/mean"]) < 1e-6 and a["train/pairs"] == 2 * b["train/pairs"]
