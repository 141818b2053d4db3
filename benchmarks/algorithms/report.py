"""Curves and tables of benchmarks/results/algorithms_<domain>.json (written by run.py).

    .venv/bin/python benchmarks/algorithms/report.py toy grasping molecules crystals

For each domain: benchmarks/algorithms/<domain>_reward.png (held-out reward against training CPU
seconds and against model evaluations; rollout reward against CPU seconds) and
benchmarks/algorithms/<domain>_table.md. "Time to flow-grpo's final" is the training CPU time at
which the held-out reward first reaches flow-grpo's final held-out reward (linear interpolation
between evaluations, the base model at time 0); flow-grpo's own entry is when it first got there.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "benchmarks" / "algorithms"

HELDOUT = {
    "toy": ["target_hit_rate", "on_manifold_rate", "modes_covered"],
    "grasping": ["success_rate", "ood/success_rate", "mean_steps_to_success"],
    "molecules": ["atom_stability", "validity", "uniqueness", "int_div"],
    "crystals": ["valid", "proxy_stable_rate", "unique_rate", "sun_rate"],
    "video": ["physics_pass_rate", "trajectory_rmse_px", "subject_consistency", "dynamic_degree"],
    "speech": ["in_band", "style_accuracy", "intonation_accuracy", "mcd", "cer"],
}


def crossing(points: list[tuple[float, float]], target: float) -> float | None:
    """First x where the piecewise-linear curve through (x, y) points reaches y >= target."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y0 >= target:
            return x0
        if y1 >= target:
            return x0 + (target - y0) / (y1 - y0) * (x1 - x0)
    if points and points[-1][1] >= target:
        return points[-1][0]
    return None


def curve(run: dict, base_reward: float, x: str = "cpu_s") -> list[tuple[float, float]]:
    return [(0.0, base_reward)] + [(p[x], p["reward_mean"]) for p in run["curve"]]


def _number(value) -> float:
    return float("nan") if value is None else value


def summarise(record: dict) -> dict:
    """Per algorithm: seeds, final rewards, times / NFE to flow-grpo's final reward, held-out metrics."""
    base_reward = record["base"]["reward_mean"]
    runs = {}
    for key, run in record["runs"].items():
        algo, seed = key.rsplit("/", 1)
        runs.setdefault(algo, []).append(run)
    flow = [r for r in runs.get("flow-grpo", []) if "error" not in r]
    target = statistics.mean(r["final"]["reward_mean"] for r in flow) if flow else None
    out = {}
    for algo, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            out[algo] = {"error": rs[0]["error"]}
            continue
        row = {"seeds": len(ok), "steps": statistics.mean(r["steps"] for r in ok),
               "nfe": statistics.mean(r["nfe_total"] for r in ok),
               "cpu_s": statistics.mean(r["train_cpu_s"] for r in ok),
               "wall_s": statistics.mean(r["train_wall_s"] for r in ok),
               "final": [r["final"]["reward_mean"] for r in ok],
               "diversity": statistics.mean(r["latent_diversity"] for r in ok) / record["base"]["latent_diversity"],
               # a metric saved as null (NaN, e.g. uniqueness with no valid sample) averages as NaN
               "heldout": {m: statistics.mean(_number(r["final"].get(m)) for r in ok)
                           for m in HELDOUT.get(record["domain"], [])}}
        if target is not None:
            times = [crossing(curve(r, base_reward), target) for r in ok]
            nfes = [crossing(curve(r, base_reward, "nfe"), target) for r in ok]
            row["reached"] = sum(t is not None for t in times)
            row["t_reach"] = statistics.median(t for t in times if t is not None) if row["reached"] else None
            row["nfe_reach"] = statistics.median(n for n in nfes if n is not None) if row["reached"] else None
        out[algo] = row
    if "flow-grpo" in out and out["flow-grpo"].get("t_reach"):
        t_flow, n_flow = out["flow-grpo"]["t_reach"], out["flow-grpo"]["nfe_reach"]
        for row in out.values():
            if row.get("t_reach"):
                row["speedup"] = t_flow / row["t_reach"]
                row["nfe_speedup"] = n_flow / row["nfe_reach"]
    return {"target": target, "base_reward": base_reward, "algos": out}


