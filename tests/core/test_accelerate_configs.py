"""The shipped accelerate configs (configs/accelerate/) load with accelerate's own loader and launcher
checks, and the trainer runs under `accelerate launch` with them (CPU, gloo).

tests/core/test_distributed.py shows, under torchrun, that 2 processes give 1 process's update; the
launches here check the same of accelerate's launcher and the shipped files, and add a 2-"machine"
run on localhost (multinode.yaml) and a reward server shared by the processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowcoach.core.checkpoint import list_checkpoints

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
NAMES = ("single", "ddp", "fsdp2", "multinode")
TRAIN = ["-m", "flowcoach.core.cli", "train", "toy", "--steps", "2", "--groups-per-step", "4", "--group-size", "4",
         "--eval-samples", "32", "--no-tensorboard", "--output-dir", "runs"]


def launch_args(name: str, *extra: str):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), *extra, *TRAIN])
    return _validate_launch_command(args)[0]


def test_every_config_loads_with_accelerates_loader():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(NAMES)
    expected = {"single": (DistributedType.NO, 1, 1), "ddp": (DistributedType.MULTI_GPU, 2, 1),
                "fsdp2": (DistributedType.FSDP, 2, 1), "multinode": (DistributedType.MULTI_GPU, 16, 2)}
    for name, (kind, processes, machines) in expected.items():
        cfg = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
        assert isinstance(cfg, ClusterConfig) and cfg.distributed_type == kind, name
        assert (cfg.num_processes, cfg.num_machines, cfg.mixed_precision) == (processes, machines, "no"), name


def test_the_launcher_reads_each_config_as_meant():
    single, ddp, fsdp2, multinode = (launch_args(n) for n in NAMES)
    assert not single.multi_gpu and not single.use_fsdp and single.num_processes == 1
    assert ddp.multi_gpu and ddp.num_processes == 2 and ddp.num_machines == 1
    assert fsdp2.use_fsdp and fsdp2.fsdp_version == 2 and fsdp2.num_processes == 2
    assert multinode.multi_gpu and (multinode.num_machines, multinode.num_processes, multinode.main_process_port) == (2, 16, 29500)
    assert launch_args("ddp", "--num_processes", "8").num_processes == 8  # flags override the file


def test_fsdp2_config_builds_accelerates_fsdp2_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    for key, value in prepare_multi_gpu_env(launch_args("fsdp2")).items():  # what the launcher hands each process
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert type(plugin.cpu_offload).__name__ == "OffloadPolicy"  # the base policy: no CPU offload
    assert "size_based" in plugin.auto_wrap_policy.__name__ and plugin.state_dict_type.name == "FULL_STATE_DICT"


# ----------------------------------------------------------------------------- launches (CPU, gloo)
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(cwd: Path, config: str, *extra: str, train_extra=(), wait=True):
    cwd.mkdir(parents=True, exist_ok=True)
    port = () if "--main_process_port" in extra else ("--main_process_port", str(free_port()))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml"),
           *port, *extra, *TRAIN, *train_extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def only_run(cwd: Path) -> Path:
    (run_dir,) = (cwd / "runs").iterdir()
    return run_dir


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(one: Path, two: Path) -> None:
    """Same samples and rewards, the same update up to the order of a float sum (see test_distributed)."""
    w1 = load_file(list_checkpoints(one)[-1] / "trainable.safetensors")
    w2 = load_file(list_checkpoints(two)[-1] / "trainable.safetensors")
    for name in w1:
        assert float((w2[name] - w1[name]).abs().max()) < 3e-5, name
    for a, b in zip(metrics(one), metrics(two), strict=True):
        assert abs(a["reward/mean"] - b["reward/mean"]) < 1e-6 and a["train/pairs"] == 2 * b["train/pairs"]


@pytest.mark.slow
def test_ddp_config_runs_two_cpu_processes_like_one(tmp_path):
    # --device is left at auto: on a machine without GPUs the trainer must still join the processes
    out = accelerate_launch(tmp_path / "two", "ddp")
    assert "over 2 process(es) -> 8 samples/process" in out
    single = accelerate_launch(tmp_path / "one", "single")
    assert "over 1 process(es) -> 16 samples/process" in single
    assert_same_run(only_run(tmp_path / "one"), only_run(tmp_path / "two"))


@pytest.mark.slow
def test_multinode_config_runs_as_two_machines_on_localhost(tmp_path):
    port = str(free_port())
    common = ("--main_process_ip", "127.0.0.1", "--main_process_port", port, "--num_machines", "2", "--num_processes", "2")
    procs = [accelerate_launch(tmp_path / f"machine{r}", "multinode", "--machine_rank", str(r), *common, wait=False)
             for r in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "over 2 process(es) -> 8 samples/process" in outs[0]
    assert not (tmp_path / "machine1" / "runs").exists()  # only the main process writes the run
    assert len(metrics(only_run(tmp_path / "machine0"))) == 2


@pytest.mark.slow
def test_two_processes_share_a_reward_servers_batches(tmp_path):
    from flowcoach.rewards.server import RewardServer

    # 8 samples per process: a batch of 16 holds both processes' requests and closes when both are in
    srv = RewardServer(port=0, rewards=["toy-mode"], max_batch=16, max_wait_ms=10_000).start()
    try:
        out = accelerate_launch(tmp_path / "two", "ddp", train_extra=("--rewards", f"{srv.url}/toy-mode"))
        health = srv.health()
    finally:
        srv.stop()
    assert "over 2 process(es)" in out
    merged = [b for b in health["recent_batches"] if b[1] == 2]
    assert len(merged) == 2 and all(b[2] == 16 for b in merged)  # one merged batch per RL step
    rows = metrics(only_run(tmp_path / "two"))
    assert rows[-1][f"reward/{srv.url}/toy-mode/server_batch"] == 16.0
