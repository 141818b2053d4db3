"""The video domain: the simulator against closed forms, trajectory extraction on known paths, every
reward on clean / jittery / frozen clips and on malformed input, the evaluator on hand-checked clips,
the model's LoRA contract, check_domain, one RL step through the trainer on the tiny Wan model and on
a tiny random WanPipeline (only LoRA weights change), and the shipped base against its figures.
"""

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("cv2")

from safetensors.torch import load_file  # noqa: E402

from flowcoach.core.algorithms import algorithm_defaults  # noqa: E402
from flowcoach.core.checkpoint import list_checkpoints, load_base, save_base  # noqa: E402
from flowcoach.core.domain import check_domain  # noqa: E402
from flowcoach.core.trainer import evaluate_model, train  # noqa: E402
from flowcoach.domains.video import VideoDomain, decode_clips, physics, to_pixels  # noqa: E402
from flowcoach.domains.video.evaluate import diversity, dynamic, evaluate_clips, mask_consistency  # noqa: E402
from flowcoach.rewards import build_reward  # noqa: E402
from flowcoach.rewards import video as R  # noqa: E402


def u8(clip):
    return (np.clip(clip, 0, 1) * 255).round().astype(np.uint8)


def cond_of(scene, **params):
    return physics.encode_condition(scene, params)


SCENE_CONDS = [
    cond_of("bounce", x0=12.0, y0=6.0, vx=0.7),
    cond_of("pendulum", length=18.0, theta0=-50.0),
    cond_of("collision", y=16.0, x1=7.0, x2=25.0, v1=1.2, v2=-0.9),
    cond_of("slide", x0=6.0, v0=1.6),
]


# ----------------------------------------------------------------------------- simulator
def test_condition_round_trip_and_bad_conditions():
    for c in physics.random_conditions(8, np.random.default_rng(0)):
        scene = physics.decode_condition(c)
        np.testing.assert_allclose(physics.encode_condition(scene.name, scene.params), c, atol=1e-6)
    with pytest.raises(ValueError):
        physics.decode_condition(np.zeros(physics.COND_DIM))  # no scene
    with pytest.raises(ValueError):
        physics.decode_condition(np.full(physics.COND_DIM, np.nan))


def test_free_fall_and_bounce_follow_the_laws():
    x0, y0, vx = 12.0, 6.0, 0.5
    traj = physics.simulate(cond_of("bounce", x0=x0, y0=y0, vx=vx), frames=151)[0]  # dt = 0.1 frame
    t = np.linspace(0, physics.FRAMES - 1, 151)
    bottom = physics.FLOOR - physics.RADIUS
    t_hit = math.sqrt(2 * (bottom - y0) / physics.GRAVITY)
    before = t < t_hit - 0.1
    np.testing.assert_allclose(traj[before, 1], y0 + 0.5 * physics.GRAVITY * t[before] ** 2, atol=1e-9)
    np.testing.assert_allclose(traj[:, 0], x0 + vx * t, atol=1e-6)  # no wall reached: uniform in x
    # after the bounce: the same law from the floor, upwards at RESTITUTION of the impact speed
    after = t > t_hit + 0.1
    up = physics.RESTITUTION * physics.GRAVITY * t_hit
    s = t[after] - t_hit
    np.testing.assert_allclose(traj[after, 1], bottom - up * s + 0.5 * physics.GRAVITY * s**2, atol=0.05)
    assert traj[:, 1].max() <= bottom + 1e-9


def test_pendulum_keeps_its_length_and_its_exact_period():
    from scipy.special import ellipk

    length, theta0 = 18.0, 50.0
    traj = physics.simulate(cond_of("pendulum", length=length, theta0=theta0), frames=1501)[0]  # dt = 0.01
    t = np.linspace(0, physics.FRAMES - 1, 1501)
    np.testing.assert_allclose(np.hypot(traj[:, 0] - physics.PIVOT[0], traj[:, 1] - physics.PIVOT[1]), length, atol=1e-9)
    # first pass under the pivot = a quarter of the nonlinear period 4 sqrt(L/g) K(sin^2(theta0/2))
    quarter = math.sqrt(length / physics.PENDULUM_G) * ellipk(math.sin(math.radians(theta0) / 2) ** 2)
    crossing = t[np.argmax(traj[:, 0] < physics.PIVOT[0])]
    assert abs(crossing - quarter) < 0.02


