"""Print the markdown results table of benchmarks/results/video_*.json (used for the README)."""

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
COLUMNS = [("physics_pass_rate", "physics pass"), ("trajectory_rmse_px", "traj. RMSE px"),
           ("trajectory_rmse_median_px", "median px"), ("flicker", "flicker"),
           ("subject_consistency", "subject cons."), ("warping_error", "warp err."),
           ("dynamic_degree", "dynamic deg."), ("diversity_pixel", "div. pixel"),
           ("diversity_trajectory_px", "div. traj px"), ("reward_mean", "train reward")]
SCENES = ("bounce", "pendulum", "collision", "slide")


def main() -> None:
    print("| model | " + " | ".join(name for _, name in COLUMNS) + " | " + " | ".join(f"pass {s}" for s in SCENES)
          + " | CPU s (train / eval) |")
    print("|---" * (len(COLUMNS) + len(SCENES) + 2) + "|")
    for label in ("simulator", "base640", "rl640_ungated", "rl640", "base", "rl", "rl_lr3e-4"):
        path = RESULTS / f"video_{label}.json"
        if not path.exists():
            continue
        rec = json.loads(path.read_text())
        m = rec["metrics"]
        cells = [f"{m[key]:.3f}" if key in m else "-" for key, _ in COLUMNS]
        cells += [f"{m[f'physics_pass/{s}']:.3f}" if f"physics_pass/{s}" in m else "-" for s in SCENES]
        cpu = f"{rec.get('train_cpu_s', '-')} / {rec.get('eval_cpu_s', '-')}"
        print(f"| {label} (n={rec['num_samples']}) | " + " | ".join(cells) + f" | {cpu} |")


if __name__ == "__main__":
    main()
