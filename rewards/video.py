"""Rewards of the video domain, computed from the rendered frames of decoded clips.

A clip is uint8 frames [T, H, W, 3]; a condition is the scene and its initial state
(``flowcoach.domains.video.physics``), so the simulator gives every object's true centre at every
frame. Each reward is ``fn(clips, conditions) -> (scores [B], info)``:

- ``video-physics``: each object is found by its colour (soft colour mask -> coverage-weighted
  centroid per frame), its trajectory is compared with the simulator's; score exp(-RMSE / 2 px).
  A frame where the object is missing counts as MISSING_PX off. Optical flow does not catch a
  jittering object (Farneback's warping error absorbs it), hence this reward of its own.
- ``video-persistence``: one object of each colour in every frame (exactly one connected
  component, no blob of a colour the scene has not), and a stable size (area CV).
- ``video-flicker``: VBench's temporal-flickering formula, (255 - mean MAE of consecutive frames)
  / 255 on uint8, taken over background pixels (content of either frame, dilated, is left out,
  so motion is not counted as flicker), times ``presence``.
- ``video-warp``: warping error with OpenCV's Farneback flow (Lai et al. 2018): consecutive frames
  warped onto each other, squared error over non-occluded pixels (forward-backward check); score
  exp(-E / WARP_SCALE), times ``presence``.

Flicker and warping are gated by ``presence``, the share of frames in which every object of the
scene is there: an empty clip neither flickers nor warps, and a first RL run (ungated) turned every
clip black within 15 steps to collect those two terms (benchmarks/video/README.md).

A clip that is not a [T >= 2, H, W, 3] uint8 array, or a condition that names no scene, scores 0
and is counted in ``info["invalid"]``. Flicker and warping alone rate a frozen clip best; that is
why physics carries the largest weight, and why the evaluator reports dynamic degree.
"""

from __future__ import annotations

import numpy as np
import torch

from flowcoach.domains.video import physics

MISSING_PX = 8.0  # error charged for a frame where an object is not found
PHYSICS_SCALE = 2.0  # px: exp(-RMSE / scale)
MASK_LEVEL = 0.5  # coverage above which a pixel belongs to an object's mask
WEIGHT_LEVEL = 0.2  # coverage below this is ignored by the centroid (noise)
CONTENT_LEVEL = 60  # uint8: a pixel brighter than this (any channel) is scene content, not background
AREA_CV_SCALE = 0.25
WARP_SCALE = 0.01


# ----------------------------------------------------------------------------- frames
def valid_clip(clip) -> bool:
    return (isinstance(clip, np.ndarray) and clip.dtype == np.uint8 and clip.ndim == 4 and clip.shape[0] >= 2
            and clip.shape[3] == 3 and min(clip.shape[1:3]) >= 8)


def coverage(clip: np.ndarray, colour) -> np.ndarray:
    """How much of each pixel an object of ``colour`` covers, [T, H, W] in [0, 1], from the colour's
    excess of its dominant channel over the others (grey floor and rod have none)."""
    colour = np.asarray(colour, dtype=np.float32)
    c = int(np.argmax(colour))
    others = [k for k in range(3) if k != c]
    full = colour[c] - colour[others].max()
    f = clip.astype(np.float32) / 255.0
    return np.clip((f[..., c] - f[..., others].max(axis=-1)) / full, 0.0, 1.0)


def soft_centroids(cover: np.ndarray, min_area: float) -> np.ndarray:
    """Coverage-weighted centroid per frame [T, 2] (x, y) in pixels of the clip; NaN where the
    covered area is under ``min_area`` (the object is missing)."""
    h, w = cover.shape[1:]
    weights = np.where(cover >= WEIGHT_LEVEL, cover, 0.0)
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    area = weights.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (weights * xs).sum(axis=(1, 2)) / area
        cy = (weights * ys).sum(axis=(1, 2)) / area
    out = np.stack([cx, cy], axis=-1)
    out[area < min_area] = np.nan
    return out


def object_area(shape: str, scale: float = 1.0) -> float:
    """Expected area in pixels of the clip (scale = clip pixels per world pixel)."""
    return (np.pi * physics.RADIUS**2 if shape == "disc" else (2 * physics.HALF) ** 2) * scale**2


