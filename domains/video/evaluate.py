"""Held-out evaluator of generated physics clips (not the training reward, so reward hacking shows).

- physics pass rate: every object of the scene is exactly one blob (binary colour mask, OpenCV
  connected components) in every frame, the blob centroids' RMSE to the simulator is under PASS_RMSE_PX
  (one pixel of the 32 px frame) and no frame is off by more than PASS_MAX_PX (the ball's radius).
  Extraction differs from the reward's (binary components, not soft coverage-weighted centroids).
  Also per scene (``physics_pass/<scene>``).
- trajectory error: mean and median RMSE (px) of those centroids; a frame without the object counts
  as MISSING_PX off.
- flicker: VBench's temporal-flickering formula on background pixels (as the reward computes it).
- subject consistency on masks: VBench's formula with mask IoU in place of DINO cosine: for t >= 1,
  1/2 [IoU(m_t, m_{t-1}) + IoU(m_t, m_0)], averaged, where m_t is the object's mask cropped around
  its centroid (so motion does not count, shape and size changes do).
- warping error: Lai et al.'s E with Farneback flow (lower is better).
- dynamic degree: VBench's rule with Farneback flow in place of RAFT: per frame pair the mean of the
  top 5% flow magnitudes; a clip is dynamic when at least round(4 T / 16) pairs exceed
  6 * min(H, W) / 256 pixels. It catches a model that stops moving (flicker and warping alone
  would rate a frozen clip best).
- diversity within a group: mean pairwise pixel RMSE (frames in [0, 1]) and mean pairwise
  trajectory distance (px) among clips of the same condition (consecutive equal rows).
The scenes are deterministic given the condition, so a perfect model's trajectory diversity is 0:
its pixel diversity shows how much the samples of a condition still differ.
"""

from __future__ import annotations

import numpy as np

from flowcoach.domains.video import physics
from flowcoach.rewards.video import (
    MASK_LEVEL,
    MISSING_PX,
    coverage,
    farneback,
    flicker_score,
    simulated,
    states,
    warping_error,
)

PASS_RMSE_PX = 1.0
PASS_MAX_PX = physics.RADIUS
CROP = 4  # half size of the centroid-centred crop for mask consistency (a 9 x 9 window)


def blob_track(clip: np.ndarray, colour) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centroids [T, 2] in clip pixels, NaN where not exactly one blob; one-blob flags [T]; masks [T, H, W])."""
    import cv2

    masks = coverage(clip, colour) >= MASK_LEVEL
    cents = np.full((clip.shape[0], 2), np.nan)
    single = np.zeros(clip.shape[0], dtype=bool)
    for t, m in enumerate(masks):
        n, _, stats, cent = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
        keep = [k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] >= 2]
        if len(keep) == 1:
            single[t] = True
            cents[t] = cent[keep[0]] + 0.5  # OpenCV's centroid is in pixel-index units; centres are at k + 0.5
    return cents, single, masks


def _crop(mask: np.ndarray, centre) -> np.ndarray:
    padded = np.pad(mask, CROP + 1)
    cx, cy = int(np.floor(centre[0])) + CROP + 1, int(np.floor(centre[1])) + CROP + 1
    return padded[cy - CROP: cy + CROP + 1, cx - CROP: cx + CROP + 1]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def mask_consistency(masks: np.ndarray, cents: np.ndarray) -> float:
    """VBench subject-consistency formula on centroid-centred mask crops; 0 where the object is lost."""
    crops = [_crop(m, c) if np.isfinite(c).all() else None for m, c in zip(masks, cents)]
    if crops[0] is None:
        return 0.0
    scores = []
    for t in range(1, len(crops)):
        if crops[t] is None or crops[t - 1] is None:
            scores.append(0.0)
            continue
        scores.append(0.5 * (_iou(crops[t], crops[t - 1]) + _iou(crops[t], crops[0])))
    return float(np.mean(scores))


def dynamic(clip: np.ndarray) -> bool:
    """VBench's dynamic-degree rule (Farneback flow for RAFT)."""
    import cv2

    grey = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in clip])
    threshold = 6.0 * min(clip.shape[1:3]) / 256.0
    need = max(1, round(4 * clip.shape[0] / 16))
    moving = 0
    for t in range(clip.shape[0] - 1):
        mag = np.sqrt((farneback(grey[t], grey[t + 1]) ** 2).sum(-1)).ravel()
        top = np.sort(mag)[-max(1, int(0.05 * mag.size)):]
        moving += int(top.mean() > threshold)
    return moving >= need