def test_collision_conserves_momentum_and_swaps_velocities():
    traj = physics.simulate(cond_of("collision", y=16.0, x1=8.0, x2=20.0, v1=1.0, v2=-0.5), frames=151)
    t = np.linspace(0, physics.FRAMES - 1, 151)
    v = np.diff(traj[:, :, 0], axis=1) / np.diff(t)
    # contact when the gap 12 - 5 closes at 1.5 px / frame: t = 4.67; ball 1 then moves at -0.5, ball 2 at +1.0
    contact = (20.0 - 8.0 - 2 * physics.RADIUS) / 1.5
    early, late = t[1:] < contact - 0.1, (t[1:] > contact + 0.1) & (t[1:] < contact + 3)
    np.testing.assert_allclose(v[0, early], 1.0, atol=1e-6)
    np.testing.assert_allclose(v[0, late], -0.5, atol=1e-6)
    np.testing.assert_allclose(v[1, late], 1.0, atol=1e-6)
    np.testing.assert_allclose(v[0, early | late] + v[1, early | late], 0.5, atol=1e-6)  # equal masses


def test_slide_stops_where_friction_says():
    x0, v0 = 6.0, 1.6
    traj = physics.simulate(cond_of("slide", x0=x0, v0=v0))[0]
    assert abs(traj[-1, 0] - (x0 + v0**2 / (2 * physics.FRICTION))) < 1e-5  # the condition is float32
    assert np.all(np.diff(traj[:, 0]) >= 0)


# ----------------------------------------------------------------------------- extraction and rewards
@pytest.mark.parametrize("size", [32, 64])
def test_trajectory_extraction_recovers_a_known_trajectory(size):
    rng = np.random.default_rng(3)
    cond = cond_of("collision", y=16.0, x1=7.0, x2=25.0, v1=1.2, v2=-0.9)
    t = np.arange(physics.FRAMES)
    known = np.stack([  # two arbitrary smooth paths, not the simulator's
        np.stack([8 + 6 * np.sin(t / 4), 10 + 0.5 * t], -1),
        np.stack([24 - 0.3 * t, 20 + 3 * np.cos(t / 3)], -1),
    ]) + rng.uniform(-0.5, 0.5, (2, 1, 2))
    clip = u8(physics.render(cond, size=size, trajectory=known))
    found = np.stack(R.trajectories(clip, cond))
    assert np.abs(found - known).max() < 0.1


def clean_jittery_frozen(cond, seed=0):
    rng = np.random.default_rng(seed)
    traj = physics.simulate(cond)
    clean = u8(physics.render(cond))
    # jitter: the object shakes about its path (1.5 px) and the frame brightness flickers
    shaken = physics.render(cond, trajectory=traj + rng.normal(0, 1.5, traj.shape))
    jittery = u8(shaken + rng.uniform(0.0, 0.12, (physics.FRAMES, 1, 1, 1)))
    frozen = np.repeat(clean[:1], physics.FRAMES, axis=0)
    return clean, jittery, frozen


@pytest.mark.parametrize("cond", SCENE_CONDS, ids=physics.SCENES)
def test_each_reward_orders_clean_jittery_frozen(cond):
    clean, jittery, frozen = clean_jittery_frozen(cond)
    score = {name: fn([clean, jittery, frozen], np.stack([cond] * 3))[0].tolist()
             for name, fn in [("physics", R.physics_reward), ("persistence", R.persistence_reward),
                              ("flicker", R.flicker_reward), ("warp", R.warp_reward)]}
    c, j, f = score["physics"]
    assert c > 0.9 and c > j > f  # the frozen object is far from where the law puts it
    for name in ("persistence", "flicker", "warp"):
        c, j, f = score[name]
        assert c > j, name
        # frame-to-frame rewards cannot see that a still clip breaks the law: they rate it as
        # clean at least (hence physics' weight, and dynamic degree in the evaluator)
        assert f >= c - 0.02, name
    total = build_reward(VideoDomain().default_rewards())([clean, jittery, frozen], np.stack([cond] * 3))[0]
    assert total[0] > total[1] and total[0] > total[2]


def test_flicker_and_warping_error_match_closed_forms():
    # a flat grey clip whose level alternates by d: Farneback sees no motion on a flat image, so the
    # warped next frame is the next frame itself and E = 3 d^2 (3 channels); flicker = (255 - 255 d) / 255
    d = 8 / 255
    levels = np.where(np.arange(physics.FRAMES) % 2, 24, 16).astype(np.uint8)
    clip = np.broadcast_to(levels[:, None, None, None], (physics.FRAMES, 32, 32, 3)).copy()
    assert abs(R.warping_error(clip) - 3 * d**2) < 1e-6
    assert abs(R.flicker_score(clip) - (255 - 8) / 255) < 1e-6


