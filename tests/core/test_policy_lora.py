"""FlowPolicy on a tiny diffusers transformer with LoRA: reference = disabled adapter, and one RL
update through the trainer's own functions changes only the adapter."""

import torch

from flowcoach.core.advantages import group_normalized
from flowcoach.core.config import TrainConfig
from flowcoach.core.nets.diffusers_wrapper import DiffusersVelocity, add_lora
from flowcoach.core.nets.mlp import MLPVelocity
from flowcoach.core.policy import FlowPolicy, has_adapter
from flowcoach.core.sampling.sampler import sample, time_grid
from flowcoach.core.trainer import pair_losses


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return DiffusersVelocity(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16))


def test_reference_is_the_disabled_adapter_without_a_copy():
    model = tiny_sd3()
    assert not has_adapter(model)
    add_lora(model, rank=4, alpha=8)
    assert has_adapter(model)
    policy = FlowPolicy(model, need_reference=True)
    assert policy.ref_model is None  # no second copy of the weights
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.7, 0.3])
    cond = {"encoder_hidden_states": torch.randn(2, 5, 16, generator=g), "pooled_projections": torch.randn(2, 16, generator=g)}
    base = policy.velocity(x, t, cond).detach()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=g)
    assert not torch.equal(policy.velocity(x, t, cond), base)
    assert torch.equal(policy.reference_velocity(x, t, cond), base)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_small_nets_get_a_frozen_copy_as_reference():
    model = MLPVelocity(dim=2, width=16, depth=1)
    policy = FlowPolicy(model, need_reference=True)
    assert policy.ref_model is not None and not any(p.requires_grad for p in policy.ref_model.parameters())
    assert FlowPolicy(model).ref_model is None  # only built when the KL needs it


def test_one_rl_update_on_a_lora_diffusers_model_changes_only_the_adapter():
    model = add_lora(tiny_sd3(), rank=4, alpha=8)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # mid-training state: B != 0, so A gets a gradient too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=g)
    policy = FlowPolicy(model, need_reference=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cond = {"encoder_hidden_states": torch.randn(4, 5, 16, generator=g), "pooled_projections": torch.randn(4, 16, generator=g)}
    rollout = sample(model, torch.randn(4, 4, 8, 8, generator=g), time_grid(4, shift=3.0), cond=cond, law="flow-sde",
                     noise_level=0.7, group_ids=torch.tensor([0, 0, 1, 1]), generator=g)
    adv, _, _ = group_normalized(torch.tensor([1.0, 0.0, 0.3, 0.9]), rollout.group_ids)
    cfg = TrainConfig()
    cfg.loss.kl_beta = 0.04
    loss, info = pair_losses(policy, rollout, rollout.trained_pairs(), adv, cfg)
    assert torch.equal(info["ratio"], torch.ones_like(info["ratio"]))
    assert torch.all(info["kl"] > 0)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3)
    loss.mean().backward()
    optimizer.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == ("lora_" in name), name
