"""One Flow-GRPO step on the full-size Wan 2.1 T2V 1.3B transformer architecture (random weights):
time and peak memory. Meant for a GPU machine; nothing is downloaded (the weights are random,
the text embeddings too, since only speed and memory are measured).

    python benchmarks/video/wan_step.py --device cuda                 # 1.3B, 81 frames 480 x 832
    python benchmarks/video/wan_step.py --device cpu --layers 1 --frames 5 --height 64 --width 64  # smoke run

The step is the trainer's own: a rollout of G samples with the flow-sde law (``sample``), group
advantages of random rewards, and one optimizer step over the trained (sample, step) pairs
(``pair_losses``), micro-batch 1, LoRA rank 32 on the attention projections, the reference being
the disabled adapter (KL weight 0.04 so its forward pass is counted). Writes
benchmarks/results/video_wan_step_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from flowcoach.core.advantages import group_normalized
from flowcoach.core.config import TrainConfig
from flowcoach.core.nets.diffusers_wrapper import add_lora
from flowcoach.core.policy import FlowPolicy
from flowcoach.core.sampling.sampler import sample, time_grid
from flowcoach.core.trainer import pair_losses
from flowcoach.domains.video.pipeline import PipelineVelocity

ROOT = Path(__file__).resolve().parents[2]

# diffusers' Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
WAN_1P3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=WAN_1P3B["num_layers"])
    parser.add_argument("--frames", type=int, default=81, help="video frames (1 + 4k); latent frames = 1 + (frames - 1) / 4")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = {**WAN_1P3B, "num_layers": args.layers}
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel(**config).to(device, dtype)
    for name, module in transformer.named_modules():  # as from_pretrained(torch_dtype=...) keeps them
        if any(key in name.split(".") for key in transformer._keep_in_fp32_modules or []):
            module.to(torch.float32)
    params = sum(p.numel() for p in transformer.parameters())
    model = PipelineVelocity(transformer, lora_rank=0)  # casts inputs to the weights' dtype, returns float32
    add_lora(model.net, rank=32, alpha=64)
    transformer.enable_gradient_checkpointing()
    policy = FlowPolicy(model, need_reference=True)
    cfg = TrainConfig()
    cfg.loss.kl_beta = 0.04
    g = torch.Generator().manual_seed(0)
    shape = (16, 1 + (args.frames - 1) // 4, args.height // 8, args.width // 8)
    cond = {"encoder_hidden_states": torch.randn(args.group_size, args.text_tokens, 4096, generator=g).to(device, dtype)}
    mask = torch.ones(args.group_size, args.num_steps, dtype=torch.bool)
    mask[:, -1] = False

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    rollout = sample(model, torch.randn(args.group_size, *shape, generator=g).to(device), time_grid(args.num_steps, 3.0),
                     cond=cond, law="flow-sde", noise_level=0.7, stochastic=mask,
                     group_ids=torch.zeros(args.group_size, dtype=torch.long), generator=g)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sample_s = time.perf_counter() - start
    adv, _, _ = group_normalized(torch.randn(args.group_size, generator=g), rollout.group_ids)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-4)
    pairs = rollout.trained_pairs()
    start = time.perf_counter()
    for pair in pairs.split(1):  # micro-batch 1, gradients accumulated over every trained pair
        loss, _ = pair_losses(policy, rollout, pair.to(device), adv.to(device), cfg)
        (loss.sum() / len(pairs)).backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - start
    record = {
        "command": "python benchmarks/video/wan_step.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "transformer_parameters": params,
        "lora_parameters": sum(p.numel() for p in policy.trainable_parameters()),
        "latent_shape": list(shape),
        "group_size": args.group_size,
        "trained_pairs": len(pairs),
        "rollout_s": round(sample_s, 2),
        "update_s": round(train_s, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    out = ROOT / "benchmarks" / "results" / f"video_wan_step_{device.type}.json"
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