def test_invalid_clips_and_conditions_score_zero_and_are_counted():
    good = u8(physics.render(SCENE_CONDS[0]))
    objects = [good, good.astype(np.float32), good[:1], np.zeros((16, 32, 32), np.uint8), None, good]
    conds = np.stack([SCENE_CONDS[0]] * 5 + [np.zeros(physics.COND_DIM, np.float32)])
    for name in ("video-physics", "video-persistence", "video-flicker", "video-warp"):
        scores, info = build_reward({name: 1.0})(objects, conds)
        assert torch.isfinite(scores).all() and scores[0] > 0
        assert torch.all(scores[1:5] == 0), name
        if name in ("video-physics", "video-persistence"):  # these read the condition
            assert scores[5] == 0 and info[f"{name}/invalid"] == 5
    blank = np.zeros((16, 32, 32, 3), np.uint8)  # a valid clip with nothing in it: physics charges every frame
    assert abs(R.physics_score(blank, SCENE_CONDS[0]) - math.exp(-R.MISSING_PX / R.PHYSICS_SCALE)) < 1e-9


def test_an_empty_clip_earns_no_temporal_consistency():
    # an ungated RL run turned every clip black: it neither flickers nor warps, but shows nothing
    cond = SCENE_CONDS[0]
    blank = np.zeros((16, 32, 32, 3), np.uint8)
    assert R.flicker_score(blank) == 1.0 and R.warp_score(blank) == 1.0  # the ungated formulas
    conds = np.stack([cond] * 2)
    clean = u8(physics.render(cond))
    half = clean.copy()
    half[8:] = 0  # the ball is gone for the last 8 frames
    assert R.presence(clean, cond) == 1.0 and R.presence(half, cond) == 0.5 and R.presence(blank, cond) == 0.0
    for fn in (R.flicker_reward, R.warp_reward):
        scores = fn([clean, blank], conds)[0]
        assert scores[1] == 0.0 and scores[0] > 0.8


# ----------------------------------------------------------------------------- evaluator
def test_evaluator_on_ground_truth_frozen_and_broken_clips():
    conds = np.repeat(np.stack(SCENE_CONDS), 2, axis=0)
    clean = [u8(physics.render(c)) for c in conds]
    m = evaluate_clips(clean, conds)
    assert m["physics_pass_rate"] == 1.0 and m["trajectory_rmse_px"] < 0.3 and m["invalid_rate"] == 0.0
    assert m["dynamic_degree"] == 1.0 and m["diversity_pixel"] == 0.0 and m["diversity_trajectory_px"] == 0.0
    frozen = [np.repeat(c[:1], 16, axis=0) for c in clean]
    mf = evaluate_clips(frozen, conds)
    assert mf["physics_pass_rate"] == 0.0 and mf["dynamic_degree"] == 0.0
    assert mf["flicker"] >= m["flicker"] and mf["warping_error"] <= m["warping_error"]  # what dynamic degree is for
    broken = [c.copy() for c in clean]
    broken[0][5:] = 0  # the ball vanishes after frame 5
    mb = evaluate_clips(broken + [None], np.concatenate([conds, conds[:1]]))
    assert mb["physics_pass_rate"] == pytest.approx(7 / 9) and mb["invalid_rate"] == pytest.approx(1 / 9)


def test_mask_consistency_and_diversity_hand_checked():
    square = np.zeros((3, 12, 12), bool)
    square[:, 2:6, 2:6] = True  # 4 x 4, still
    cents = np.full((3, 2), 4.0)
    assert mask_consistency(square, cents) == 1.0
    grown = square.copy()
    grown[2, 2:8, 2:8] = True  # frame 2 is 6 x 6: IoU 16/36 with frames 0 and 1
    assert mask_consistency(grown, cents) == pytest.approx(0.5 * (1.0 + 0.5 * (16 / 36 + 16 / 36)))
    a = np.zeros((2, 8, 8, 3), np.uint8)
    b = a.copy()
    b[:, :4] = 51  # half the pixels differ by 0.2: pixel RMSE = sqrt(0.5 * 0.04)
    cond = np.stack([SCENE_CONDS[0]] * 2)
    per_clip = [{"track": np.zeros((1, 2, 2))}, {"track": np.ones((1, 2, 2))}]
    pixel, track = diversity([a, b], per_clip, cond)
    assert pixel == pytest.approx(math.sqrt(0.02), rel=1e-5) and track == pytest.approx(math.sqrt(2))