def trajectories(clip: np.ndarray, cond) -> list[np.ndarray]:
    """Extracted centre of each of the scene's objects, [T, 2] each, in world pixels (32 px frame)."""
    scene = physics.decode_condition(cond)
    scale = clip.shape[2] / physics.SIZE
    out = []
    for colour, shape in physics.OBJECTS[scene.name]:
        cover = coverage(clip, physics.COLOURS[colour])
        out.append(soft_centroids(cover, 0.25 * object_area(shape, scale)) / scale)
    return out


def trajectory_errors(clip: np.ndarray, cond, truth: np.ndarray | None = None) -> np.ndarray:
    """Per object and frame [K, T]: distance (world px) from the simulator's centre; MISSING_PX where
    missing. ``truth``: ``physics.simulate(cond, T)`` when already computed."""
    truth = physics.simulate(cond, clip.shape[0]) if truth is None else truth
    found = np.stack(trajectories(clip, cond))
    err = np.sqrt(((found - truth) ** 2).sum(axis=-1))
    return np.where(np.isfinite(err), np.minimum(err, MISSING_PX), MISSING_PX)


def simulated(clips: list, conditions: np.ndarray) -> list:
    """The simulator's trajectory for each (clip, condition), at the clip's frame count, computed
    for the whole batch at once; None where the clip or the condition is malformed."""
    out: list = [None] * len(clips)
    ok = {}
    for k, clip in enumerate(clips):
        try:
            if valid_clip(clip):
                physics.decode_condition(conditions[k])
                ok.setdefault(clip.shape[0], []).append(k)
        except ValueError:
            pass
    for frames, idx in ok.items():
        for k, traj in zip(idx, physics.simulate_batch(conditions[idx], frames)):
            out[k] = traj
    return out


def states(conditions) -> np.ndarray:
    """Physics condition vectors [B, COND_DIM] from a tensor, an array, or a dict carrying them as "state"
    (the pipeline domain's conditions)."""
    if isinstance(conditions, dict):
        conditions = conditions["state"]
    return torch.as_tensor(conditions).float().cpu().numpy()


def _batch(clips: list, conditions, score_fn, with_truth: bool = False) -> tuple[torch.Tensor, dict]:
    """Score each clip with ``score_fn(clip, cond)`` (``score_fn(clip, cond, truth)`` with_truth);
    malformed clips or conditions score 0 and are counted in info["invalid"]."""
    conditions = states(conditions) if conditions is not None else None
    truths = simulated(clips, conditions) if with_truth else None
    scores, invalid = [], 0
    for k, clip in enumerate(clips):
        try:
            if not valid_clip(clip) or (with_truth and truths[k] is None):
                raise ValueError("not a clip, or a condition that names no scene")
            cond = None if conditions is None else conditions[k]
            scores.append(float(score_fn(clip, cond, truths[k]) if with_truth else score_fn(clip, cond)))
        except ValueError:  # a malformed clip or condition: scored 0, counted
            scores.append(0.0)
            invalid += 1
    scores = torch.tensor(scores, dtype=torch.float32)
    return scores, {"invalid": invalid, "mean": float(scores.mean()) if len(scores) else 0.0}


# ----------------------------------------------------------------------------- rewards
def physics_score(clip: np.ndarray, cond, truth: np.ndarray | None = None) -> float:
    err = trajectory_errors(clip, cond, truth)
    return float(np.exp(-np.sqrt((err**2).mean()) / PHYSICS_SCALE))


def physics_reward(clips: list, conditions) -> tuple[torch.Tensor, dict]:
    scores, info = _batch(clips, conditions, physics_score, with_truth=True)
    rmse = [float(-PHYSICS_SCALE * np.log(s)) for s in scores.tolist() if s > 0]
    info["rmse_px"] = float(np.mean(rmse)) if rmse else float("nan")
    return scores, info


def _components(mask: np.ndarray) -> int:
    """Number of 8-connected components of at least 2 pixels (a lone pixel is noise, not an object)."""
    import cv2

    _, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return int((stats[1:, cv2.CC_STAT_AREA] >= 2).sum())


def persistence_score(clip: np.ndarray, cond) -> float:
    """Share of frames where each object is exactly one blob and no foreign-coloured blob exists,
    times exp(-CV / 0.25) of each object's (soft) area over the frames."""
    scene = physics.decode_condition(cond)
    present = {c for c, _ in physics.OBJECTS[scene.name]}
    good = np.ones(clip.shape[0], dtype=bool)
    size_terms = []
    for colour, rgb in physics.COLOURS.items():
        cover = coverage(clip, rgb)
        counts = np.array([_components(cover[f] >= MASK_LEVEL) for f in range(clip.shape[0])])
        if colour in present:
            good &= counts == 1
            area = cover.sum(axis=(1, 2), dtype=np.float64)  # soft area: exact for anti-aliased shapes
            cv = area.std() / area.mean() if area.mean() > 0 else 1e3
            size_terms.append(np.exp(-cv / AREA_CV_SCALE))
        else:
            good &= counts == 0
    return float(good.mean() * np.prod(size_terms))


