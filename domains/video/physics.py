"""Simple physics scenes: simulation with random initial states, and rendering to small RGB clips.

Four scenes: a ball dropped with a horizontal push that bounces on the floor ("bounce"), a
pendulum released from rest ("pendulum"), two balls on a line that collide elastically
("collision"), and a block sliding on the floor until friction stops it ("slide").

Units: positions in pixels of a 32 x 32 frame (x right, y down, pixel centres at k + 0.5), time in
frames. A condition is a vector [COND_DIM]: the scene's one-hot (4) and up to 5 parameters of its
initial state, each mapped linearly from its range to [-1, 1] (unused slots 0). ``simulate`` turns a
condition into each object's centre at every frame; that trajectory is the ground truth the physics
reward and the evaluator compare with. Simulation takes many small sub-steps per frame so
collisions and bounces land where the laws put them (exact steps under constant acceleration;
the pendulum uses RK4).

Each object has a fixed colour (red, blue or green) that nothing else in a frame has; the floor and
the pendulum's rod are grey. Rendering uses analytic pixel coverage (anti-aliased), so sub-pixel
positions show in the frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FRAMES = 16
SIZE = 32
SCENES = ("bounce", "pendulum", "collision", "slide")
NUM_PARAMS = 5
COND_DIM = len(SCENES) + NUM_PARAMS
RADIUS = 2.5  # balls and the pendulum bob
HALF = 2.5  # half side of the sliding block
FLOOR = 29.5  # y of the floor's top edge (bounce, slide)
SUBSTEPS = 64

# Physical constants per scene, in pixels and frames.
GRAVITY = 0.45  # bounce
RESTITUTION = 0.8  # bounce: vertical speed kept at the floor
PENDULUM_G = 2.0  # pendulum: g in px / frame^2 (period ~ 15-21 frames for the lengths below)
PIVOT = (16.0, 3.0)
FRICTION = 0.15  # slide: deceleration mu * g in px / frame^2

# Parameter ranges of each scene's initial state, in the order of the condition's slots.
RANGES = {
    "bounce": {"x0": (8.0, 24.0), "y0": (5.0, 14.0), "vx": (-1.0, 1.0)},
    "pendulum": {"length": (12.0, 22.0), "theta0": (-70.0, 70.0)},  # degrees from the vertical, |theta0| >= 20
    "collision": {"y": (10.0, 24.0), "x1": (5.0, 11.0), "x2": (21.0, 27.0), "v1": (0.6, 1.6), "v2": (-1.6, -0.6)},
    "slide": {"x0": (4.0, 12.0), "v0": (0.8, 1.9)},
}
MIN_SWING = 20.0

RED, BLUE, GREEN, GREY = (1.0, 0.15, 0.15), (0.15, 0.3, 1.0), (0.2, 1.0, 0.2), (0.35, 0.35, 0.35)
# The objects of each scene: (colour name, shape). The reward and the evaluator find each by colour.
OBJECTS = {
    "bounce": (("red", "disc"),),
    "pendulum": (("red", "disc"),),
    "collision": (("red", "disc"), ("blue", "disc")),
    "slide": (("green", "square"),),
}
COLOURS = {"red": RED, "blue": BLUE, "green": GREEN}


@dataclass
class Scene:
    """A decoded condition: the scene's name and its initial state in physical units."""

    name: str
    params: dict[str, float]


def encode_condition(name: str, params: dict[str, float]) -> np.ndarray:
    cond = np.zeros(COND_DIM, dtype=np.float32)
    cond[SCENES.index(name)] = 1.0
    for k, (key, (lo, hi)) in enumerate(RANGES[name].items()):
        cond[len(SCENES) + k] = 2.0 * (params[key] - lo) / (hi - lo) - 1.0
    return cond


def decode_condition(cond) -> Scene:
    """The inverse of ``encode_condition``; raises ValueError on a vector that names no scene."""
    cond = np.asarray(cond, dtype=np.float64).reshape(-1)
    if cond.shape[0] != COND_DIM or not np.isfinite(cond).all():
        raise ValueError(f"a condition is a finite vector of {COND_DIM} numbers, got shape {cond.shape}")
    onehot = cond[: len(SCENES)]
    if not (np.sort(onehot)[-1] == 1.0 and np.sort(onehot)[-2] == 0.0):
        raise ValueError(f"condition's scene one-hot {onehot.tolist()} names no scene")
    name = SCENES[int(np.argmax(onehot))]
    params = {}
    for k, (key, (lo, hi)) in enumerate(RANGES[name].items()):
        params[key] = lo + (cond[len(SCENES) + k] + 1.0) * 0.5 * (hi - lo)
    return Scene(name, params)


