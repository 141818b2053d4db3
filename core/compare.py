"""`flowcoach compare`: base and tuned checkpoints of any set of domains on their held-out evaluators.

Each model is evaluated exactly as `flowcoach eval` does (``evaluate_model``: deterministic ODE
samples of the domain's fixed held-out conditions, the same seed for every model of a domain, so
the models of one domain see the same conditions and the same initial noise). Every metric gets a
95% percentile-bootstrap interval over the n evaluated samples:

* the training reward (``reward_mean``) and any metric a domain also returns per sample (the
  optional hook ``evaluate_samples(objects, conditions) -> {metric: values[n]}``, each metric the
  mean of its finite values) are bootstrapped directly from the per-sample values;
* every other metric (the domains' evaluators return aggregates: rates, coverage, FCD, ...) is
  bootstrapped by re-running ``domain.evaluate`` on resampled object sets, within a time budget.

A metric that depends on distinct samples (uniqueness, novelty, ...) is biased by the duplicates a
resample with replacement holds; when its resampled values do not bracket the full-set value, no
interval is reported for it (shown as n/a, with the reason), rather than a wrong one. Differences
to the domain's base are bootstrapped paired: the same resampled indices for both models.

The interval reflects the sampling variation of the n held-out samples at this seed, not the
variation between training runs.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowcoach.core.registry import FlowcoachError

LEVEL = 0.95
MIN_REPLICATES = 40  # a 95% percentile interval needs at least one resample in each 2.5% tail
EMBED_MAX_BYTES = 8_000_000
IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                  ".svg": "image/svg+xml"}
AUDIO_SUFFIXES = {".wav": "audio/wav", ".ogg": "audio/ogg", ".flac": "audio/flac", ".mp3": "audio/mpeg"}
VIDEO_SUFFIXES = {".mp4": "video/mp4", ".webm": "video/webm"}
TEXT_SUFFIXES = (".cif", ".smi")
STRUCTURE_VIEWS = "cif_views.png"  # written by compare into a samples folder that holds CIFs
SETTING_METRICS = {"denoising_steps_per_action"}  # evaluate_model's figures of the settings, not of the samples


# ----------------------------------------------------------------------------- what to compare
@dataclass
class Entry:
    """One model to evaluate: a domain and a checkpoint ('base', a base folder, a run or a checkpoint)."""

    domain: str
    checkpoint: str
    label: str = ""


def parse_spec(spec: str) -> Entry:
    """'DOMAIN=CHECKPOINT' -> Entry; CHECKPOINT is 'base', a base model folder, a run or a checkpoint folder."""
    domain, sep, checkpoint = spec.partition("=")
    if not sep or not domain.strip() or not checkpoint.strip():
        raise FlowcoachError(f"'{spec}' is not DOMAIN=CHECKPOINT (e.g. toy=base or toy=runs/<run>)")
    return Entry(domain.strip(), checkpoint.strip())


def default_label(checkpoint: str) -> str:
    if checkpoint == "base":
        return "base"
    path = Path(checkpoint)
    if (path / "state.json").exists():  # a checkpoint folder: <run>/checkpoint-<step>
        return f"{path.parent.parent.name}/{path.name}"
    return path.name or str(path)


def unique_labels(entries: list[Entry]) -> list[Entry]:
    """Give every entry a label unique within its domain (a repeat gets #2, #3, ...)."""
    seen: dict[tuple[str, str], int] = {}
    out = []
    for e in entries:
        label = e.label or default_label(e.checkpoint)
        key = (e.domain, label)
        seen[key] = seen.get(key, 0) + 1
        out.append(Entry(e.domain, e.checkpoint, label if seen[key] == 1 else f"{label}#{seen[key]}"))
    return out


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def run_of(checkpoint: str) -> tuple[Path | None, int | None]:
    """(run folder, checkpoint step) of a run or checkpoint folder; (None, None) for a base."""
    if checkpoint == "base":
        return None, None
    path = Path(checkpoint)
    if (path / "model.json").exists():  # a base model folder
        return None, None
    if (path / "state.json").exists():
        step = json.loads((path / "state.json").read_text()).get("step")
        return path.parent.parent, step
    from flowcoach.core.checkpoint import list_checkpoints

    found = list_checkpoints(path)
    step = json.loads((found[-1] / "state.json").read_text()).get("step") if found else None
    return path, step


def load_entry_model(domain, checkpoint: str):
    """The model of an entry; one-line errors for a missing folder or another domain's checkpoint."""
    from flowcoach.core.checkpoint import load_base, load_trained

    if checkpoint == "base":
        return load_base(domain)[0]
    path = Path(checkpoint)
    if not path.exists():
        raise FlowcoachError(f"'{checkpoint}' does not exist; give {domain.name}=base, a base model folder, "
                             "a run folder or a checkpoint folder")
    if (path / "model.json").exists():
        return load_base(domain, path)[0]
    return load_trained(domain, path)


# ----------------------------------------------------------------------------- intervals
def bootstrap_indices(n: int, replicates: int, seed: int) -> np.ndarray:
    """[replicates, n] indices drawn with replacement; the same for every model of a domain."""
    return np.random.default_rng(seed).integers(0, n, size=(replicates, n))


def resampled_means(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Mean of the finite per-sample values of each resample (NaN where a resample has none)."""
    v = np.asarray(values, dtype=float)[indices]
    finite = np.isfinite(v)
    counts = finite.sum(axis=1)
    sums = np.where(finite, v, 0.0).sum(axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def finite_mean(values) -> float:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


@dataclass
class Interval:
    value: float
    lo: float | None = None
    hi: float | None = None
    method: str = "none"
    """per-sample bootstrap | re-evaluated bootstrap | fixed | n/a"""
    replicates: int = 0
    note: str = ""

    def as_dict(self) -> dict:
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "method": self.method,
                "replicates": self.replicates, **({"note": self.note} if self.note else {})}


def percentile_interval(point: float, replicates: np.ndarray | None, method: str, level: float = LEVEL) -> Interval:
    """The percentile interval of the resampled values, or an Interval without bounds saying why."""
    if replicates is None:
        return Interval(point, method="fixed", note="no sampling variation to resample (a setting, or intervals off)")
    done = np.asarray(replicates, dtype=float)
    reps = done[np.isfinite(done)]
    if not math.isfinite(point):
        return Interval(point, method="n/a", replicates=len(reps), note="the value is not finite")
    if len(done) < MIN_REPLICATES:
        return Interval(point, method="n/a", replicates=len(reps),
                        note=f"only {len(done)} resamples (need {MIN_REPLICATES}): the evaluator is too slow "
                             "for the time budget (--bootstrap-seconds)")
    if len(reps) < MIN_REPLICATES:
        return Interval(point, method="n/a", replicates=len(reps),
                        note=f"only {len(reps)} of {len(done)} resamples give a finite value (need {MIN_REPLICATES}; "
                             "e.g. a subgroup absent from most resamples)")
    alpha = (1 - level) / 2
    lo, hi = (float(q) for q in np.quantile(reps, [alpha, 1 - alpha]))
    tol = 1e-9 * (1 + abs(point))
    if not (lo - tol <= point <= hi + tol):
        return Interval(point, method="n/a", replicates=len(reps),
                        note=f"resampled values [{lo:.4g}, {hi:.4g}] miss the full-set value: the metric depends on "
                             "distinct samples, which resampling with replacement duplicates")
    return Interval(point, lo, hi, method, len(reps))


def reevaluated_replicates(evaluate, objects: list, cond: Any, indices: np.ndarray, keys: list[str],
                           budget_s: float) -> dict[str, np.ndarray]:
    """Re-run ``evaluate(objects, cond)`` on resampled sets (rows of indices) until done or out of time."""
    from flowcoach.core.sampling.rollout import index_cond

    rows: dict[str, list[float]] = {k: [] for k in keys}
    start, failed = time.perf_counter(), 0
    for idx in indices:
        try:
            metrics = evaluate([objects[i] for i in idx], index_cond(cond, torch.as_tensor(idx)))
        except Exception as e:  # noqa: BLE001 - one degenerate resample must not lose the whole comparison
            if not failed:
                print(f"warning: the evaluator failed on a resample ({type(e).__name__}: {e}); counted as NaN")
            failed, metrics = failed + 1, {}
        for k in keys:
            rows[k].append(float(metrics.get(k, float("nan"))))
        if time.perf_counter() - start > budget_s:
            break
    return {k: np.asarray(v) for k, v in rows.items()}


def per_sample_values(domain, objects: list, cond: Any, metrics: dict) -> dict[str, np.ndarray]:
    """Per-sample values from the domain's optional ``evaluate_samples`` hook, checked against the metrics."""
    hook = getattr(domain, "evaluate_samples", None)
    if hook is None:
        return {}
    out = {}
    for key, values in hook(objects, cond).items():
        values = np.asarray(values, dtype=float).reshape(-1)
        if len(values) != len(objects):
            raise FlowcoachError(f"{domain.name}.evaluate_samples gave {len(values)} values of '{key}' for "
                                 f"{len(objects)} samples")
        point = metrics.get(key)
        if point is not None and math.isfinite(point) and not math.isclose(finite_mean(values), point,
                                                                            rel_tol=1e-5, abs_tol=1e-7):
            raise FlowcoachError(f"{domain.name}.evaluate_samples: the mean of '{key}' ({finite_mean(values):.6g}) "
                                 f"is not its evaluate() value ({point:.6g})")
        out[key] = values
    return out


# ----------------------------------------------------------------------------- evaluation
@dataclass
class Settings:
    num_samples: int
    num_steps: int
    shift: float
    seed: int


@dataclass
class Result:
    entry: Entry
    settings: Settings
    metrics: dict[str, float]
    intervals: dict[str, Interval]
    replicates: dict[str, np.ndarray]
    methods: dict[str, str]
    objects: list = field(repr=False, default_factory=list)
    scores: torch.Tensor | None = field(repr=False, default=None)
    seconds: float = 0.0
    run_dir: Path | None = None
    step: int | None = None


def domain_settings(domain, num_samples: int | None, num_steps: int | None, shift: float | None,
                    seed: int) -> Settings:
    """Evaluation settings of a domain: the user's, else those its training evaluates with."""
    from flowcoach.core.config import TrainConfig, set_fields

    cfg = TrainConfig()
    defaults = {k: v for k, v in domain.train_defaults().items() if k != "algo"}
    set_fields(cfg, defaults)
    return Settings(num_samples if num_samples is not None else cfg.eval_samples,
                    num_steps if num_steps is not None else cfg.sampler.eval_num_steps,
                    shift if shift is not None else cfg.sampler.shift, seed)


def evaluate_entry(model, domain, entry: Entry, settings: Settings, indices: np.ndarray | None,
                   budget_s: float, device="cpu", level: float = LEVEL) -> Result:
    """Point metrics (``evaluate_model``, as `flowcoach eval`), their bootstrap replicates and intervals."""
    from flowcoach.core.trainer import evaluate_model

    start = time.perf_counter()
    model = model.to(device).eval()
    interact = domain.kind == "interact"
    metrics, objects, scores = evaluate_model(model, domain, settings.num_samples, settings.num_steps, settings.shift,
                                              seed=settings.seed, device=device, render=4 if interact else 0)
    cond = domain.eval_conditions(settings.num_samples)
    replicates: dict[str, np.ndarray] = {}
    methods: dict[str, str] = {}
    if indices is not None:
        replicates["reward_mean"] = resampled_means(scores.detach().cpu().numpy(), indices)
        methods["reward_mean"] = "per-sample bootstrap"
        for key, values in per_sample_values(domain, objects, cond, metrics).items():
            replicates[key], methods[key] = resampled_means(values, indices), "per-sample bootstrap"
        sets = [("", objects)]
        if interact:  # the other splits' episodes (deterministic: the same ones evaluate_model played)
            from flowcoach.core.interact import evaluate_episodes

            for split in domain.eval_splits[1:]:
                episodes = evaluate_episodes(model, domain, cond, settings.num_steps, settings.shift, split=split,
                                             device=device)
                replay = {f"{split}/{k}": float(v) for k, v in domain.evaluate(episodes, cond).items()}
                if any(not _same(replay[k], metrics.get(k)) for k in replay):  # an environment that is not deterministic
                    print(f"warning: {domain.name} '{split}' episodes differ when replayed; its metrics are the replay's")
                    metrics.update(replay)
                sets.append((f"{split}/", episodes))
        others = [prefix for prefix, _ in sets[1:]]
        for prefix, objs in sets:
            keys = [k[len(prefix):] for k in metrics if k not in replicates and k not in SETTING_METRICS
                    and (k.startswith(prefix) if prefix else not any(k.startswith(o) for o in others))]
            if not keys:
                continue
            reps = reevaluated_replicates(domain.evaluate, objs, cond, indices, keys, budget_s / len(sets))
            for k in keys:
                replicates[prefix + k], methods[prefix + k] = reps[k], "re-evaluated bootstrap"
    intervals = {k: percentile_interval(v, replicates.get(k), methods.get(k, "fixed"), level) for k, v in metrics.items()}
    run_dir, step = run_of(entry.checkpoint)
    return Result(entry, settings, metrics, intervals, replicates, methods, objects, scores,
                  time.perf_counter() - start, run_dir, step)


def _same(a: float, b: float | None) -> bool:
    return b is not None and (a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9))


def paired_difference(result: Result, reference: Result, level: float = LEVEL) -> dict[str, Interval]:
    """result - reference per metric, with a paired bootstrap (the same resampled indices for both)."""
    out = {}
    for key, value in result.metrics.items():
        if key not in reference.metrics:
            continue
        point = value - reference.metrics[key]
        a, b = result.replicates.get(key), reference.replicates.get(key)
        if a is None or b is None:
            out[key] = percentile_interval(point, None, "fixed", level)
            continue
        k = min(len(a), len(b))  # both are prefixes of the same index rows
        out[key] = percentile_interval(point, a[:k] - b[:k], result.methods[key], level)
    return out


# ----------------------------------------------------------------------------- reward curves
def read_metrics_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: the rest of the log still plots
                continue
    return rows


def curve(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in rows
           if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_reward_curves(domain_name: str, results: list[Result], path: Path) -> Path | None:
    """Training reward (rollouts) and held-out reward (ODE evals) against step for the domain's runs."""
    runs = [r for r in results if r.run_dir is not None and read_metrics_log(r.run_dir)]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for k, r in enumerate(runs):
        rows = read_metrics_log(r.run_dir)
        colour = f"C{k % 10}"
        steps, values = curve(rows, "reward/mean")
        ax.plot(steps, values, color=colour, alpha=0.8, lw=1.2, label=f"{r.entry.label}: train reward (SDE rollouts)")
        steps, values = curve(rows, "eval/reward_mean")
        if steps:
            ax.plot(steps, values, "o--", color=colour, ms=4, label=f"{r.entry.label}: held-out reward (ODE)")
        if r.step is not None:
            ax.axvline(r.step, color=colour, ls=":", lw=1)
    base = [r for r in results if r.run_dir is None]
    for r in base:
        ax.axhline(r.metrics["reward_mean"], color="gray", ls="--", lw=1, label=f"{r.entry.label}: held-out reward")
    ax.set_xlabel("RL step"), ax.set_ylabel("reward"), ax.set_title(f"{domain_name}: reward curves")
    ax.grid(alpha=0.3), ax.legend(fontsize=7, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(), fig.savefig(path, dpi=100), plt.close(fig)
    return path


# ----------------------------------------------------------------------------- samples
def sample_files(folder: Path, max_images: int = 6, max_audio: int = 4, max_text: int = 3) -> dict[str, list[Path]]:
    """The files of a samples folder to embed, by kind, and the rest ('other')."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).exists() else []
    kinds: dict[str, list[Path]] = {"image": [], "audio": [], "video": [], "text": [], "other": []}
    stems_with_image = {p.stem for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
    for p in files:
        s = p.suffix.lower()
        small = p.stat().st_size <= EMBED_MAX_BYTES
        if s in IMAGE_SUFFIXES and small and len(kinds["image"]) < max_images:
            kinds["image"].append(p)
        elif s in AUDIO_SUFFIXES and small and len(kinds["audio"]) < max_audio:
            kinds["audio"].append(p)
        elif s in VIDEO_SUFFIXES and small and p.stem not in stems_with_image and not kinds["video"]:
            kinds["video"].append(p)  # the same clips as a GIF beside it are not embedded twice
        elif s in TEXT_SUFFIXES and small and len(kinds["text"]) < max_text:
            kinds["text"].append(p)
        else:
            kinds["other"].append(p)
    return kinds


def parse_cif(text: str) -> tuple[str, np.ndarray, list[str], np.ndarray]:
    """(name, lattice rows [3, 3] in Å, element symbols, fractional coordinates [N, 3]) of a P1 CIF,
    as pymatgen's CifWriter writes them; ValueError when the text is not one."""
    values, loops, name = {}, [], ""
    lines = [line.strip() for line in text.splitlines()]
    k = 0
    while k < len(lines):
        line = lines[k]
        if line.startswith("data_"):
            name = line[5:]
        elif line == "loop_":
            header, rows = [], []
            k += 1
            while k < len(lines) and lines[k].startswith("_"):
                header.append(lines[k].split()[0])
                k += 1
            while k < len(lines) and lines[k] and not lines[k].startswith(("_", "loop_", "data_", "#")):
                rows.append(lines[k].split())
                k += 1
            loops.append((header, rows))
            continue
        elif line.startswith("_") and len(line.split()) >= 2:
            key, value = line.split(None, 1)
            values[key] = value.strip("'\"")
        k += 1
    cell = [float(values[f"_cell_{q}"].split("(")[0]) for q in
            ("length_a", "length_b", "length_c", "angle_alpha", "angle_beta", "angle_gamma")]
    header, rows = next(((h, r) for h, r in loops if "_atom_site_fract_x" in h), (None, None))
    if header is None or not rows:
        raise ValueError("no _atom_site_fract_x loop")
    col = {h: i for i, h in enumerate(header)}
    symbol = col.get("_atom_site_type_symbol", col.get("_atom_site_label"))
    frac = np.array([[float(r[col[f"_atom_site_fract_{a}"]].split("(")[0]) for a in "xyz"] for r in rows])
    symbols = [re.sub(r"[^A-Za-z]", "", r[symbol]) for r in rows]
    return name, lattice_matrix(*cell), symbols, frac


def lattice_matrix(a: float, b: float, c: float, alpha: float, beta: float, gamma: float) -> np.ndarray:
    """Lattice vectors as rows from cell lengths (Å) and angles (degrees): a along x, b in the xy plane."""
    al, be, ga = np.radians([alpha, beta, gamma])
    cx = c * np.cos(be)
    cy = c * (np.cos(al) - np.cos(be) * np.cos(ga)) / np.sin(ga)
    cz = math.sqrt(max(c * c - cx * cx - cy * cy, 0.0))
    return np.array([[a, 0.0, 0.0], [b * np.cos(ga), b * np.sin(ga), 0.0], [cx, cy, cz]])


def plot_structures(cifs: list[Path], path: Path, max_structures: int = 6) -> Path | None:
    """A grid of 3-D views (unit cell and atoms, coloured by element) of the CIFs that parse."""
    parsed = []
    for p in cifs:
        try:
            parsed.append(parse_cif(p.read_text(errors="replace")))
        except (ValueError, KeyError, IndexError):
            continue
        if len(parsed) == max_structures:
            break
    if not parsed:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    elements = sorted({s for _, _, symbols, _ in parsed for s in symbols})
    colour = {e: f"C{k % 10}" for k, e in enumerate(elements)}
    cols = min(3, len(parsed))
    rows = math.ceil(len(parsed) / cols)
    fig = plt.figure(figsize=(3.2 * cols, 3.2 * rows))
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=float)
    edges = [(p, q) for p in range(8) for q in range(p + 1, 8) if np.abs(corners[p] - corners[q]).sum() == 1]
    for n, (name, lattice, symbols, frac) in enumerate(parsed):
        ax = fig.add_subplot(rows, cols, n + 1, projection="3d")
        cart = corners @ lattice
        for p, q in edges:
            ax.plot(*zip(cart[p], cart[q]), color="0.6", lw=0.8)
        xyz = (frac % 1.0) @ lattice
        ax.scatter(*xyz.T, c=[colour[s] for s in symbols], s=60, depthshade=False, edgecolors="k", linewidths=0.4)
        ax.set_box_aspect(np.maximum(np.ptp(cart, axis=0), 1e-3))  # true proportions of the cell
        ax.set_title(name or cifs[n].stem, fontsize=9), ax.set_axis_off()
    handles = [plt.Line2D([], [], marker="o", ls="", color=colour[e], label=e) for e in elements]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(elements), 10), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=90), plt.close(fig)
    return path


