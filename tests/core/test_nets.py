"""Backbones (MLP, set transformer, 1-D U-Net) and the diffusers wrapper with LoRA."""

from __future__ import annotations

import pytest
import torch

from flowcoach.core.nets.mlp import MLPVelocity
from flowcoach.core.nets.transformer import SetTransformerVelocity
from flowcoach.core.nets.unet1d import UNet1DVelocity

B = 3


def _set_transformer(positional=False, **kw):
    return SetTransformerVelocity(features=5, width=32, depth=2, heads=4, positional=positional, **kw)


def _unet(**kw):
    return UNet1DVelocity(channels=3, width=16, **kw)


# (name, builder(**cond_kwargs), example x shape)
BACKBONES = [
    ("mlp", lambda **kw: MLPVelocity(6, width=32, depth=2, **kw), (B, 6)),
    ("set", lambda **kw: _set_transformer(False, **kw), (B, 7, 5)),
    ("seq", lambda **kw: _set_transformer(True, **kw), (B, 7, 5)),
    ("unet", lambda **kw: _unet(**kw), (B, 3, 13)),
]
IDS = [b[0] for b in BACKBONES]


@pytest.mark.parametrize("name,build,shape", BACKBONES, ids=IDS)
def test_output_shape_and_finite(name, build, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    v = build()(x, torch.rand(B), None)
    assert v.shape == x.shape and torch.isfinite(v).all()


@pytest.mark.parametrize("length", [1, 2, 5, 7, 13, 16, 30])
def test_unet_any_length(length):
    torch.manual_seed(0)
    x = torch.randn(2, 3, length)
    v = _unet()(x, torch.rand(2))
    assert v.shape == x.shape and torch.isfinite(v).all()


@pytest.mark.parametrize("n", [1, 4, 9])
def test_set_transformer_any_size(n):
    torch.manual_seed(0)
    x = torch.randn(2, n, 5)
    assert _set_transformer(True)(x, torch.rand(2)).shape == x.shape


@pytest.mark.parametrize("name,build,shape", BACKBONES, ids=IDS)
@pytest.mark.parametrize("kind", ["classes", "vector"])
def test_condition_and_time_change_output(name, build, shape, kind):
    torch.manual_seed(0)
    net = build(cond_classes=4) if kind == "classes" else build(cond_dim=2)
    x, t = torch.randn(shape), torch.rand(B)
    c1, c2 = (torch.tensor([0, 1, 2]), torch.tensor([3, 3, 3])) if kind == "classes" else torch.randn(2, B, 2)
    v = net(x, t, c1)
    assert not torch.allclose(v, net(x, t, c2), atol=1e-4)
    assert not torch.allclose(v, net(x, 1 - t, c1), atol=1e-4)


@pytest.mark.parametrize("name,build,shape", BACKBONES, ids=IDS)
def test_gradient_reaches_every_parameter(name, build, shape):
    torch.manual_seed(0)
    net = build(cond_classes=4)
    net(torch.randn(shape), torch.rand(B), torch.tensor([0, 1, 3])).square().mean().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead


def test_set_transformer_permutation_equivariant_only_without_positions():
    torch.manual_seed(0)
    x, t, perm = torch.randn(B, 7, 5), torch.rand(B), torch.randperm(7)
    assert not torch.equal(perm, torch.arange(7))
    for positional in (False, True):
        net = _set_transformer(positional)
        v, v_perm = net(x, t), net(x[:, perm], t)
        equivariant = torch.allclose(v[:, perm], v_perm, atol=1e-5)
        assert equivariant is (not positional)


@pytest.mark.parametrize("positional", [False, True])
def test_set_transformer_mask_ignores_padding(positional):
    torch.manual_seed(0)
    net = _set_transformer(positional)
    x, t = torch.randn(2, 6, 5), torch.rand(2)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    v = net(x, t, mask=mask)
    x2 = x.clone()
    x2[0, 4:] = 100.0  # padding content must not matter
    v2 = net(x2, t, mask=mask)
    assert torch.allclose(v, v2, atol=1e-5)
    assert torch.equal(v[0, 4:], torch.zeros(2, 5))
    # padded sample 0 equals the same sample run alone without padding
    assert torch.allclose(v[0, :4], net(x[:1, :4], t[:1])[0], atol=1e-5)
    assert not torch.allclose(v[0, :4], net(x[:1], t[:1])[0, :4], atol=1e-4)


# ---- diffusers -------------------------------------------------------------------------------

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from flowcoach.core.nets.diffusers_wrapper import (  # noqa: E402
    DiffusersVelocity,
    add_lora,
    load_lora_state_dict,
    lora_state_dict,
)


def tiny_sd3():
    torch.manual_seed(0)
    net = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16,
    )
    x = torch.randn(2, 4, 8, 8)
    cond = {"encoder_hidden_states": torch.randn(2, 5, 16), "pooled_projections": torch.randn(2, 16)}
    return DiffusersVelocity(net), x, torch.tensor([0.3, 0.8]), cond