def random_conditions(n: int, rng: np.random.Generator, scenes: tuple[str, ...] = SCENES) -> np.ndarray:
    """n conditions [n, COND_DIM]: scenes in turn (equal shares), initial states uniform in their ranges."""
    out = np.zeros((n, COND_DIM), dtype=np.float32)
    for i in range(n):
        name = scenes[i % len(scenes)]
        params = {key: rng.uniform(lo, hi) for key, (lo, hi) in RANGES[name].items()}
        if name == "pendulum":  # a swing too small to see is not a pendulum clip
            params["theta0"] = math.copysign(rng.uniform(MIN_SWING, RANGES[name]["theta0"][1]), rng.uniform(-1, 1))
        out[i] = encode_condition(name, params)
    return out


# ----------------------------------------------------------------------------- simulation
def simulate(cond, frames: int = FRAMES) -> np.ndarray:
    """Centre of each object at each frame: [objects, frames, 2] (x, y) in pixels of a 32 px frame.

    ``frames`` other than FRAMES resamples the same 16-frame duration (for models that make
    another number of frames).
    """
    return simulate_batch(np.asarray(cond)[None], frames)[0]


def simulate_batch(conds, frames: int = FRAMES) -> list[np.ndarray]:
    """``simulate`` for many conditions at once (the clips of a scene step together, as arrays)."""
    scenes = [decode_condition(c) for c in conds]
    times = np.linspace(0.0, FRAMES - 1, frames)
    out: list = [None] * len(scenes)
    for name, fn in (("bounce", _bounce), ("pendulum", _pendulum), ("collision", _collision), ("slide", _slide)):
        idx = [k for k, sc in enumerate(scenes) if sc.name == name]
        if idx:
            params = {key: np.array([scenes[k].params[key] for k in idx]) for key in RANGES[name]}
            for k, traj in zip(idx, fn(params, times)):
                out[k] = traj
    return out


def _integrate(times, state: tuple, step) -> np.ndarray:
    """Advance ``state`` (a tuple of arrays [N]) by SUBSTEPS sub-steps per frame with
    ``step(state, dt)``; returns the states at ``times``, [len(times), len(state), N]."""
    dt = 1.0 / SUBSTEPS
    out, t = [], 0.0
    for target in times:
        while t < target - 1e-9:
            h = min(dt, target - t)
            state = step(state, h)
            t += h
        out.append(np.stack(state))
    return np.stack(out)


def _walls(x, vx, r):
    """Elastic side walls: positions reflected into [r, SIZE - r], velocities pointed inwards."""
    low, high = x < r, x > SIZE - r
    x = np.where(low, 2 * r - x, np.where(high, 2 * (SIZE - r) - x, x))
    vx = np.where(low, np.abs(vx), np.where(high, -np.abs(vx), vx))
    return x, vx


def _bounce(p, times):
    bottom = FLOOR - RADIUS

    def step(s, h):
        x, y, vx, vy = s
        x, y, vy = x + vx * h, y + vy * h + 0.5 * GRAVITY * h * h, vy + GRAVITY * h  # exact under constant g
        hit = (y > bottom) & (vy > 0)  # bounce: reflect the overshoot, keep RESTITUTION of the speed
        y = np.where(hit, bottom - RESTITUTION * (y - bottom), y)
        vy = np.where(hit, -RESTITUTION * vy, vy)
        x, vx = _walls(x, vx, RADIUS)
        return x, y, vx, vy

    s = _integrate(times, (p["x0"], p["y0"], p["vx"], np.zeros_like(p["x0"])), step)  # [T, 4, N]
    return s[:, :2].transpose(2, 0, 1)[:, None]  # [N, 1, T, 2]


def _pendulum(p, times):
    k = PENDULUM_G / p["length"]

    def step(s, h):  # RK4 on theta'' = -(g / L) sin(theta)
        th, om = s
        a1, b1 = om, -k * np.sin(th)
        a2, b2 = om + 0.5 * h * b1, -k * np.sin(th + 0.5 * h * a1)
        a3, b3 = om + 0.5 * h * b2, -k * np.sin(th + 0.5 * h * a2)
        a4, b4 = om + h * b3, -k * np.sin(th + h * a3)
        return th + h / 6.0 * (a1 + 2 * a2 + 2 * a3 + a4), om + h / 6.0 * (b1 + 2 * b2 + 2 * b3 + b4)

    theta = _integrate(times, (np.radians(p["theta0"]), np.zeros_like(p["theta0"])), step)[:, 0].T  # [N, T]
    x = PIVOT[0] + p["length"][:, None] * np.sin(theta)
    y = PIVOT[1] + p["length"][:, None] * np.cos(theta)
    return np.stack([x, y], axis=-1)[:, None]


