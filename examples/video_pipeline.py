"""Flow-GRPO with LoRA on a diffusers WanPipeline, through flowcoach's trainer, scored by the video
domain's physics rewards.

    python examples/video_pipeline.py [OUT_DIR]                                    # a tiny random pipeline, CPU, ~1 min
    python examples/video_pipeline.py OUT_DIR --path /models/Wan2.1-T2V-1.3B-Diffusers --device cuda

With ``--path`` the pipeline is read from that local folder (diffusers format, ``local_files_only``:
nothing is downloaded); without it a tiny random WanPipeline is built in code, which runs the whole
path (prompts -> UMT5 -> Wan transformer with LoRA -> VAE decode -> rewards -> update) in seconds
but, being random, draws no physics. Prints the reward per step and the held-out evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="runs/examples")
    parser.add_argument("--path", default=None, help="local WanPipeline folder (default: a tiny random pipeline)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from flowcoach.core.algorithms import algorithm_defaults
    from flowcoach.core.trainer import train
    from flowcoach.domains.video.pipeline import PipelineVideoDomain, tiny_wan_pipeline

    if args.path:  # a real checkpoint: bf16 on the GPU, 17 frames of 256 x 256
        domain = PipelineVideoDomain(path=args.path, height=256, width=256, num_frames=17, dtype="bfloat16",
                                     device=args.device, base_dir=os.path.join(args.out, "wan_base"))
    else:
        domain = PipelineVideoDomain(pipeline=tiny_wan_pipeline(), lora_rank=4, data_size=4,
                                     base_dir=os.path.join(args.out, "tiny_wan_base"))
    cfg = algorithm_defaults("flow-grpo")
    cfg.steps, cfg.groups_per_step, cfg.group_size, cfg.micro_batch = args.steps, 2, 4, 8
    cfg.eval_samples, cfg.output_dir, cfg.device, cfg.tensorboard = 8, os.path.join(args.out, "runs"), args.device, False
    cfg.sampler.num_steps, cfg.sampler.eval_num_steps, cfg.sampler.shift = 6, 6, 3.0
    run = train(cfg, domain)
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        print(f"step {m['step']}: reward {m['reward/mean']:.4f} (physics {m['reward/video-physics']:.4f}), "
              f"ratio {m['policy/ratio_mean']:.4f}, grad norm {m['grad_norm']:.3g}")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    print("eval: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "step"))
    print(f"run folder: {run} (adapter in checkpoints/, clips in eval/samples/)")


if __name__ == "__main__":
    sys.exit(main())