def tiny_wan():
    torch.manual_seed(0)
    net = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    x = torch.randn(2, 4, 3, 8, 8)  # odd frame count
    return DiffusersVelocity(net), x, torch.tensor([0.3, 0.8]), {"encoder_hidden_states": torch.randn(2, 5, 16)}


def tiny_flux():
    torch.manual_seed(0)
    net = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    )
    x = torch.randn(2, 16, 4)  # packed latents [B, seq, C]
    cond = {
        "encoder_hidden_states": torch.randn(2, 5, 32),
        "pooled_projections": torch.randn(2, 32),
        "img_ids": torch.randn(16, 3),
        "txt_ids": torch.randn(5, 3),
    }
    return DiffusersVelocity(net), x, torch.tensor([0.3, 0.8]), cond


@pytest.mark.parametrize("make,scale", [(tiny_sd3, 1000.0), (tiny_wan, 1000.0), (tiny_flux, 1.0)])
def test_diffusers_shape_and_timestep_convention(make, scale):
    model, x, t, cond = make()
    assert model.timestep_scale == scale
    v = model(x, t, cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    direct = model.transformer(hidden_states=x, timestep=t * scale, return_dict=False, **cond)[0]
    assert torch.equal(v, direct)
    assert not torch.allclose(v, model(x, t.flip(0), cond), atol=1e-5)
    other = {**cond, "encoder_hidden_states": torch.randn_like(cond["encoder_hidden_states"])}
    assert not torch.allclose(v, model(x, t, other), atol=1e-5)


def test_diffusers_unknown_class_needs_a_timestep_scale():
    with pytest.raises(ValueError, match="timestep_scale"):
        DiffusersVelocity(torch.nn.Linear(2, 2))
    assert DiffusersVelocity(torch.nn.Linear(2, 2), timestep_scale=1.0).timestep_scale == 1.0


def _lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def _perturb_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in _lora_params(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("make", [tiny_sd3, tiny_wan])
def test_add_lora_trains_only_lora_and_starts_at_base(make):
    model, x, t, cond = make()
    base = model(x, t, cond)
    n_base = sum(1 for _ in model.parameters())
    add_lora(model, rank=4, alpha=8)
    lora = _lora_params(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert lora and trainable == set(lora)
    assert len(list(model.parameters())) == n_base + len(lora)
    assert any(".to_q." in n for n in lora) and any(".to_out.0." in n for n in lora)
    if make is tiny_sd3:  # the joint-attention text projections are targeted where present
        assert any(".add_q_proj." in n for n in lora) and any(".to_add_out." in n for n in lora)
    assert torch.equal(model(x, t, cond), base)  # gaussian A, zero B


@pytest.mark.parametrize("make", [tiny_sd3, tiny_wan])
def test_disable_adapter_gives_the_base_model(make):
    model, x, t, cond = make()
    base = model(x, t, cond)
    add_lora(model, rank=4, alpha=8)
    _perturb_lora(model)
    tuned = model(x, t, cond)
    assert not torch.allclose(tuned, base, atol=1e-4)
    with model.disable_adapter():
        assert torch.equal(model(x, t, cond), base)
    assert torch.equal(model(x, t, cond), tuned)
    assert all(p.requires_grad for p in _lora_params(model).values())
    # flags set by the caller survive the block
    next(iter(_lora_params(model).values())).requires_grad_(False)
    with model.disable_adapter():
        pass
    assert [p.requires_grad for p in _lora_params(model).values()].count(False) == 1


def test_lora_state_dict_round_trip():
    model, x, t, cond = tiny_sd3()
    add_lora(model, rank=4, alpha=8)
    _perturb_lora(model)
    state = lora_state_dict(model)
    assert state and all("lora_" in k for k in state)
    assert len(state) == len(_lora_params(model))

    fresh, *_ = tiny_sd3()
    add_lora(fresh, rank=4, alpha=8)
    assert not torch.allclose(fresh(x, t, cond), model(x, t, cond), atol=1e-4)
    load_lora_state_dict(fresh, state)
    assert torch.equal(fresh(x, t, cond), model(x, t, cond))

    with pytest.raises(KeyError):
        load_lora_state_dict(fresh, {**state, "transformer_blocks.0.attn.to_q.lora_C.weight": torch.zeros(1)})
    with pytest.raises(KeyError):
        load_lora_state_dict(fresh, dict(list(state.items())[1:]))


def test_one_lora_step_on_wan_moves_only_lora():
    model, x0, _, cond = tiny_wan()
    add_lora(model, rank=4, alpha=8)
    _perturb_lora(model)  # as mid-training: with B = 0 the first step would leave A's gradient at zero
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in _lora_params(model).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    torch.manual_seed(1)
    eps, t = torch.randn_like(x0), torch.rand(x0.shape[0])
    tb = t.view(-1, 1, 1, 1, 1)
    loss = (model((1 - tb) * x0 + tb * eps, t, cond) - (eps - x0)).square().mean()
    loss.backward()
    opt.step()

    for n, p in model.named_parameters():
        if n in base_before:
            assert p.grad is None and torch.equal(p, base_before[n]), n
        else:
            assert not torch.equal(p, lora_before[n]), n
