"""Scale benchmark: throughput of 1 vs 2 CPU processes at the same global batch, and the peak
memory (max RSS) of a default training run of every domain.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/scale/run.py throughput --domains toy grasping
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/scale/run.py memory
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/scale/run.py floor   (imports only)
    (both write into benchmarks/results/scale.json, merging with what is there)

Throughput: `flowcoach train DOMAIN` with the domain's training defaults (so its global batch),
run as one process and as two (`accelerate launch --config_file configs/accelerate/ddp.yaml`, gloo),
``--steps`` RL steps each; the step time is the median over the steps after the first of the
trainer's own per-step wall time (time/train_wall_s in metrics.jsonl: rollout, reward, update; the
final evaluation and checkpoint are outside it). Scaling efficiency = (t_1 / t_2) / 2.

Memory: GNU time's maximum resident set size of one process running `flowcoach train DOMAIN
--steps 2` with the domain's defaults, except ``--eval-samples`` (the final evaluation's sample
count, cut to keep the runs short).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
PYTHON = sys.executable
COMMON = ["--no-tensorboard", "--output-dir", "runs", "--eval-every", "0", "--sample-every", "0",
          "--checkpoint-every", "100000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "200",
            "HF_HUB_OFFLINE": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"),
            # the repository's data caches, so a run in a temporary folder does not rebuild them
            "FLOWCOACH_CACHE": os.environ.get("FLOWCOACH_CACHE", str(ROOT / "runs" / "cache"))}


def train_command(domain: str, processes: int, steps: int, eval_samples: int) -> list[str]:
    cli = ["-m", "flowcoach.core.cli", "train", domain, "--steps", str(steps), "--eval-samples", str(eval_samples), *COMMON]
    if processes == 1:
        return [PYTHON, *cli]
    return [PYTHON, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/ddp.yaml"),
            "--num_processes", str(processes), "--main_process_port", str(free_port()), *cli]


def run(cmd: list[str], cwd: Path, timeout: float) -> tuple[str, float]:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"failed ({out.returncode}): {' '.join(cmd)}\n{(out.stdout + out.stderr)[-3000:]}")
    return out.stdout + out.stderr, wall


def step_times(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    wall = [rows[0]["time/train_wall_s"]] + [b["time/train_wall_s"] - a["time/train_wall_s"] for a, b in zip(rows, rows[1:])]
    cpu = [rows[0]["time/train_cpu_s"]] + [b["time/train_cpu_s"] - a["time/train_cpu_s"] for a, b in zip(rows, rows[1:])]
    kept = rows[1:] if len(rows) > 1 else rows  # the first step warms up (imports, allocator, env reset)
    steady = wall[1:] if len(wall) > 1 else wall
    return {"step_wall_s": statistics.median(steady), "step_wall_all_s": [round(w, 3) for w in wall],
            "step_cpu_s": statistics.median(cpu[1:] if len(cpu) > 1 else cpu),  # of the main process
            **{f"median_{k.split('/')[1]}": statistics.median(r[k] for r in kept)
               for k in ("time/sample_s", "time/reward_s", "time/train_s")}}


def throughput(domain: str, steps: int, eval_samples: int, repeats: int) -> dict:
    from flowcoach.core.domain import get_domain

    defaults = get_domain(domain).train_defaults()
    samples = defaults.get("groups_per_step", 16) * defaults.get("group_size", 8)
    result = {"domain": domain, "steps": steps, "samples_per_step": samples, "runs": []}
    for rep in range(repeats):
        for processes in (1, 2):  # interleaved, so a change of the machine's load hits both
            with tempfile.TemporaryDirectory() as tmp:
                cmd = train_command(domain, processes, steps, eval_samples)
                load0 = os.getloadavg()[0]
                _, wall = run(cmd, Path(tmp), timeout=3600)
                run_dir = next(p for p in (Path(tmp) / "runs").iterdir() if p.name.startswith(f"{domain}__"))
                times = step_times(run_dir)
            row = {"processes": processes, "repeat": rep, "command": " ".join(Path(c).name if c == PYTHON else c for c in cmd),
                   "process_wall_s": round(wall, 2), "loadavg_1min_before": round(load0, 2),
                   "loadavg_1min_after": round(os.getloadavg()[0], 2), **times,
                   "samples_per_s": samples / times["step_wall_s"]}
            print(json.dumps(row), flush=True)
            result["runs"].append(row)
    t1 = statistics.median(r["step_wall_s"] for r in result["runs"] if r["processes"] == 1)
    t2 = statistics.median(r["step_wall_s"] for r in result["runs"] if r["processes"] == 2)
    c1 = statistics.median(r["step_cpu_s"] for r in result["runs"] if r["processes"] == 1)
    c2 = statistics.median(r["step_cpu_s"] for r in result["runs"] if r["processes"] == 2)
    # wall: what a user sees on this (shared) machine; cpu: how evenly the work splits, whatever
    # the cores the processes got (1 = each process does half of one process's work)
    result.update(step_wall_1_s=t1, step_wall_2_s=t2, speedup=t1 / t2, scaling_efficiency=t1 / t2 / 2,
                  step_cpu_1_s=c1, step_cpu_2_s=c2, cpu_split_efficiency=c1 / c2 / 2)
    return result


def peak_memory(domain: str, steps: int, eval_samples: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["/usr/bin/time", "-v", *train_command(domain, 1, steps, eval_samples)]
        load0 = os.getloadavg()[0]
        out, wall = run(cmd, Path(tmp), timeout=3600)
        # runs/ also holds the data caches of domains that build theirs (speech, crystals)
        run_dir = next(p for p in (Path(tmp) / "runs").iterdir() if p.name.startswith(f"{domain}__"))
        times = step_times(run_dir)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out).group(1))
    row = {"domain": domain, "steps": steps, "eval_samples": eval_samples,
           "command": " ".join(["time -v", *(Path(c).name if c == PYTHON else c for c in cmd[2:])]),
           "max_rss_mib": round(rss_kb / 1024, 1), "process_wall_s": round(wall, 1),
           "loadavg_1min_before": round(load0, 2), **times}
    print(json.dumps(row), flush=True)
    return row


def import_floor() -> dict:
    """Max RSS of a process that only imports torch, accelerate and the trainer: what every run pays."""
    code = "import torch, accelerate, flowcoach.core.trainer, flowcoach.rewards"
    with tempfile.TemporaryDirectory() as tmp:
        out, wall = run(["/usr/bin/time", "-v", PYTHON, "-c", code], Path(tmp), timeout=600)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out).group(1))
    row = {"command": f"time -v python -c '{code}'", "max_rss_mib": round(rss_kb / 1024, 1), "process_wall_s": round(wall, 1)}
    print(json.dumps(row), flush=True)
    return row


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "OMP_NUM_THREADS": 1}


def save(section: str, value) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data.setdefault(section, {}).update(value)
    data["machine"] = machine()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["throughput", "memory", "floor"])
    p.add_argument("--domains", nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (default: throughput 6, memory 2)")
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    if args.what == "throughput":
        for domain in args.domains or ["toy", "grasping"]:
            save("throughput", {domain: throughput(domain, args.steps or 6, args.eval_samples, args.repeats)})
    elif args.what == "floor":
        save("peak_memory", {"imports only": import_floor()})
    else:
        for domain in args.domains or ["toy", "grasping", "molecules", "crystals", "video", "speech"]:
            save("peak_memory", {domain: peak_memory(domain, args.steps or 2, args.eval_samples)})


if __name__ == "__main__":
    main()