def data_uri(path: Path) -> str:
    suffix = path.suffix.lower()
    mime = {**IMAGE_SUFFIXES, **AUDIO_SUFFIXES, **VIDEO_SUFFIXES}.get(suffix, "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def text_excerpt(path: Path, max_lines: int = 40) -> str:
    lines = path.read_text(errors="replace").splitlines()
    more = f"\n... ({len(lines) - max_lines} more lines in {path.name})" if len(lines) > max_lines else ""
    return "\n".join(lines[:max_lines]) + more


def samples_html(folder: Path, root: Path) -> str:
    kinds = sample_files(folder)
    parts = []
    for p in kinds["image"]:
        parts.append(f'<figure><img src="{data_uri(p)}" alt="{html.escape(p.name)}"><figcaption>{html.escape(p.name)}'
                     "</figcaption></figure>")
    for p in kinds["video"]:
        parts.append(f'<figure><video controls loop muted src="{data_uri(p)}"></video><figcaption>'
                     f"{html.escape(p.name)}</figcaption></figure>")
    for p in kinds["audio"]:
        parts.append(f'<figure class="audio"><audio controls preload="metadata" src="{data_uri(p)}"></audio>'
                     f"<figcaption>{html.escape(p.name)}</figcaption></figure>")
    for p in kinds["text"]:
        parts.append(f'<details class="text"><summary>{html.escape(p.name)}</summary><pre>'
                     f"{html.escape(text_excerpt(p))}</pre></details>")
    if kinds["other"]:
        names = ", ".join(html.escape(str(p.relative_to(folder))) for p in kinds["other"][:12])
        more = f" and {len(kinds['other']) - 12} more" if len(kinds["other"]) > 12 else ""
        parts.append(f'<p class="files">also in <code>{html.escape(str(folder.relative_to(root)))}</code>: {names}{more}</p>')
    return '<div class="samples">' + "".join(parts) + "</div>" if parts else "<p>no sample files</p>"


def samples_markdown(folder: Path, root: Path) -> list[str]:
    kinds = sample_files(folder)
    lines = [f"![{p.name}]({p.relative_to(root).as_posix()})" for p in kinds["image"]]
    links = [p for k in ("video", "audio", "text", "other") for p in kinds[k]]
    if links:
        lines.append("files: " + ", ".join(f"[{p.name}]({p.relative_to(root).as_posix()})" for p in links[:20])
                     + (f" and {len(links) - 20} more" if len(links) > 20 else ""))
    return lines or ["no sample files"]


# ----------------------------------------------------------------------------- the report
def fmt(v: float | None, signed: bool = False) -> str:
    if v is None or not isinstance(v, (int, float)):
        return "-"
    if not math.isfinite(v):
        return str(v)
    return f"{v:+.4g}" if signed else f"{v:.4g}"


def cell(iv: Interval, signed: bool = False) -> str:
    if iv.lo is None:
        return fmt(iv.value, signed) + (" (n/a)" if iv.method == "n/a" else "")
    return f"{fmt(iv.value, signed)} [{fmt(iv.lo, signed)}, {fmt(iv.hi, signed)}]"


@dataclass
class DomainReport:
    name: str
    results: list[Result]
    reference: Result | None
    deltas: dict[str, dict[str, Interval]]
    curve_png: Path | None
    sample_dirs: dict[str, Path]

    def metric_names(self) -> list[str]:
        names: list[str] = []
        for r in self.results:
            names += [k for k in r.metrics if k not in names]
        return names

    def columns(self) -> list[str]:
        cols = [r.entry.label for r in self.results]
        cols += [f"Δ {label} − {self.reference.entry.label}" for label in self.deltas] if self.reference else []
        return cols

    def rows(self) -> list[list[str]]:
        rows = []
        for m in self.metric_names():
            row = [m] + [cell(r.intervals[m]) if m in r.intervals else "-" for r in self.results]
            row += [cell(d[m], signed=True) if m in d else "-" for d in self.deltas.values()]
            rows.append(row)
        return rows


def build_domain_report(name: str, results: list[Result], out: Path, level: float) -> DomainReport:
    bases = [r for r in results if r.run_dir is None]
    reference = bases[0] if bases else results[0]
    deltas = {r.entry.label: paired_difference(r, reference, level) for r in results if r is not reference}
    if len(results) < 2:
        reference, deltas = None, {}
    curve_png = plot_reward_curves(name, results, out / "curves" / f"{slug(name)}.png")
    dirs = {r.entry.label: out / "samples" / slug(name) / slug(r.entry.label) for r in results}
    return DomainReport(name, results, reference, deltas, curve_png, dirs)


METHOD_TEXT = (
    "Every model of a domain is evaluated on the same fixed held-out conditions with the same seed (so the same "
    "initial noise): deterministic ODE samples, as `flowcoach eval` does. Intervals are {level:.0%} percentile "
    "bootstraps over the n evaluated samples, B = {boot} resamples drawn once per domain and shared by its models. "
    "`reward_mean` (the training reward) and any metric a domain returns per sample (`evaluate_samples`) are "
    "bootstrapped from their per-sample values; the other evaluator metrics, which domains return as aggregates, "
    "by re-running the domain's evaluator on each resampled set (within {budget:g} s per model: fewer than "
    "{minrep} resamples give no interval). A metric that counts distinct samples (uniqueness, novelty, coverage) is "
    "biased by the duplicates a resample holds: when its resamples do not bracket its full-set value it is shown "
    "as n/a instead of a misleading interval. Δ columns are paired differences to the domain's base (the same "
    "resamples for both models). Intervals reflect the sampling noise of n samples at this seed, not the spread "
    "between training runs or seeds."
)


def method_rows(reports: list[DomainReport]) -> list[list[str]]:
    rows = []
    for d in reports:
        for r in d.results:
            for k, iv in r.intervals.items():
                rows.append([d.name, r.entry.label, k, iv.method, str(iv.replicates), iv.note])
    return rows


def summary_rows(reports: list[DomainReport]) -> list[list[str]]:
    rows = []
    for d in reports:
        for r in d.results:
            s = r.settings
            rows.append([d.name, r.entry.label, r.entry.checkpoint, str(s.num_samples), str(s.num_steps),
                         f"{s.shift:g}", cell(r.intervals["reward_mean"]), f"{r.seconds:.1f}"])
    return rows


SUMMARY_HEADER = ["domain", "model", "checkpoint", "samples", "ODE steps", "shift", "held-out reward", "eval s"]
METHOD_HEADER = ["domain", "model", "metric", "interval", "resamples", "note"]


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    return ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(map(esc, row)) + " |" for row in rows]


