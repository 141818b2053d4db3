"""The example plugin (examples/plugin): pip-installed into a temporary folder, found by flowcoach
through its entry points, checked and trained through the CLI; the environment is left as it was."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flowcoach.core.domain import get_domain
from flowcoach.core.registry import FlowcoachError

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "examples" / "plugin"


def run_python(script, *args, cwd, pythonpath):
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(pythonpath)}
    return subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=300)


def test_the_example_plugin_installs_and_trains_through_the_cli(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # build from a copy: setuptools writes build/ and *.egg-info beside the sources
    shutil.copytree(PLUGIN, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    assert (site / "flowcoach_waves" / "base" / "model.safetensors").exists()  # the base ships as package data

    # one process (the CLI's own main) runs the three commands: domains, check-domain, train
    script = ("import sys; from flowcoach.core.cli import main; "
              "sys.exit(main(['domains']) or print('=====') or main(['check-domain', 'waves']) or print('=====') or "
              "main(sys.argv[1:]))")
    out = run_python(script, "train", "waves", "--steps", "2", "--groups-per-step", "4", "--group-size", "4",
                     "--eval-samples", "60", "--sample-every", "2", "--no-tensorboard", "--output-dir", "runs",
                     cwd=tmp_path, pythonpath=site)
    assert out.returncode == 0, out.stderr
    listing, check, train = out.stdout.split("=====\n")
    lines = {line.split(":")[0]: line for line in listing.splitlines() if ":" in line}
    assert "waves" in lines["domains"].split(": ")[1].split(", ")
    assert "waves-amplitude" in lines["rewards"]
    assert "waves: 12 checks passed" in check and "base checkpoint loads" in check
    assert "done: runs/waves__flow-grpo__0__" in train
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("waves__flow-grpo__0__")
    assert (run / "checkpoints" / "checkpoint-2" / "state.json").exists()
    assert (run / "samples" / "step-2" / "waves.csv").exists()
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert {"frequency_accuracy", "purity", "mean_amplitude", "reward_mean"} <= set(metrics)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "reward/waves-amplitude" in rows[0]

    # nothing was installed where flowcoach lives: without the folder the plugin is unknown again
    with pytest.raises(FlowcoachError, match="unknown domain 'waves'"):
        get_domain("waves")
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("flowcoach-waves")
    assert not any(PLUGIN.glob("*.egg-info")) and not (PLUGIN / "build").exists()