def persistence_reward(clips: list, conditions) -> tuple[torch.Tensor, dict]:
    return _batch(clips, conditions, persistence_score)


def background_mask(clip: np.ndarray) -> np.ndarray:
    """[T-1, H, W] bool: pixels that are background in both frames of each consecutive pair
    (content, i.e. any channel over CONTENT_LEVEL, dilated by one pixel, is left out)."""
    import cv2

    content = (clip.max(axis=-1) > CONTENT_LEVEL).astype(np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    content = np.stack([cv2.dilate(c, kernel) for c in content]).astype(bool)
    return ~(content[:-1] | content[1:])


def flicker_score(clip: np.ndarray, cond=None) -> float:
    """VBench temporal flickering, (255 - mean MAE) / 255, on background pixels; 1 = no flicker."""
    diff = np.abs(clip[1:].astype(np.float32) - clip[:-1].astype(np.float32)).mean(axis=-1)  # [T-1, H, W]
    bg = background_mask(clip)
    if not bg.any():
        return 0.0  # no background left: every pixel is content in some frame
    return float((255.0 - diff[bg].mean()) / 255.0)


def presence(clip: np.ndarray, cond) -> float:
    """Share of frames in which every object of the scene is there (covering at least a quarter of
    its area, the physics reward's own test for a missing object)."""
    scene = physics.decode_condition(cond)
    scale = clip.shape[2] / physics.SIZE
    there = np.ones(clip.shape[0], dtype=bool)
    for colour, shape in physics.OBJECTS[scene.name]:
        area = coverage(clip, physics.COLOURS[colour]).sum(axis=(1, 2))
        there &= area >= 0.25 * object_area(shape, scale)
    return float(there.mean())


def flicker_reward(clips: list, conditions) -> tuple[torch.Tensor, dict]:
    # gated by presence: an empty clip never flickers, and RL found that at once (see the benchmark)
    return _batch(clips, conditions, lambda clip, cond: presence(clip, cond) * flicker_score(clip))


def farneback(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense flow [H, W, 2] from grey frame a to b (uint8), OpenCV Farneback with small windows."""
    import cv2

    return cv2.calcOpticalFlowFarneback(a, b, None, pyr_scale=0.5, levels=2, winsize=7, iterations=3, poly_n=5,
                                        poly_sigma=1.1, flags=0)


def _grey(clip: np.ndarray) -> np.ndarray:
    import cv2

    return np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in clip])


def _warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """image sampled at p + flow(p) (bilinear, border replicated)."""
    import cv2

    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(image, gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def warping_error(clip: np.ndarray) -> float:
    """Lai et al.'s E = mean_t sum_i M_t(i) |V_t(i) - W(V_{t+1})(i)|^2 / sum_i M_t(i), frames in [0, 1]
    (RGB, squared error summed over channels), Farneback flow, M = forward-backward consistent pixels."""
    grey = _grey(clip)
    frames = clip.astype(np.float32) / 255.0
    errors = []
    for t in range(clip.shape[0] - 1):
        fwd = farneback(grey[t], grey[t + 1])
        bwd = farneback(grey[t + 1], grey[t])
        bwd_at = _warp(bwd, fwd)  # backward flow at the forward-flow target
        gap = ((fwd + bwd_at) ** 2).sum(-1)
        mask = gap < 0.01 * ((fwd**2).sum(-1) + (bwd_at**2).sum(-1)) + 0.5  # Sundaram et al.'s check
        warped = _warp(frames[t + 1], fwd)
        sq = ((frames[t] - warped) ** 2).sum(-1)
        errors.append(float((sq * mask).sum() / max(mask.sum(), 1)))
    return float(np.mean(errors))


def warp_score(clip: np.ndarray, cond=None) -> float:
    return float(np.exp(-warping_error(clip) / WARP_SCALE))


def warp_reward(clips: list, conditions) -> tuple[torch.Tensor, dict]:
    return _batch(clips, conditions, lambda clip, cond: presence(clip, cond) * warp_score(clip))