def render_markdown(reports: list[DomainReport], out: Path, details: str, method: str) -> str:
    lines = ["# flowcoach compare", "", details, "", "## Summary", ""] + md_table(SUMMARY_HEADER, summary_rows(reports))
    lines += ["", "## Held-out metrics", ""]
    for d in reports:
        lines += [f"### {d.name}", ""] + md_table(["metric", *d.columns()], d.rows()) + [""]
    lines += ["## Reward curves", ""]
    for d in reports:
        lines += [f"### {d.name}", "", f"![{d.name} reward curves]({d.curve_png.relative_to(out).as_posix()})"
                  if d.curve_png else "no training runs among this domain's models (only base models)", ""]
    lines += ["## Samples", ""]
    for d in reports:
        lines += [f"### {d.name}", ""]
        for label, folder in d.sample_dirs.items():
            lines += [f"#### {label}", ""] + samples_markdown(folder, out) + [""]
    lines += ["## Method", "", method, ""] + md_table(METHOD_HEADER, method_rows(reports))
    return "\n".join(lines) + "\n"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;padding:0 1rem;
color:#1d232a;line-height:1.45}
h1{margin-bottom:.2rem}h2{border-bottom:2px solid #dde3ea;padding-bottom:.2rem;margin-top:2.2rem}
nav a{margin-right:1rem}table{border-collapse:collapse;margin:.6rem 0 1.2rem;font-size:.9rem}
th,td{border:1px solid #d5dbe1;padding:.25rem .55rem;text-align:right;white-space:nowrap}
th{background:#f1f4f7;white-space:normal;overflow-wrap:break-word;max-width:16rem;vertical-align:bottom}
td:first-child,th:first-child{text-align:left}.scroll{overflow-x:auto;max-width:100%}
.samples{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start}
figure{margin:0;border:1px solid #e3e7eb;padding:.4rem;border-radius:4px;background:#fafbfc}
figure img,figure video{max-width:380px;max-height:380px;min-width:240px;display:block}
figure img{image-rendering:pixelated}figcaption{font-size:.75rem;color:#5b6670}
details.text pre{max-height:320px;overflow:auto;font-size:.75rem;background:#f6f8fa;padding:.5rem}
.note{color:#5b6670;font-size:.85rem}.files{font-size:.8rem;color:#5b6670;width:100%}
#broken{display:none;background:#fde2e1;border:1px solid #e5534b;padding:.5rem}
img.curve{max-width:100%}.domain-samples{display:flex;flex-wrap:wrap;gap:1.5rem}
.model-samples{flex:1 1 360px;min-width:0}
"""

# Marks what rendered: a broken image or unreadable audio shows a banner, and the counts land on
# <body> as data-* attributes (the test reads them from a headless browser's DOM).
CHECK_JS = """
window.addEventListener('load', async () => {
  const imgs = [...document.images];
  const brokenImgs = imgs.filter(i => !(i.complete && i.naturalWidth > 0));
  const media = [...document.querySelectorAll('audio,video')];
  const ok = await Promise.all(media.map(m => new Promise(res => {
    if (m.readyState >= 1) return res(true);
    m.addEventListener('loadedmetadata', () => res(true), {once: true});
    m.addEventListener('error', () => res(false), {once: true});
    setTimeout(() => res(m.readyState >= 1), 4000);
  })));
  const b = document.body.dataset;
  b.imagesLoaded = imgs.length - brokenImgs.length; b.imagesBroken = brokenImgs.length;
  b.mediaLoaded = ok.filter(x => x).length; b.mediaBroken = ok.filter(x => !x).length;
  if (brokenImgs.length || ok.some(x => !x)) document.getElementById('broken').style.display = 'block';
  b.checked = 'yes';
});
"""


def html_table(header: list[str], rows: list[list[str]], cls: str, attrs: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table class="{cls}"{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def render_html(reports: list[DomainReport], out: Path, details: str, method: str) -> str:
    e = html.escape
    parts = ['<!doctype html><html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width,initial-scale=1">',
             f"<title>flowcoach compare: {e(', '.join(d.name for d in reports))}</title><style>{CSS}</style></head>",
             '<body data-report="flowcoach-compare">',
             '<div id="broken">Some embedded images or audio did not load.</div>',
             f'<header><h1>flowcoach compare</h1><p class="note">{e(details)}</p></header>',
             '<nav><a href="#summary">Summary</a><a href="#metrics">Held-out metrics</a>'
             '<a href="#curves">Reward curves</a><a href="#samples">Samples</a><a href="#method">Method</a></nav>',
             '<section id="summary"><h2>Summary</h2>', html_table(SUMMARY_HEADER, summary_rows(reports), "summary"),
             "</section>", '<section id="metrics"><h2>Held-out metrics</h2>']
    for d in reports:
        parts += [f'<h3 id="metrics-{e(slug(d.name))}">{e(d.name)}</h3>',
                  html_table(["metric", *d.columns()], d.rows(), "metrics", f' data-domain="{e(d.name)}"')]
    parts += ["</section>", '<section id="curves"><h2>Reward curves</h2>']
    for d in reports:
        parts.append(f'<h3 id="curves-{e(slug(d.name))}">{e(d.name)}</h3>')
        parts.append(f'<img class="curve" data-domain="{e(d.name)}" src="{data_uri(d.curve_png)}" '
                     f'alt="{e(d.name)} reward curves">' if d.curve_png else
                     '<p class="note">no training runs among this domain\'s models (only base models)</p>')
    parts += ["</section>", '<section id="samples"><h2>Samples</h2>']
    for d in reports:
        parts.append(f'<h3 id="samples-{e(slug(d.name))}">{e(d.name)}</h3>')
        parts.append('<div class="domain-samples">')
        for label, folder in d.sample_dirs.items():
            parts += [f'<div class="model-samples" data-domain="{e(d.name)}" data-model="{e(label)}"><h4>{e(label)}</h4>',
                      samples_html(folder, out), "</div>"]
        parts.append("</div>")
    parts += ["</section>", f'<section id="method"><h2>Method</h2><p>{e(method)}</p>',
              "<details><summary>how each interval was computed</summary>",
              html_table(METHOD_HEADER, method_rows(reports), "method"), "</details></section>",
              f"<script>{CHECK_JS}</script></body></html>"]
    return "\n".join(parts) + "\n"


def print_tables(console, reports: list[DomainReport]) -> None:
    from rich.table import Table

    for d in reports:
        table = Table(title=f"{d.name}: held-out metrics ({LEVEL:.0%} intervals)")
        for k, col in enumerate(["metric", *d.columns()]):
            table.add_column(col, justify="left" if k == 0 else "right")
        for row in d.rows():
            table.add_row(*row)
        console.print(table)


def metrics_json(reports: list[DomainReport], settings: dict) -> dict:
    return {"settings": settings, "domains": {d.name: {
        "models": {r.entry.label: {"checkpoint": r.entry.checkpoint, "num_samples": r.settings.num_samples,
                                   "num_steps": r.settings.num_steps, "shift": r.settings.shift, "seed": r.settings.seed,
                                   "seconds": r.seconds, "metrics": {k: iv.as_dict() for k, iv in r.intervals.items()}}
                   for r in d.results},
        "reference": d.reference.entry.label if d.reference else None,
        "deltas": {label: {k: iv.as_dict() for k, iv in delta.items()} for label, delta in d.deltas.items()},
    } for d in reports}}


# ----------------------------------------------------------------------------- the command
def compare(entries: list[Entry], output: str | Path, num_samples: int | None = None, num_steps: int | None = None,
            shift: float | None = None, seed: int = 12345, bootstrap: int = 1000, bootstrap_seconds: float = 120.0,
            device: str = "cpu", console=None, domains: dict | None = None) -> Path:
    """Evaluate every entry, write report.md, report.html and metrics.json to ``output``; return the folder.

    ``domains`` maps a domain name to a Domain object to use instead of the registry's (tests).
    """
    from flowcoach.core.domain import get_domain

    if not entries:
        raise FlowcoachError("nothing to compare; give models as DOMAIN=CHECKPOINT, e.g. "
                             "`flowcoach compare toy=base toy=runs/<run>`")
    if bootstrap != 0 and bootstrap < MIN_REPLICATES:
        raise FlowcoachError(f"--bootstrap must be 0 (no intervals) or >= {MIN_REPLICATES} (a {LEVEL:.0%} percentile "
                             f"interval needs at least {MIN_REPLICATES} resamples), not {bootstrap}")
    if num_samples is not None and num_samples < 2:
        raise FlowcoachError(f"--num-samples must be >= 2, not {num_samples}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    entries = unique_labels(entries)
    domains = dict(domains or {})
    for e in entries:  # every name, folder and checkpoint is checked before anything is evaluated
        if e.domain not in domains:
            domains[e.domain] = get_domain(e.domain)
    models = [load_entry_model(domains[e.domain], e.checkpoint) for e in entries]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    order = list(dict.fromkeys(e.domain for e in entries))
    reports = []
    for name in order:
        domain = domains[name]
        settings = domain_settings(domain, num_samples, num_steps, shift, seed)
        indices = bootstrap_indices(settings.num_samples, bootstrap, seed) if bootstrap else None
        results = []
        for e, model in zip(entries, models):
            if e.domain != name:
                continue
            if console is not None:
                console.print(f"evaluating {name} {e.label}: {settings.num_samples} samples, {settings.num_steps} ODE steps")
            r = evaluate_entry(model, domain, e, settings, indices, bootstrap_seconds, device)
            folder = out / "samples" / slug(name) / slug(e.label)
            shutil.rmtree(folder, ignore_errors=True)
            domain.save(r.objects, r.scores, folder)
            cifs = sorted(folder.rglob("*.cif"))
            if cifs:  # crystals: a view of the first structures beside their CIF text
                plot_structures(cifs, folder / STRUCTURE_VIEWS)
            r.objects = []  # the samples are on disk now
            results.append(r)
        reports.append(build_domain_report(name, results, out, LEVEL))
    details = (f"{len(entries)} models of {len(order)} domain(s); seed {seed}; {LEVEL:.0%} intervals from "
               f"{bootstrap} bootstrap resamples" if bootstrap else f"{len(entries)} models; intervals off (--bootstrap 0)")
    method = METHOD_TEXT.format(level=LEVEL, boot=bootstrap, budget=bootstrap_seconds, minrep=MIN_REPLICATES)
    (out / "report.md").write_text(render_markdown(reports, out, details, method))
    (out / "report.html").write_text(render_html(reports, out, details, method))
    settings = {"seed": seed, "bootstrap": bootstrap, "bootstrap_seconds": bootstrap_seconds, "level": LEVEL,
                "device": device}
    (out / "metrics.json").write_text(json.dumps(metrics_json(reports, settings), indent=2))
    if console is not None:
        print_tables(console, reports)
    return out
