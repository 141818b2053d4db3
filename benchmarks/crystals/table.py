"""Print the markdown results table of benchmarks/results/crystals_<label>.json (used for the README).

    .venv/bin/python benchmarks/crystals/table.py [LABEL ...]   # default: the main rows
"""

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
COLUMNS = ["struct_valid", "comp_valid", "valid", "proxy_stable_rate", "mean_proxy_ehull", "known_stable_rate", "mean_known_ehull", "unique_rate", "novel_rate",
           "sun_rate", "density_wdist", "density_mean", "nelem_wdist", "element_tv", "csp_match_rate", "sevenn_gap_shift"]


def main() -> None:
    print("| model | ODE steps | " + " | ".join(COLUMNS) + " | eval CPU s |")
    print("|---" * (len(COLUMNS) + 3) + "|")
    for label in sys.argv[1:] or ("heldout", "base", "rl", "dng_base", "dng_rl"):
        path = RESULTS / f"crystals_{label}.json"
        if not path.exists():
            continue
        rec = json.loads(path.read_text())
        m = rec["metrics"]
        cells = [f"{m[c]:.3f}" if c in m else "-" for c in COLUMNS]
        steps = rec.get("ode_steps", "-") if rec.get("checkpoint") != "data" else "-"
        print(f"| {label} (n={rec['num_samples']}) | {steps} | " + " | ".join(cells) + f" | {rec['eval_cpu_s']} |")


if __name__ == "__main__":
    main()