def test_dynamic_degree_needs_enough_moving_pairs():
    cond = SCENE_CONDS[0]
    clip = u8(physics.render(cond))
    assert dynamic(clip)
    still = clip.copy()
    still[3:] = clip[3]  # only 3 moving pairs of 15 (4 needed at 16 frames)
    assert not dynamic(still)


# ----------------------------------------------------------------------------- model and domain
def tiny_domain(**kw):
    return VideoDomain(train_size=64, heldout_size=16, width=32, layers=1, lora_rank=4, **kw)


def test_lora_is_added_on_loading_a_base_and_starts_at_it(tmp_path):
    domain = tiny_domain()
    torch.manual_seed(0)
    plain = domain.build_model(**domain.model_config())
    assert not plain.has_adapter and all(p.requires_grad for p in plain.parameters())  # pretraining trains all
    save_base(plain, domain.name, domain.model_config(), {}, tmp_path / "base")
    policy, _ = load_base(domain, tmp_path / "base")
    assert policy.has_adapter
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    x, cond = torch.randn(2, *domain.sample_shape), torch.from_numpy(np.stack(SCENE_CONDS[:2]))
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        assert torch.allclose(policy(x, t, cond), plain(x, t, cond), atol=1e-6)  # B = 0
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        assert not torch.allclose(policy(x, t, cond), plain(x, t, cond), atol=1e-4)
        with policy.disable_adapter():
            assert torch.allclose(policy(x, t, cond), plain(x, t, cond), atol=1e-6)


def test_decode_to_pixels_round_trip_and_save(tmp_path):
    clips = np.stack([physics.render(c) for c in SCENE_CONDS])
    frames = decode_clips(to_pixels(clips))
    assert frames[0].dtype == np.uint8 and frames[0].shape == (16, 32, 32, 3)
    assert np.abs(frames[2].astype(int) - u8(clips[2]).astype(int)).max() <= 1
    diverged = to_pixels(clips[:2].astype(np.float32))
    diverged[1, 0, 3, 5, 7] = float("nan")  # one NaN makes the sample invalid, not a black clip
    decoded = decode_clips(diverged)
    assert decoded[0] is not None and decoded[1] is None
    conds = np.stack(SCENE_CONDS[:2])
    scores, info = build_reward(VideoDomain().default_rewards())(decoded, conds)
    assert scores[1] == 0.0 and scores[0] > 0.0 and info["video-physics/invalid"] == 1
    assert VideoDomain().evaluate(decoded, conds)["invalid_rate"] == 0.5
    files = VideoDomain().save(frames, torch.arange(4.0), tmp_path)
    names = {f.name for f in files}
    assert {"samples.gif", "clips.npy", "rewards.json"} <= names
    import imageio.v2 as imageio

    assert len(imageio.mimread(tmp_path / "samples.gif")) == 16


def test_check_domain_passes():
    passed = check_domain(tiny_domain())
    assert "reward is finite on random samples" in passed and "evaluate returns a dict of floats" in passed


def _changed_only_lora(run_dir):
    ckpt = list_checkpoints(run_dir)[-1]
    trained = load_file(ckpt / "trainable.safetensors")
    assert trained and all("lora_" in k for k in trained)
    return trained


def test_one_rl_step_through_the_trainer_changes_only_lora(tmp_path):
    domain = tiny_domain()
    torch.manual_seed(0)
    plain = domain.build_model(**domain.model_config())
    save_base(plain, domain.name, domain.model_config(), {}, tmp_path / "base")
    cfg = algorithm_defaults("flow-grpo")
    for k, v in {"steps": 1, "groups_per_step": 2, "group_size": 4, "micro_batch": 64, "eval_samples": 8,
                 "tensorboard": False, "output_dir": str(tmp_path / "runs"), "base": str(tmp_path / "base"),
                 "device": "cpu", "sample_every": 1}.items():
        setattr(cfg, k, v)
    cfg.sampler.num_steps, cfg.sampler.eval_num_steps = 4, 4
    cfg.optim.lr = 1e-2
    run = train(cfg, domain)
    policy, _ = load_base(domain, tmp_path / "base")
    own = dict(policy.named_parameters())
    trained = _changed_only_lora(run)
    lora_b = [k for k in trained if "lora_B" in k]
    assert any(not torch.equal(trained[k], torch.zeros_like(trained[k])) for k in lora_b)  # B moved off 0
    assert set(trained) == {n for n, p in own.items() if p.requires_grad}
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["policy/ratio_mean"] == 1.0 and "eval/dynamic_degree" in line and "reward/video-physics" in line
    assert (run / "samples" / "step-1" / "samples.gif").exists()


