"""Markdown table of benchmarks/results/molecules_*.json beside the published QM9 (with H) anchors.

    .venv/bin/python benchmarks/molecules/table.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
# Published QM9 numbers with explicit hydrogens (%), 10,000 samples each:
# EDM (Hoogeboom et al. 2022, arXiv:2203.17003, Table 2) and EquiFM (Song et al. 2023, arXiv:2312.07168, Table 1).
ANCHORS = {
    "EDM (published)": {"atom_stability": 98.7, "mol_stability": 82.0, "validity": 91.9, "v_x_u": 90.7},
    "EquiFM (published)": {"atom_stability": 98.9, "mol_stability": 88.3, "validity": 94.7, "v_x_u": 93.5},
}
COLUMNS = ["atom_stability", "mol_stability", "validity", "v_x_u", "uniqueness", "novelty", "qed_mean", "sa_mean",
           "int_div", "pains_pass", "fcd"]
PERCENT = {"atom_stability", "mol_stability", "validity", "v_x_u", "uniqueness", "novelty", "pains_pass"}


def cell(key: str, value) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if key in PERCENT else f"{value:.3f}"


def main() -> None:
    header = "| model | samples | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for path in sorted(RESULTS.glob("molecules_*.json")):
        record = json.loads(path.read_text())
        m = record["metrics"]
        lines.append(f"| {record['label']} | {record['num_samples']} | "
                     + " | ".join(cell(k, m.get(k)) for k in COLUMNS) + " |")
    for name, values in ANCHORS.items():
        lines.append(f"| {name} | 10000 | " + " | ".join(f"{values[k]:.1f}" if k in values else "-" for k in COLUMNS) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
