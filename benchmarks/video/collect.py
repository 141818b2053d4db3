"""Write benchmarks/results/video_base.json and video_rl.json from the records the commands left.

    .venv/bin/python benchmarks/video/collect.py --run runs/video__flow-grpo__0__<time> --time-log rl_time.txt

The base's figures are the evaluation `flowcoach pretrain video` ran and stored in
domains/video/base/base.json; the RL model's are the trainer's final evaluation (eval/metrics.json
of the run). Both use the same protocol: ``evaluate_model`` on the first 256 held-out conditions
(64 distinct initial states x 4), 20 Euler ODE steps, noise seed 12345, so they compare directly
(``evaluate_models.py`` recomputes either on demand). ``--time-log`` is the output of
``/usr/bin/time -f "cpu_user_s %U cpu_sys_s %S wall_s %e maxrss_kb %M"`` around the training command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def parse_time_log(path: Path) -> dict:
    fields = path.read_text().split()
    pairs = dict(zip(fields[::2], fields[1::2]))
    return {k: float(v) for k, v in pairs.items() if k in ("cpu_user_s", "cpu_sys_s", "wall_s", "maxrss_kb")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the RL run folder")
    parser.add_argument("--time-log", required=True)
    parser.add_argument("--command", required=True, help="the training command, as run")
    parser.add_argument("--label", default="rl", help="results file: benchmarks/results/video_<label>.json")
    parser.add_argument("--note", default="", help="what distinguishes this run")
    args = parser.parse_args()
    base = json.loads((ROOT / "domains" / "video" / "base" / "base.json").read_text())
    run = Path(args.run)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timing = parse_time_log(Path(args.time_log))
    common = {"num_samples": base["eval"]["num_samples"], "distinct_conditions": base["eval"]["num_samples"] // 4,
              "ode_steps": base["eval"]["num_steps"], "seed": base["eval"]["seed"],
              "machine": "x86_64, 1 thread, shared 2-core CPU (other jobs running)"}
    base_record = {"label": "base", "checkpoint": "domains/video/base", "source": "domains/video/base/base.json",
                   "command": base["command"], **common, "metrics": base["eval"]["metrics"],
                   "train_wall_s": base["wall_seconds"], "train_cpu_s": base["cpu_seconds"],
                   "final_flow_matching_loss": base["final_loss"]}
    rl_record = {"label": args.label, "note": args.note, "checkpoint": str(run), "source": f"{run}/eval/metrics.json",
                 "command": args.command,
                 **common, "metrics": {k: v for k, v in metrics.items() if k != "step"}, "rl_steps": metrics["step"],
                 "train_wall_s": timing.get("wall_s"), "train_cpu_s": round(timing["cpu_user_s"] + timing["cpu_sys_s"], 1),
                 "max_rss_mb": round(timing.get("maxrss_kb", 0) / 1024),
                 "reward_curve": [round(line["reward/mean"], 4) for line in lines],
                 "physics_reward_curve": [round(line["reward/video-physics"], 4) for line in lines],
                 "config": cfg}
    for record in (base_record, rl_record):
        (ROOT / "benchmarks" / "results" / f"video_{record['label']}.json").write_text(json.dumps(record, indent=2))
    print(json.dumps({"base": base_record["metrics"], "rl": rl_record["metrics"]}, indent=2))


if __name__ == "__main__":
    main()
