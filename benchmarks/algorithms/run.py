"""Every algorithm of the Flow-GRPO family on every domain, at an equal CPU budget.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/algorithms/run.py --domains toy grasping molecules crystals video speech

Each (domain, algorithm, seed) run is `flowcoach train <domain> --algo <algo>` (the recipe, then the
domain's training defaults, as the CLI resolves them) with `--time-budget-s B`: it stops once its RL
steps have used B seconds of process CPU time (one torch thread; evaluation excluded), so runs on a
machine shared with other jobs still get equal compute. Every B/`--evals` CPU seconds the held-out
evaluator runs (the ODE sampler on the domain's eval conditions), which gives the reward curve; the
run's model evaluations (rows through the velocity model, 'NFE') are counted alongside. After the
run the final model's latent diversity is measured (below). Results go to
benchmarks/results/algorithms_<domain>.json after every run (`--resume` skips runs already there),
then `report.py` draws the curves and writes the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(os.environ.get("FLOWCOACH_BENCH_RESULTS", ROOT / "benchmarks" / "results"))  # tests point it elsewhere

# CPU seconds of RL per run, and evaluation samples, per domain (2 shared cores: a few minutes a run)
BUDGET_S = {"toy": 10.0, "grasping": 180.0, "molecules": 180.0, "crystals": 180.0, "video": 150.0, "speech": 180.0}
# video and speech evaluations cost seconds per sample: fewer samples, so evaluations stay a fraction of a run
EVAL_SAMPLES = {"toy": 500, "grasping": 50, "molecules": 128, "crystals": 128, "video": 64, "speech": 48}


@torch.no_grad()
def latent_diversity(model, domain, num_steps: int, shift: float, n_cond: int = 8, per_cond: int = 8) -> float:
    """Mean pairwise L2 distance between samples of the same condition (per_cond ODE samples from
    different noise for each of n_cond eval conditions), in the model's sample space. For interact
    domains the condition is the observation at reset of an eval seed and the sample its first
    action chunk: how varied the policy's actions are in one state."""
    from flowcoach.core.sampling.rollout import index_cond
    from flowcoach.core.trainer import generate

    cond = domain.eval_conditions(n_cond)
    if domain.kind == "interact":
        env = domain.make_env()
        cond = torch.stack([domain.obs_to_cond(env.reset(seed=int(s))[0]) for s in cond.tolist()])
        env.close()
    rows = torch.arange(n_cond).repeat_interleave(per_cond)
    x = generate(model, domain, index_cond(cond, rows), num_steps, shift, seed=777).reshape(n_cond, per_cond, -1)
    d = torch.cdist(x.float(), x.float())
    return float(d.sum() / (n_cond * per_cond * (per_cond - 1)))


def eval_points(rows: list[dict]) -> list[dict]:
    """(cpu_s, nfe, step, eval metrics) at each evaluation of a run."""
    out = []
    for r in rows:
        if "eval/reward_mean" in r:
            out.append({"cpu_s": r["time/train_cpu_s"], "wall_s": r["time/train_wall_s"], "nfe": r["nfe/total"],
                        "step": r["step"], **{k[5:]: v for k, v in r.items() if k.startswith("eval/")}})
    return out


def run_one(domain_name: str, algo: str, seed: int, budget: float, evals: int, out_dir: Path, eval_samples: int) -> dict:
    from flowcoach.core.algorithms import train_config
    from flowcoach.core.checkpoint import load_trained
    from flowcoach.core.domain import get_domain
    from flowcoach.core.trainer import train

    domain = get_domain(domain_name)
    cfg = train_config(domain_name, algo)  # what `flowcoach train <domain> --algo <algo>` runs
    cfg.seed = seed
    cfg.steps = 100_000
    cfg.time_budget_s = budget
    cfg.eval_every_s = budget / evals
    cfg.eval_every = 0
    cfg.eval_samples = eval_samples
    cfg.checkpoint_every, cfg.keep_checkpoints = 100_000, 1
    cfg.sample_every, cfg.tensorboard = 0, False
    cfg.output_dir = str(out_dir)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    run_dir = train(cfg, domain=domain)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    model = load_trained(domain, run_dir, use_ema=True)
    return {
        "run": str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT) else str(run_dir),
        "steps": rows[-1]["step"],
        "train_cpu_s": rows[-1]["time/train_cpu_s"],
        "train_wall_s": rows[-1]["time/train_wall_s"],
        "process_cpu_s": time.process_time() - cpu0,
        "process_wall_s": time.perf_counter() - wall0,
        "nfe_total": rows[-1]["nfe/total"],
        "final": json.loads((run_dir / "eval" / "metrics.json").read_text()),
        "latent_diversity": latent_diversity(model, domain, cfg.sampler.eval_num_steps, cfg.sampler.shift),
        "curve": eval_points(rows),
        "train_reward": [[r["time/train_cpu_s"], r["nfe/total"], r["reward/mean"]] for r in rows],
        "config": {"sampler": vars(cfg.sampler), "loss": vars(cfg.loss), "groups_per_step": cfg.groups_per_step,
                   "group_size": cfg.group_size, "optimizer_steps_per_epoch": cfg.optimizer_steps_per_epoch,
                   "lr": cfg.optim.lr},
    }


def base_point(domain_name: str, eval_samples: int) -> dict:
    from flowcoach.core.algorithms import train_config
    from flowcoach.core.checkpoint import load_base
    from flowcoach.core.domain import get_domain
    from flowcoach.core.trainer import evaluate_model

    domain = get_domain(domain_name)
    cfg = train_config(domain_name, "flow-grpo")
    model, _ = load_base(domain)
    metrics, _, _ = evaluate_model(model, domain, eval_samples, cfg.sampler.eval_num_steps, cfg.sampler.shift,
                                   domain.default_rewards())
    metrics["latent_diversity"] = latent_diversity(model, domain, cfg.sampler.eval_num_steps, cfg.sampler.shift)
    return metrics