def fmt(v, digits=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table(record: dict, summary: dict) -> str:
    metrics = HELDOUT.get(record["domain"], [])
    head = ["algorithm", "seeds", "RL steps", "NFE (M)", "final held-out reward", "CPU s to flow-grpo's final",
            "x flow-grpo (time)", "x flow-grpo (NFE)", *metrics, "diversity / base"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = record["base"]
    lines.append("| base | - | 0 | 0 | " + fmt(base["reward_mean"]) + " | - | - | - | "
                 + " | ".join(fmt(base.get(m)) for m in metrics) + " | 1.000 |")
    order = sorted(summary["algos"], key=lambda a: (a != "flow-grpo", -(summary["algos"][a].get("speedup") or 0), a))
    for algo in order:
        row = summary["algos"][algo]
        if "error" in row:
            lines.append(f"| {algo} | not applicable: {row['error']} |" + " |" * (len(head) - 2))
            continue
        final = row["final"]
        spread = f" ± {statistics.stdev(final):.3f}" if len(final) > 1 else ""
        reach = fmt(row.get("t_reach"), 1) + (f" ({row['reached']}/{row['seeds']} seeds)" if row["seeds"] > 1 else "")
        lines.append("| " + " | ".join([
            algo, str(row["seeds"]), f"{row['steps']:.0f}", f"{row['nfe'] / 1e6:.2f}", f"{statistics.mean(final):.3f}{spread}",
            reach, fmt(row.get("speedup"), 2), fmt(row.get("nfe_speedup"), 2),
            *[fmt(row["heldout"][m]) for m in metrics], fmt(row["diversity"])]) + " |")
    return "\n".join(lines)


def plot(record: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    base_reward = summary["base_reward"]
    colours = plt.get_cmap("tab10")
    names = sorted({k.rsplit("/", 1)[0] for k in record["runs"]} - {"flow-grpo"}) + ["flow-grpo"]
    styles = ["-", "--", ":"]
    for c, algo in enumerate(names):
        runs = [r for k, r in record["runs"].items() if k.rsplit("/", 1)[0] == algo and "error" not in r]
        for s, run in enumerate(runs):
            kw = {"color": "k" if algo == "flow-grpo" else colours(c % 10), "ls": styles[(c // 10) % 3],
                  "lw": 2.4 if algo == "flow-grpo" else 1.3, "label": algo if s == 0 else None, "alpha": 0.9}
            xs, ys = zip(*curve(run, base_reward))
            axes[0].plot(xs, ys, marker="o", ms=3, **kw)
            xs, ys = zip(*curve(run, base_reward, "nfe"))
            axes[1].plot([x / 1e6 for x in xs], ys, marker="o", ms=3, **kw)
            tr = run["train_reward"]
            k = max(1, len(tr) // 30)  # moving average over ~1/30 of the run
            smooth = [sum(r[2] for r in tr[max(0, i - k + 1):i + 1]) / len(tr[max(0, i - k + 1):i + 1]) for i in range(len(tr))]
            axes[2].plot([r[0] for r in tr], smooth, **kw)
    if summary["target"] is not None:
        for ax in axes[:2]:
            ax.axhline(summary["target"], color="k", ls="--", lw=0.8, label="flow-grpo final")
    axes[0].set_xlabel("training CPU seconds (1 thread)")
    axes[1].set_xlabel("model evaluations (millions of rows)")
    axes[2].set_xlabel("training CPU seconds (1 thread)")
    axes[0].set_ylabel("held-out reward (ODE sampler)")
    axes[1].set_ylabel("held-out reward (ODE sampler)")
    axes[2].set_ylabel("rollout reward (each algorithm's own sampler, smoothed)")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{record['domain']}: {record['budget_cpu_s']:g} CPU s per run, shared 2-core machine")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def below_base_note(summary: dict) -> str:
    """Where flow-grpo ended below the base, every curve starts at its target: say so, since the
    time column then holds zeros that measure nothing."""
    if summary["target"] is None or summary["target"] > summary["base_reward"]:
        return ""
    return ("flow-grpo ended below the base's held-out reward, so every run 'reaches' it at 0 s and there "
            "is no speed-up to report: compare the final rewards and held-out metrics.\n\n")


def report(domain: str, suffix: str = "") -> dict:
    record = json.loads((RESULTS / f"algorithms_{domain}{suffix}.json").read_text())
    summary = summarise(record)
    plot(record, summary, OUT / f"{domain}{suffix}_reward.png")
    text = table(record, summary)
    (OUT / f"{domain}{suffix}_table.md").write_text(
        f"# {domain}: {record['budget_cpu_s']:g} CPU s of RL per run\n\n"
        f"flow-grpo's final held-out reward (the target): {fmt(summary['target'])}; base {fmt(summary['base_reward'])}.\n\n"
        + below_base_note(summary) + text + "\n")
    print(text)
    return summary


if __name__ == "__main__":
    for name in sys.argv[1:] or ["toy"]:
        report(name)
