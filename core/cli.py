"""The `flowcoach` console script: domains | pretrain | train | eval | sample | compare | check-domain.

Each subcommand is a dataclass parsed by tyro (field docstrings are the help). The domain is the
first positional argument. `train --algo NAME` starts from that algorithm's recipe; every other
flag you give overrides it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from flowcoach.core.registry import FlowcoachError

USAGE = """usage: flowcoach COMMAND [DOMAIN] [OPTIONS]

commands:
  domains        list domains, algorithms, rewards and noise laws
  pretrain       flow-matching pretraining of a domain's base model
  train          RL fine-tuning (e.g. flowcoach train toy --algo flow-grpo --steps 60)
  eval           held-out evaluation of a base model or checkpoint
  sample         write samples of a model in the domain's native formats
  compare        base vs tuned checkpoints of any domains, with 95% intervals: one
                 Markdown + HTML report (e.g. flowcoach compare toy=base toy=runs/<run>)
  check-domain   run the domain contract checks
  serve-rewards  serve rewards over HTTP (train with --rewards http://HOST:PORT/NAME=WEIGHT)

`flowcoach COMMAND --help` lists a command's options."""


@dataclass
class ModelArgs:
    """Which model to sample from, and how."""

    domain: str = "toy"
    checkpoint: str = "base"
    """Run folder, checkpoint folder, or 'base'."""
    base: str | None = None
    """Base model folder (default: the run's, else the domain's shipped base)."""
    num_samples: int = 1000
    num_steps: int = 40
    """Deterministic ODE steps."""
    shift: float = 1.0
    seed: int = 12345


@dataclass
class EvalArgs(ModelArgs):
    output: str | None = None
    """Folder for metrics.json, report.md and samples (default: <run>/eval/<checkpoint>__n<N>__steps<S>,
    or runs/<domain>__eval/base)."""
    sde_noise_level: float = 0.0
    """0: the deterministic ODE sampler. > 0: the flow SDE at this noise level on the steps that start
    at t in (sde_t_min, sde_t_max], seeded by --seed (a crystal base collides atoms on the ODE that
    the SDE keeps apart: benchmarks/crystals/README.md, "Where the atoms go")."""
    sde_t_max: float = 1.0
    sde_t_min: float = 0.0


@dataclass
class SampleArgs(ModelArgs):
    num_samples: int = 64
    seed: int = 0
    output: str = "samples"
    """Folder to write the samples to."""


@dataclass
class CompareArgs:
    models: Annotated[tuple[str, ...], tyro.conf.Positional, tyro.conf.arg(metavar="DOMAIN=CHECKPOINT ...")] = ()
    """Models as DOMAIN=CHECKPOINT: CHECKPOINT is 'base' (the domain's shipped base), a base model
    folder, a run folder (its newest checkpoint) or a checkpoint folder; e.g. toy=base toy=runs/<run>."""
    num_samples: int | None = None
    """Held-out samples (episodes) per model (default: the domain's training eval_samples)."""
    num_steps: int | None = None
    """Deterministic ODE steps (default: the domain's training sampler.eval_num_steps)."""
    shift: float | None = None
    """Time-grid shift (default: the domain's training sampler.shift)."""
    seed: int = 12345
    """Seed of the evaluation noise and of the bootstrap resamples (shared by a domain's models)."""
    bootstrap: int = 1000
    """Bootstrap resamples for the 95% intervals (0: no intervals)."""
    bootstrap_seconds: float = 120.0
    """Time budget per model for re-running an aggregate-only evaluator on resamples."""
    device: str = "cpu"
    """cpu, cuda or auto."""
    output: str = "reports/compare"
    """Folder for report.md, report.html, metrics.json, curves/ and samples/."""


@dataclass
class CheckArgs:
    domain: str = "all"
    """A domain name, or 'all' for every registered domain."""


def _split_domain(argv: list[str]) -> tuple[str | None, list[str]]:
    if argv and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    return None, argv


def _algo_from_argv(argv: list[str]) -> str | None:
    for k, arg in enumerate(argv):
        if arg == "--algo" and k + 1 < len(argv):
            return argv[k + 1]
        if arg.startswith("--algo="):
            return arg.split("=", 1)[1]
    return None


def _console():
    from rich.console import Console

    return Console(soft_wrap=True)  # no wrapping at 80 columns when the output is not a terminal


def cmd_domains(argv: list[str]) -> None:
    import flowcoach.core.domain  # noqa: F401 - registers the built-in domains
    from flowcoach.core import algorithms  # noqa: F401 - registers the recipes
    from flowcoach.core.registry import ADVANTAGES, ALGORITHMS, DOMAINS, NOISE_LAWS, REWARDS
    import flowcoach.core.advantages  # noqa: F401
    import flowcoach.rewards  # noqa: F401

    print("domains:    " + ", ".join(DOMAINS.names()))
    print("algorithms:")
    for name in ALGORITHMS.names():
        print(f"  {name:14s} {algorithms.describe(name)}")
    print("rewards:    " + ", ".join(REWARDS.names()))
    print("noise laws: " + ", ".join(NOISE_LAWS.names()))
    print("advantages: " + ", ".join(ADVANTAGES.names()))
    from flowcoach.core.registry import STRUCTURES
    import flowcoach.core.sampling.structures  # noqa: F401 - registers the rollout structures

    print("structures: " + ", ".join(STRUCTURES.names()))


def cmd_train(argv: list[str]) -> None:
    import tyro

    from flowcoach.core.algorithms import algorithm_defaults, train_config
    from flowcoach.core.trainer import train

    domain, rest = _split_domain(argv)
    # a domain may name its default algorithm ("algo" in its train_defaults); --algo overrides it
    algo = _algo_from_argv(rest)
    defaults = train_config(domain, algo) if domain is not None else algorithm_defaults(algo or "flow-grpo")
    # then the user's flags win
    cfg = tyro.cli(type(defaults), default=defaults, args=rest, prog="flowcoach train DOMAIN")
    run_dir = train(cfg, console=_console())
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    print(f"done: {run_dir}")
    print("eval: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "step"))


def cmd_pretrain(argv: list[str]) -> None:
    import tyro

    from flowcoach.core.pretrain import PretrainConfig, pretrain

    from flowcoach.core.config import set_fields
    from flowcoach.core.domain import get_domain

    domain, rest = _split_domain(argv)
    defaults = PretrainConfig(domain=domain or "toy")
    if domain is not None:
        set_fields(defaults, get_domain(domain).pretrain_defaults())  # how its shipped base was made
    cfg = tyro.cli(PretrainConfig, default=defaults, args=rest, prog="flowcoach pretrain DOMAIN")
    pretrain(cfg, console=_console())


def _eval_output(args, domain_name: str) -> Path:
    if args.output:
        return Path(args.output)
    sde = f"__sde{args.sde_noise_level:g}_{args.sde_t_min:g}-{args.sde_t_max:g}" if args.sde_noise_level > 0 else ""
    if args.checkpoint != "base":  # beside the run's own final eval, never over it
        from flowcoach.core.checkpoint import list_checkpoints

        path = Path(args.checkpoint)
        ckpt = path if (path / "state.json").exists() else (list_checkpoints(path) or [path])[-1]
        return ckpt.parent.parent / "eval" / f"{ckpt.name}__n{args.num_samples}__steps{args.num_steps}{sde}"
    return Path("runs") / f"{domain_name}__eval" / f"base{sde}"


def cmd_eval(argv: list[str]) -> None:
    import tyro

    from flowcoach.core.checkpoint import load_trained
    from flowcoach.core.domain import get_domain
    from flowcoach.core.trainer import evaluate_model, write_eval_report

    domain_name, rest = _split_domain(argv)
    args = tyro.cli(EvalArgs, default=EvalArgs(domain=domain_name or "toy"), args=rest, prog="flowcoach eval DOMAIN")
    if args.sde_noise_level < 0 or (args.sde_noise_level > 0 and not 0 <= args.sde_t_min < args.sde_t_max <= 1):
        raise FlowcoachError("--sde-noise-level must be >= 0, and with it 0 <= --sde-t-min < --sde-t-max <= 1")
    domain = get_domain(args.domain)
    model = load_trained(domain, args.checkpoint, args.base)
    sde = (args.sde_noise_level, args.sde_t_max, args.sde_t_min) if args.sde_noise_level > 0 else None
    metrics, objects, scores = evaluate_model(model, domain, args.num_samples, args.num_steps, args.shift, seed=args.seed,
                                              sde=sde)
    out = _eval_output(args, domain.name)
    sampler = (f"{args.num_steps} steps, flow SDE at {args.sde_noise_level} on t in ({args.sde_t_min}, {args.sde_t_max}]"
               if sde else f"{args.num_steps} ODE steps")
    write_eval_report(out, metrics, f"{domain.name} evaluation",
                      f"checkpoint `{args.checkpoint}`, {args.num_samples} samples, {sampler}, seed {args.seed}")
    domain.save(objects, scores, out / "samples")
    print((out / "report.md").read_text().split("\n\n", 2)[2].rstrip())
    print(f"written to {out}")


def cmd_sample(argv: list[str]) -> None:
    import tyro

    from flowcoach.core.checkpoint import load_trained
    from flowcoach.core.domain import get_domain
    from flowcoach.core.trainer import generate
    from flowcoach.rewards import build_reward

    domain_name, rest = _split_domain(argv)
    args = tyro.cli(SampleArgs, default=SampleArgs(domain=domain_name or "toy"), args=rest, prog="flowcoach sample DOMAIN")
    domain = get_domain(args.domain)
    model = load_trained(domain, args.checkpoint, args.base)
    cond = domain.eval_conditions(args.num_samples)
    if domain.kind == "interact":  # samples are episodes, saved with a video of the first few
        from flowcoach.core.interact import evaluate_episodes

        try:
            objects = evaluate_episodes(model, domain, cond, args.num_steps, args.shift, render=True)
        except Exception as e:  # noqa: BLE001 - no renderer: still write the episodes
            print(f"warning: rendering failed ({type(e).__name__}: {e}); episodes without video")
            objects = evaluate_episodes(model, domain, cond, args.num_steps, args.shift)
    else:
        objects = domain.decode(generate(model, domain, cond, args.num_steps, args.shift, args.seed).cpu())
    scores, _ = build_reward(domain.default_rewards())(objects, cond)
    files = domain.save(objects, scores, Path(args.output))
    print(f"{len(objects)} samples, mean reward {float(scores.mean()):.4f}; wrote " + ", ".join(str(f) for f in files))


def cmd_compare(argv: list[str]) -> None:
    import tyro

    from flowcoach.core.compare import compare, parse_spec

    args = tyro.cli(CompareArgs, args=argv, prog="flowcoach compare")
    console = _console()
    out = compare([parse_spec(m) for m in args.models], args.output, args.num_samples, args.num_steps, args.shift,
                  args.seed, args.bootstrap, args.bootstrap_seconds, args.device, console=console)
    console.print(f"written to {out / 'report.md'} and {out / 'report.html'}")


def cmd_check(argv: list[str]) -> None:
    import tyro

    from flowcoach.core.domain import check_domain, get_domain
    from flowcoach.core.registry import DOMAINS

    domain_name, rest = _split_domain(argv)
    args = tyro.cli(CheckArgs, default=CheckArgs(domain=domain_name or "all"), args=rest, prog="flowcoach check-domain")
    names = DOMAINS.names() if args.domain == "all" else [args.domain]
    for name in names:
        passed = check_domain(get_domain(name))
        print(f"{name}: {len(passed)} checks passed ({'; '.join(passed)})")


def cmd_serve_rewards(argv: list[str]) -> None:
    import tyro

    from flowcoach.rewards.server import ServeArgs, serve

    serve(tyro.cli(ServeArgs, args=argv, prog="flowcoach serve-rewards"))


COMMANDS = {"domains": cmd_domains, "pretrain": cmd_pretrain, "train": cmd_train, "eval": cmd_eval,
            "sample": cmd_sample, "compare": cmd_compare, "check-domain": cmd_check, "serve-rewards": cmd_serve_rewards}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command '{command}'; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        COMMANDS[command](rest)
    except FlowcoachError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; checkpoints written so far are kept", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `flowcoach ... | head`
        sys.stderr.close()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
