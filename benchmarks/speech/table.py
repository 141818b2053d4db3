"""Markdown tables of benchmarks/results/speech_*.json: overall figures, then per style.

    .venv/bin/python benchmarks/speech/table.py [labels ...]   (default: references base rl)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
STYLES = ("neutral", "excited", "sad", "question", "emphatic")
OVERALL = [("style_accuracy", "style acc.", 3), ("intonation_accuracy", "intonation acc.", 3), ("mcd", "MCD dB", 2), ("cer", "CER", 3), ("in_band", "in band", 3),
           ("reward_mean", "reward", 3), ("invalid_rate", "invalid", 3), ("clipped_rate", "clipped", 3)]
PER_STYLE = [("style_accuracy/{s}", "acc.", 2), ("intonation_accuracy/{s}", "inton. acc.", 2), ("{s}/in_band", "in band", 2), ("{s}/f0_level", "F0 level st", 1),
             ("{s}/f0_range", "F0 range st", 1), ("{s}/final_rise", "final rise st", 1),
             ("{s}/energy_std", "energy std dB", 1), ("{s}/pause_ratio", "pauses", 3), ("{s}/rate", "rate /s", 1),
             ("{s}/voiced_fraction", "voiced", 2)]


def fmt(value, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def main(labels: list[str]) -> None:
    records = {label: json.loads((RESULTS / f"speech_{label}.json").read_text()) for label in labels
               if (RESULTS / f"speech_{label}.json").exists()}
    print("| model | " + " | ".join(name for _, name, _ in OVERALL) + " | RTF (model + vocoder) | eval CPU s |")
    print("|---|" + "---|" * (len(OVERALL) + 2))
    for label, r in records.items():
        m, t = r["metrics"], r["timing"]
        print(f"| {label} | " + " | ".join(fmt(m.get(k), d) for k, _, d in OVERALL)
              + f" | {t['rtf_model']:.3f} + {t['rtf_vocoder']:.3f} | {t['evaluation_cpu_s']:.0f} |")
    print()
    print("| style | model | " + " | ".join(name for _, name, _ in PER_STYLE) + " |")
    print("|---|---|" + "---|" * len(PER_STYLE))
    for s in STYLES:
        for label, r in records.items():
            m = r["metrics"]
            print(f"| {s} | {label} | " + " | ".join(fmt(m.get(k.format(s=s)), d) for k, _, d in PER_STYLE) + " |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["references", "base", "rl"])