def jsonable(value):
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_in_parallel(domain_name: str, algos: list[str], seeds: list[int], budget: float, args, record: dict,
                    path: Path) -> None:
    """Split the algorithms among args.jobs worker processes (this script, one thread each), each
    writing its own part file seeded with the base's evaluation, then merge their runs into record
    (also those of a worker that failed; `--resume` then finishes the rest)."""
    import subprocess

    parts = [algos[k::args.jobs] for k in range(min(args.jobs, len(algos)))]
    workers, part_paths = [], []
    for k, names in enumerate(parts):
        suffix = f"{args.results_suffix}.part{k}"
        part_paths.append(RESULTS / f"algorithms_{domain_name}{suffix}.json")
        part_paths[-1].write_text(json.dumps(jsonable({"base": record["base"]})))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--domains", domain_name, "--algos", *names,
               "--seeds", *map(str, seeds), "--budget-s", str(budget), "--evals", str(args.evals),
               "--out-dir", args.out_dir, "--results-suffix", suffix, "--resume", "--no-report"]
        print(f"[{domain_name}] worker {k}: {' '.join(names)}", flush=True)
        workers.append(subprocess.Popen(cmd, cwd=ROOT))
    failed = [k for k, worker in enumerate(workers) if worker.wait() != 0]
    for part_path in part_paths:
        record["runs"].update(json.loads(part_path.read_text()).get("runs", {}))
    path.write_text(json.dumps(jsonable(record), indent=1))
    for part_path in part_paths:
        part_path.unlink()
    if failed:
        print(f"[{domain_name}] worker(s) {failed} failed; their finished runs are kept: run again with "
              "--resume to finish the rest", flush=True)


def main(argv=None) -> int:
    from flowcoach.core.registry import ALGORITHMS, FlowcoachError
    import flowcoach.core.algorithms  # noqa: F401 - registers the recipes

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domains", nargs="+", default=["toy"])
    p.add_argument("--algos", nargs="+", default=None, help="default: every registered algorithm")
    p.add_argument("--budget-s", type=float, default=None, help=f"CPU s per run (default per domain: {BUDGET_S})")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 on toy, 0 elsewhere")
    p.add_argument("--evals", type=int, default=6, help="held-out evaluations per run (plus the final one)")
    p.add_argument("--out-dir", default="runs/bench_algorithms")
    p.add_argument("--resume", action="store_true", help="skip runs already in the results file")
    p.add_argument("--rerun", action="store_true",
                   help="run the --algos again and keep every other run of the results file")
    p.add_argument("--results-suffix", default="", help="write algorithms_<domain><suffix>.json")
    p.add_argument("--jobs", type=int, default=1,
                   help="processes side by side, one torch thread each; the algorithms are split among them "
                        "(budgets are process CPU seconds, so runs stay equal)")
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # a --jobs worker
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    algos = args.algos or ALGORITHMS.names()
    for domain_name in args.domains:
        budget = args.budget_s or BUDGET_S.get(domain_name, 180.0)
        seeds = args.seeds or ([0, 1, 2] if domain_name == "toy" else [0])
        eval_samples = EVAL_SAMPLES.get(domain_name, 128)
        path = RESULTS / f"algorithms_{domain_name}{args.results_suffix}.json"
        record = json.loads(path.read_text()) if (args.resume or args.rerun) and path.exists() else {}
        command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/algorithms/run.py " + " ".join(argv or sys.argv[1:])
        if (args.rerun or args.resume) and record.get("command", command) != command:
            # the record stays the first command's; a rerun redoes runs, a resume adds or finishes them
            record.setdefault("rerun_commands" if args.rerun else "added_runs_commands", []).append(command)
            command = record["command"]
        record.update({"domain": domain_name, "budget_cpu_s": budget, "evals_per_run": args.evals,
                       "eval_samples": eval_samples,
                       "command": command,
                       "machine": {"platform": platform.platform(), "python": platform.python_version(),
                                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                                   "note": "2-core CPU shared with other engineers' jobs; budgets are process CPU seconds"}})
        record.setdefault("runs", {})
        if "base" not in record:
            print(f"[{domain_name}] evaluating the base", flush=True)
            record["base"] = base_point(domain_name, eval_samples)

        def done(algo: str, seed: int) -> bool:
            run = record["runs"].get(f"{algo}/{seed}")
            return args.resume and not args.rerun and run is not None and "error" not in run

        todo = [algo for algo in algos if not all(done(algo, seed) for seed in seeds)]
        if args.jobs > 1 and len(todo) > 1:
            run_in_parallel(domain_name, todo, seeds, budget, args, record, path)
            todo = []  # the workers ran them
        for algo in todo:
            for seed in seeds:
                key = f"{algo}/{seed}"
                if done(algo, seed):
                    continue
                print(f"[{domain_name}] {algo} seed {seed}: {budget:g} CPU s", flush=True)
                try:
                    record["runs"][key] = run_one(domain_name, algo, seed, budget, args.evals, Path(args.out_dir),
                                                  eval_samples)
                except FlowcoachError as e:  # not applicable on this domain (e.g. tree-grpo on interact)
                    record["runs"][key] = {"error": str(e)}
                    print(f"  not run: {e}", flush=True)
                except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
                    record["runs"][key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                    print(f"  failed: {type(e).__name__}: {e}", flush=True)
                path.write_text(json.dumps(jsonable(record), indent=1))
        if args.no_report:
            continue
        from benchmarks.algorithms.report import report

        report(domain_name, args.results_suffix)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
