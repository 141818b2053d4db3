"""The examples run as a user runs them."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / name), str(tmp_path)], capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_train_toy_example(tmp_path):
    assert "eval" in run_example("train_toy.py", tmp_path)


def test_custom_domain_example(tmp_path):
    assert "blobs3d" in run_example("custom_domain.py", tmp_path)


@pytest.mark.slow
def test_gym_reacher_example(tmp_path):
    pytest.importorskip("mujoco")
    stdout = run_example("gym_reacher.py", tmp_path)
    assert "BC base" in stdout and "Flow-GRPO" in stdout