def test_one_rl_step_on_a_tiny_wan_pipeline_changes_only_lora(tmp_path):
    pytest.importorskip("transformers")
    from flowcoach.domains.video.pipeline import PipelineVideoDomain, tiny_wan_pipeline

    pipe = tiny_wan_pipeline()
    domain = PipelineVideoDomain(pipeline=pipe, lora_rank=4, data_size=4, base_dir=str(tmp_path / "base"))
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    assert "base checkpoint loads" in check_domain(domain, batch=2)
    cfg = algorithm_defaults("flow-grpo")
    for k, v in {"steps": 1, "groups_per_step": 1, "group_size": 2, "micro_batch": 16, "eval_samples": 2,
                 "tensorboard": False, "output_dir": str(tmp_path / "runs"), "device": "cpu"}.items():
        setattr(cfg, k, v)
    cfg.sampler.num_steps, cfg.sampler.eval_num_steps = 3, 3
    cfg.optim.lr = 1e-2
    run = train(cfg, domain)
    trained = _changed_only_lora(run)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in trained.items() if "lora_B" in k)
    for k, v in pipe.transformer.state_dict().items():  # the pipeline's own weights never move
        assert torch.equal(v, before[k]), k
    assert json.loads((run / "eval" / "metrics.json").read_text())["invalid_rate"] == 0.0
    latents = domain.data("train")[0][:2].clone()
    latents[1].view(-1)[0] = float("inf")  # a diverged latent decodes to None through the VAE too
    decoded = domain.decode(latents)
    assert decoded[0] is not None and decoded[1] is None


# ----------------------------------------------------------------------------- the shipped base
@pytest.fixture(scope="module")
def shipped():
    domain = VideoDomain()
    if domain.base_checkpoint() is None:
        pytest.skip("no shipped base")
    model, record = load_base(domain)
    return domain, model.eval(), record


def test_shipped_base_loads_and_is_what_base_json_says(shipped):
    domain, model, record = shipped
    assert record["config"]["domain"] == "video" and record["eval"]["num_samples"] >= 200
    assert record["command"].startswith("flowcoach pretrain video")
    for key, value in domain.pretrain_defaults().items():  # the defaults remake this base
        assert record["config"][key] == value, key
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == 366_592 and model.has_adapter  # the whole base, under a LoRA adapter


@pytest.mark.slow
def test_shipped_base_reproduces_its_recorded_figures(shipped):
    domain, model, record = shipped
    rec = record["eval"]
    metrics, _, _ = evaluate_model(model, domain, rec["num_samples"], rec["num_steps"], seed=rec["seed"])
    for key, value in rec["metrics"].items():
        if key == "reward_mean":  # recorded before flicker and warp were gated by presence
            continue
        assert metrics[key] == pytest.approx(value, abs=0.02), key


def test_cli_train_applies_the_domain_defaults(tmp_path):
    import yaml

    from flowcoach.core.cli import main

    domain = tiny_domain()
    torch.manual_seed(0)
    save_base(domain.build_model(**domain.model_config()), "video", domain.model_config(), {}, tmp_path / "base")
    code = main(["train", "video", "--steps", "1", "--base", str(tmp_path / "base"), "--groups-per-step", "1",
                 "--group-size", "2", "--eval-samples", "4", "--sampler.eval-num-steps", "4", "--output-dir",
                 str(tmp_path / "runs"), "--no-tensorboard", "--device", "cpu"])
    assert code == 0
    run = next((tmp_path / "runs").iterdir())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["sampler"]["sde_window_size"] == 3 and cfg["sampler"]["sde_window_range"] == [0, 5]
    assert cfg["optim"]["lr"] == 1e-3 and cfg["group_size"] == 2  # the user's flag over the domain's
    assert (run / "eval" / "samples" / "samples.gif").exists()


@pytest.mark.slow
def test_video_pipeline_example_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "video_pipeline.py"
    out = subprocess.run([sys.executable, str(example), str(tmp_path)], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 2: reward" in out.stdout and "physics_pass_rate" in out.stdout
