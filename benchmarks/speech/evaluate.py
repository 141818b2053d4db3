"""Held-out evaluation of a speech model (or of the eSpeak references) with timing, as one JSON record.

    .venv/bin/python benchmarks/speech/evaluate.py --label base --checkpoint base
    .venv/bin/python benchmarks/speech/evaluate.py --label rl --checkpoint runs/<speech flow-grpo run>
    .venv/bin/python benchmarks/speech/evaluate.py --label references --checkpoint references

Writes benchmarks/results/speech_<label>.json: the domain's evaluator metrics on the held-out
conditions (every held-out text in every style and voice: 480), the training reward's mean, and
timings: wall and process CPU seconds of sampling (``--num-steps`` Euler ODE steps), of the
Griffin-Lim vocoder and of the whole evaluation, and the real-time factors (seconds of compute per
second of audio). ``references`` decodes the eSpeak renderings of the same conditions the same way
(Griffin-Lim, re-analysis): the ceiling of every figure and the vocoder's own MCD floor.
WAV samples and F0-contour plots of the first 20 conditions go to benchmarks/speech/samples/<label>/.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from flowcoach.core.checkpoint import load_trained
from flowcoach.core.trainer import generate
from flowcoach.domains.speech import SpeechDomain
from flowcoach.domains.speech.corpus import STYLE_NAMES, VOICES
from flowcoach.domains.speech.decode import save_utterances
from flowcoach.rewards import build_reward

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", required=True)
    parser.add_argument("--checkpoint", default="base", help="'base', 'references', a run or checkpoint folder")
    parser.add_argument("--num-samples", type=int, default=480)
    parser.add_argument("--num-steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    domain = SpeechDomain()
    cond = domain.eval_conditions(args.num_samples)
    wall, cpu = time.perf_counter(), time.process_time()
    if args.checkpoint == "references":
        x = domain.mels()[torch.as_tensor(domain.eval_rows(args.num_samples))]
        sample_wall = sample_cpu = 0.0
    else:
        model = load_trained(domain, args.checkpoint).eval()
        x = generate(model, domain, cond, args.num_steps, seed=args.seed)
        sample_wall, sample_cpu = time.perf_counter() - wall, time.process_time() - cpu
    decode_start = time.perf_counter()
    objects = domain.decode(x)
    decode_wall = time.perf_counter() - decode_start
    metrics = domain.evaluate(objects, cond)
    scores, _ = build_reward(domain.default_rewards())(objects, cond)
    metrics["reward_mean"] = float(scores.mean())
    audio_seconds = sum(u.seconds for u in objects)
    vocoder_seconds = sum(u.vocoder_seconds for u in objects)
    total_wall, total_cpu = time.perf_counter() - wall, time.process_time() - cpu
    labels = [f"{STYLE_NAMES[int(s)]}_{VOICES[int(v)]}" for s, v in zip(cond["style"], cond["voice"])]
    out_samples = ROOT / "benchmarks" / "speech" / "samples" / args.label
    save_utterances(objects[:20], scores[:20], out_samples, labels=labels[:20], plots=10)
    record = {
        "label": args.label, "checkpoint": args.checkpoint, "num_samples": args.num_samples,
        "num_steps": None if args.checkpoint == "references" else args.num_steps, "seed": args.seed,
        "metrics": metrics,
        "timing": {"audio_seconds": round(audio_seconds, 1),
                   "sampling_wall_s": round(sample_wall, 1), "sampling_cpu_s": round(sample_cpu, 1),
                   "vocoder_wall_s": round(vocoder_seconds, 1), "decode_and_analysis_wall_s": round(decode_wall, 1),
                   "rtf_model": sample_wall / audio_seconds, "rtf_vocoder": vocoder_seconds / audio_seconds,
                   "rtf_total": (sample_wall + vocoder_seconds) / audio_seconds,
                   "evaluation_wall_s": round(total_wall, 1), "evaluation_cpu_s": round(total_cpu, 1),
                   "threads": args.threads, "machine": f"{platform.machine()}, shared 2-core CPU"},
    }
    out = ROOT / "benchmarks" / "results" / f"speech_{args.label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"{args.label}: style accuracy {metrics.get('style_accuracy', float('nan')):.3f}, MCD {metrics['mcd']:.2f} dB, "
          f"in band {metrics['in_band']:.3f}, reward {metrics['reward_mean']:.3f}, RTF {record['timing']['rtf_total']:.3f}; "
          f"wrote {out}")


if __name__ == "__main__":
    main()