def clip_metrics(clip: np.ndarray, cond, truth: np.ndarray) -> dict:
    """Per-clip figures (world pixels for distances); ``truth`` is ``physics.simulate(cond, T)``."""
    scene = physics.decode_condition(cond)
    scale = clip.shape[2] / physics.SIZE
    errors, singles, consistency, tracks = [], [], [], []
    for k, (colour, _) in enumerate(physics.OBJECTS[scene.name]):
        cents, single, masks = blob_track(clip, physics.COLOURS[colour])
        err = np.sqrt(((cents / scale - truth[k]) ** 2).sum(-1))
        errors.append(np.where(np.isfinite(err), np.minimum(err, MISSING_PX), MISSING_PX))
        singles.append(single.all())
        consistency.append(mask_consistency(masks, cents))
        tracks.append(np.where(np.isfinite(cents / scale), cents / scale, truth[k]))
    errors = np.stack(errors)
    rmse = float(np.sqrt((errors**2).mean()))
    return {
        "scene": scene.name,
        "pass": bool(all(singles) and rmse < PASS_RMSE_PX and errors.max() < PASS_MAX_PX),
        "rmse": rmse,
        "consistency": float(np.mean(consistency)),
        "flicker": flicker_score(clip),
        "warp": warping_error(clip),
        "dynamic": dynamic(clip),
        "track": np.stack(tracks),
    }


def _groups(conditions: np.ndarray) -> list[np.ndarray]:
    """Index runs of consecutive equal conditions."""
    runs, start = [], 0
    for k in range(1, len(conditions) + 1):
        if k == len(conditions) or not np.array_equal(conditions[k], conditions[start]):
            runs.append(np.arange(start, k))
            start = k
    return runs


def diversity(clips: list, per_clip: list, conditions: np.ndarray) -> tuple[float, float]:
    """Mean pairwise pixel RMSE and trajectory distance within groups of equal conditions (nan if none)."""
    pixel, track = [], []
    for idx in _groups(conditions):
        idx = [i for i in idx if per_clip[i] is not None]
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                i, j = idx[a], idx[b]
                pixel.append(float(np.sqrt(((clips[i].astype(np.float32) - clips[j].astype(np.float32)) ** 2).mean()) / 255.0))
                track.append(float(np.sqrt(((per_clip[i]["track"] - per_clip[j]["track"]) ** 2).sum(-1)).mean()))
    return (float(np.mean(pixel)) if pixel else float("nan")), (float(np.mean(track)) if track else float("nan"))


def evaluate_clips(clips: list, conditions) -> dict[str, float]:
    conditions = states(conditions)
    truths = simulated(clips, conditions)  # None where the clip or the condition is malformed
    per_clip = [clip_metrics(clip, cond, truth) if truth is not None else None
                for clip, cond, truth in zip(clips, conditions, truths)]
    ok = [m for m in per_clip if m is not None]
    n = max(len(clips), 1)

    def mean(key):
        return float(np.mean([m[key] for m in ok])) if ok else float("nan")

    rmse = [m["rmse"] for m in ok]
    pixel_div, track_div = diversity(clips, per_clip, conditions)
    metrics = {
        "physics_pass_rate": float(sum(m["pass"] for m in ok) / n),
        "trajectory_rmse_px": mean("rmse"),
        "trajectory_rmse_median_px": float(np.median(rmse)) if rmse else float("nan"),
        "flicker": mean("flicker"),
        "subject_consistency": mean("consistency"),
        "warping_error": mean("warp"),
        "dynamic_degree": float(sum(m["dynamic"] for m in ok) / n),
        "diversity_pixel": pixel_div,
        "diversity_trajectory_px": track_div,
        "invalid_rate": 1.0 - len(ok) / n,
    }
    for scene in physics.SCENES:
        of_scene = [m for m in ok if m["scene"] == scene]
        if of_scene:
            metrics[f"physics_pass/{scene}"] = float(np.mean([m["pass"] for m in of_scene]))
    return metrics