def _collision(p, times):
    def step(s, h):
        x1, x2, v1, v2 = s
        x1, x2 = x1 + v1 * h, x2 + v2 * h
        touch = (x2 - x1 < 2 * RADIUS) & (v1 > v2)  # equal masses, elastic: the balls swap velocities
        v1, v2 = np.where(touch, v2, v1), np.where(touch, v1, v2)
        x1, v1 = _walls(x1, v1, RADIUS)
        x2, v2 = _walls(x2, v2, RADIUS)
        return x1, x2, v1, v2

    s = _integrate(times, (p["x1"], p["x2"], p["v1"], p["v2"]), step)  # [T, 4, N]
    y = np.broadcast_to(p["y"][:, None], (len(p["y"]), len(times)))
    return np.stack([np.stack([s[:, 0].T, y], -1), np.stack([s[:, 1].T, y], -1)], axis=1)  # [N, 2, T, 2]


def _slide(p, times):
    # closed form: constant deceleration until the block stops
    v0 = p["v0"][:, None]
    t = np.minimum(times[None], v0 / FRICTION)
    x = p["x0"][:, None] + v0 * t - 0.5 * FRICTION * t**2
    return np.stack([x, np.full_like(x, FLOOR - HALF)], -1)[:, None]


# ----------------------------------------------------------------------------- rendering
def _grid(size: int):
    c = (np.arange(size) + 0.5) * (SIZE / size)  # pixel centres in the 32 px world
    return c[None, None, None, :], c[None, None, :, None]  # xs [1, 1, 1, W], ys [1, 1, H, 1] against [N, T, 1, 1]


def _disc(xs, ys, cx, cy, r, scale):
    d = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
    return np.clip((r - d) / scale + 0.5, 0.0, 1.0)


def _square(xs, ys, cx, cy, h, scale):
    ax = np.clip((h - np.abs(xs - cx)) / scale + 0.5, 0.0, 1.0)
    ay = np.clip((h - np.abs(ys - cy)) / scale + 0.5, 0.0, 1.0)
    return ax * ay


def _segment(xs, ys, a, bx, by, width, scale):
    """Coverage of the segments from the point a to the points (bx, by) [N, T, 1, 1]."""
    bx, by = bx - a[0], by - a[1]
    u = np.clip(((xs - a[0]) * bx + (ys - a[1]) * by) / np.maximum(bx**2 + by**2, 1e-9), 0.0, 1.0)
    d = np.sqrt((xs - a[0] - u * bx) ** 2 + (ys - a[1] - u * by) ** 2)
    return np.clip((0.5 * width - d) / scale + 0.5, 0.0, 1.0)


def _paint(img, coverage, colour):
    img *= 1.0 - coverage[..., None]
    img += coverage[..., None] * np.asarray(colour, dtype=img.dtype)


def _render_scene(name: str, traj: np.ndarray, size: int) -> np.ndarray:
    """Clips [N, T, size, size, 3] of one scene from trajectories [N, objects, T, 2]."""
    n, _, frames, _ = traj.shape
    xs, ys = _grid(size)
    scale = SIZE / size  # one output pixel in world units: the width of the anti-aliasing ramp
    clip = np.zeros((n, frames, size, size, 3), dtype=np.float32)
    if name in ("bounce", "slide"):
        _paint(clip, np.broadcast_to(np.clip((ys - FLOOR) / scale + 0.5, 0.0, 1.0), clip.shape[:4]), GREY)
    if name == "pendulum":
        _paint(clip, _segment(xs, ys, PIVOT, traj[:, 0, :, 0, None, None], traj[:, 0, :, 1, None, None], 1.0, scale), GREY)
    for k, (colour, shape) in enumerate(OBJECTS[name]):
        cx, cy = traj[:, k, :, 0, None, None], traj[:, k, :, 1, None, None]
        cover = _disc(xs, ys, cx, cy, RADIUS, scale) if shape == "disc" else _square(xs, ys, cx, cy, HALF, scale)
        _paint(clip, cover.astype(np.float32), COLOURS[colour])
    return clip


def render(cond, size: int = SIZE, frames: int = FRAMES, trajectory: np.ndarray | None = None) -> np.ndarray:
    """The clip of a condition: float32 [frames, size, size, 3] in [0, 1] on a black background.

    ``trajectory`` ([objects, frames, 2], default ``simulate(cond, frames)``) lets tests render
    perturbed motion (jitter, a frozen object) with the same painter.
    """
    scene = decode_condition(cond)
    traj = simulate(cond, frames) if trajectory is None else np.asarray(trajectory, dtype=np.float64)
    return _render_scene(scene.name, traj[None], size)[0]


def render_batch(conds, size: int = SIZE, frames: int = FRAMES) -> np.ndarray:
    """``render`` of many conditions [N, frames, size, size, 3]: simulated together, painted one by one
    (small arrays stay in cache; painting a whole batch at once was measured slower)."""
    conds = np.asarray(conds)
    out = np.zeros((len(conds), frames, size, size, 3), dtype=np.float32)
    for k, (cond, traj) in enumerate(zip(conds, simulate_batch(conds, frames))):
        out[k] = _render_scene(decode_condition(cond).name, traj[None], size)[0]
    return out


def object_colours(cond) -> list[tuple[float, float, float]]:
    return [COLOURS[c] for c, _ in OBJECTS[decode_condition(cond).name]]
