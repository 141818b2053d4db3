"""``GraspEnv``: a gantry gripper (x/y/z slides + two coupled fingers) lifts one object off the floor.

Each episode draws one object (box, cylinder or sphere) with a random size, yaw, friction, density and
place; the other two shapes wait parked outside the workspace. The policy moves the gripper's target
by up to ``DMAX`` per control step (20 Hz, 25 physics substeps of 2 ms) and sets the finger opening.
Success: the object is held between both fingers at least ``lift_height`` above where it started, for
``hold_steps`` consecutive control steps. ``reset(options={"ood": True})`` draws every factor from
ranges that training never sees (see ``OOD``), or ``{"ood": ["position", ...]}`` only some of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import gymnasium as gym
import mujoco
import numpy as np

ENV_ID = "flowcoach/Grasp-v0"
MAX_EPISODE_STEPS = 60
SHAPES = ("box", "cylinder", "sphere")
OOD_FACTORS = ("position", "yaw", "size", "friction", "density")

DMAX = 0.025  # metres of target motion per control step at |action| = 1 (0.5 m/s at 20 Hz)
WINDUP = 0.05  # the target never leads the gripper by more than this (a blocked gripper does not wind up)
FINGER_MAX = 0.05  # each finger slides 0..5 cm from the centre line: opening 0..10 cm
WORKSPACE_LOW = np.array([-0.27, -0.27, 0.025])  # the tcp's reach; at z = 0.025 the finger tips clear the floor by 5 mm
WORKSPACE_HIGH = np.array([0.27, 0.27, 0.30])
PARK_XY = {"box": (0.8, -0.8), "cylinder": (0.9, -0.7), "sphere": (0.7, -0.9)}  # out of reach, behind the camera
PARK_HALF = 0.02
MAX_RENDER = 640

# The tcp (tool centre point) is the hand body's origin, 2 cm above the finger tips; the slide joints
# x, y, z therefore read the tcp position directly. Pads span tcp-2 cm .. tcp+6 cm, and the palm starts
# above them, so any object shorter than 8 cm fits between the fingers without touching the palm.
# Object geoms have priority 1: their friction (drawn per episode) governs every contact they make.
MJCF = f"""
<mujoco model="flowcoach_grasp">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="0.002" integrator="implicitfast" cone="elliptic" impratio="10"/>
  <visual>
    <global offwidth="{MAX_RENDER}" offheight="{MAX_RENDER}"/>
    <quality shadowsize="0"/>
  </visual>
  <default>
    <joint armature="0.01"/>
    <default class="object">
      <geom priority="1" condim="4" rgba="0.85 0.35 0.2 1"/>
    </default>
  </default>
  <asset>
    <texture name="grid" type="2d" builtin="checker" rgb1="0.3 0.35 0.4" rgb2="0.25 0.3 0.35"
             width="64" height="64"/>
    <material name="grid" texture="grid" texrepeat="8 8"/>
  </asset>
  <worldbody>
    <light pos="0 0 1" dir="0 0 -1" diffuse="0.8 0.8 0.8"/>
    <camera name="front" pos="0.45 -0.45 0.4" xyaxes="1 1 0 -0.34 0.34 0.9" fovy="45"/>
    <geom name="floor" type="plane" size="0.5 0.5 0.01" material="grid" friction="0.8"/>
    <body name="hand" gravcomp="1">
      <joint name="x" type="slide" axis="1 0 0" range="{WORKSPACE_LOW[0]} {WORKSPACE_HIGH[0]}"/>
      <joint name="y" type="slide" axis="0 1 0" range="{WORKSPACE_LOW[1]} {WORKSPACE_HIGH[1]}"/>
      <joint name="z" type="slide" axis="0 0 1" range="{WORKSPACE_LOW[2]} {WORKSPACE_HIGH[2]}"/>
      <site name="tcp" size="0.004" rgba="1 0 0 1"/>
      <geom name="palm" type="box" pos="0 0 0.07" size="0.02 0.065 0.01" mass="0.5" rgba="0.7 0.7 0.75 1"/>
      <body name="finger_l" gravcomp="1">
        <joint name="finger_l" type="slide" axis="0 1 0" range="0 {FINGER_MAX}"/>
        <geom name="pad_l" type="box" pos="0 0.006 0.02" size="0.012 0.006 0.04" mass="0.05"
              friction="1" rgba="0.2 0.2 0.25 1"/>
      </body>
      <body name="finger_r" gravcomp="1">
        <joint name="finger_r" type="slide" axis="0 -1 0" range="0 {FINGER_MAX}"/>
        <geom name="pad_r" type="box" pos="0 -0.006 0.02" size="0.012 0.006 0.04" mass="0.05"
              friction="1" rgba="0.2 0.2 0.25 1"/>
      </body>
    </body>
    <body name="box" pos="0.8 -0.8 0.02">
      <freejoint name="box"/>
      <geom name="box" class="object" type="box" size="0.02 0.02 0.02"/>
    </body>
    <body name="cylinder" pos="0.9 -0.7 0.02">
      <freejoint name="cylinder"/>
      <geom name="cylinder" class="object" type="cylinder" size="0.02 0.02"/>
    </body>
    <body name="sphere" pos="0.7 -0.9 0.02">
      <freejoint name="sphere"/>
      <geom name="sphere" class="object" type="sphere" size="0.02"/>
    </body>
  </worldbody>
  <contact>
    <exclude body1="finger_l" body2="finger_r"/>
  </contact>
  <equality>
    <joint joint1="finger_r" joint2="finger_l" polycoef="0 1 0 0 0"/>
  </equality>
  <actuator>
    <position name="x" joint="x" kp="3000" dampratio="1" forcerange="-40 40"/>
    <position name="y" joint="y" kp="3000" dampratio="1" forcerange="-40 40"/>
    <position name="z" joint="z" kp="3000" dampratio="1" forcerange="-40 40"/>
    <position name="grip" joint="finger_l" kp="300" dampratio="1" forcerange="-10 10"
              ctrlrange="0 {FINGER_MAX}"/>
  </actuator>
</mujoco>
"""

# Where each quantity sits in the observation vector (float32, length OBS_DIM).
OBS_LAYOUT = {
    "gripper_pos": slice(0, 3),  # tcp position (m)
    "gripper_vel": slice(3, 6),  # tcp velocity (m/s)
    "finger_opening": slice(6, 7),  # distance between the pads (m)
    "object_pos": slice(7, 10),  # object centre (m)
    "object_quat": slice(10, 14),  # object orientation, wxyz with w >= 0
    "object_vel": slice(14, 17),  # object linear velocity (m/s)
    "object_half_extents": slice(17, 20),  # box (hx, hy, hz), cylinder (r, r, hh), sphere (r, r, r)
    "shape_onehot": slice(20, 23),  # in the order of SHAPES
    "gripper_to_object": slice(23, 26),  # object_pos - gripper_pos
    "finger_contact": slice(26, 28),  # 1 where the left / right pad touches the object
}
OBS_DIM = 28
# Finite bounds (the observation is clipped to them): wide enough for any state the gantry can reach;
# only a degenerate state (an object flung away) could touch them.
_BOUND = {"gripper_pos": 2.0, "gripper_vel": 10.0, "finger_opening": 1.0, "object_pos": 2.0, "object_quat": 1.0,
          "object_vel": 10.0, "object_half_extents": 1.0, "shape_onehot": 1.0, "gripper_to_object": 4.0,
          "finger_contact": 1.0}
OBS_HIGH = np.concatenate([np.full(s.stop - s.start, _BOUND[k]) for k, s in OBS_LAYOUT.items()]).astype(np.float32)


@dataclass(frozen=True)
class Ranges:
    """Where objects come from: training ranges, and the out-of-distribution ones beside them."""

    xy: float = 0.12  # train: |x|, |y| <= xy
    xy_ood: float = 0.17  # ood: xy < max(|x|, |y|) <= xy_ood
    yaw: float = np.pi / 6  # train |yaw| <= yaw; ood yaw < |yaw| <= yaw_ood
    yaw_ood: float = np.pi / 4
    half_width: tuple = (0.016, 0.028)  # box hx, hy; cylinder and sphere radius
    half_height: tuple = (0.016, 0.034)  # box hz, cylinder half height
    ood_small: float = 0.75  # ood sizes: [lo * ood_small, lo] or [hi, hi * ood_large]
    ood_large: float = 1.2
    friction: tuple = (0.5, 1.0)
    friction_ood: tuple = ((0.3, 0.5), (1.0, 1.4))
    density: tuple = (300.0, 800.0)  # kg/m^3
    density_ood: tuple = (800.0, 1200.0)
    start_xy: float = 0.05  # the gripper starts above the centre, fingers open
    start_z: tuple = (0.15, 0.2)


RANGES = Ranges()


@dataclass(frozen=True)
class ObjectSpec:
    """One episode's object: shape index into SHAPES, half extents (3,), material and pose on the floor."""

    shape: int
    half_extents: np.ndarray
    friction: float
    density: float
    xy: np.ndarray
    yaw: float


def ood_factors(ood) -> frozenset:
    """``options["ood"]``: False/None -> none, True -> all of OOD_FACTORS, or a list of factor names."""
    if ood is None or ood is False:
        return frozenset()
    if ood is True:
        return frozenset(OOD_FACTORS)
    names = [ood] if isinstance(ood, str) else list(ood)
    unknown = [n for n in names if n not in OOD_FACTORS]
    if unknown:
        raise ValueError(f"unknown ood factor(s) {unknown}; choose from {list(OOD_FACTORS)} or True")
    return frozenset(names)


def _two_sided(rng: np.random.Generator, inner: float, outer: float) -> float:
    """A value with inner < |v| <= outer, either sign."""
    return float(rng.choice([-1.0, 1.0]) * rng.uniform(inner, outer))


def _sample_xy(rng: np.random.Generator, ood: bool, r: Ranges) -> np.ndarray:
    if not ood:
        return rng.uniform(-r.xy, r.xy, size=2)
    # The ring between the training square and a larger one: pick the coordinate that leaves the square.
    out, free = _two_sided(rng, r.xy, r.xy_ood), rng.uniform(-r.xy_ood, r.xy_ood)
    return np.array([out, free]) if rng.random() < 0.5 else np.array([free, out])


def _sample_interval(rng: np.random.Generator, lo: float, hi: float, ood_side: float | None, r: Ranges) -> float:
    """Uniform on [lo, hi]; for ood_side < 0 below it ([lo * ood_small, lo]), for > 0 above it."""
    if ood_side is None:
        return float(rng.uniform(lo, hi))
    if ood_side < 0:
        return float(rng.uniform(lo * r.ood_small, lo))
    return float(rng.uniform(hi, hi * r.ood_large))


def _sample_half_extents(rng: np.random.Generator, shape: str, ood: bool, r: Ranges) -> np.ndarray:
    side = (-1.0 if rng.random() < 0.5 else 1.0) if ood else None  # an ood object is all small or all large
    radius = _sample_interval(rng, *r.half_width, side, r)
    if shape == "sphere":
        return np.full(3, radius)
    height = _sample_interval(rng, *r.half_height, side, r)
    width_y = _sample_interval(rng, *r.half_width, side, r) if shape == "box" else radius
    return np.array([radius, width_y, height])


def _sample_from(rng: np.random.Generator, interval: tuple, ood_intervals: tuple, ood: bool) -> float:
    lo, hi = ood_intervals[rng.integers(len(ood_intervals))] if ood else interval
    return float(rng.uniform(lo, hi))


def sample_object(rng: np.random.Generator, ood: frozenset = frozenset(), r: Ranges = RANGES) -> ObjectSpec:
    """Draw one object; factors named in ``ood`` come from ranges disjoint from training's."""
    shape = int(rng.integers(len(SHAPES)))
    half = _sample_half_extents(rng, SHAPES[shape], "size" in ood, r)
    friction = _sample_from(rng, r.friction, r.friction_ood, "friction" in ood)
    density = _sample_from(rng, r.density, (r.density_ood,), "density" in ood)
    xy = _sample_xy(rng, "position" in ood, r)
    yaw = _two_sided(rng, r.yaw, r.yaw_ood) if "yaw" in ood else float(rng.uniform(-r.yaw, r.yaw))
    return ObjectSpec(shape, half, friction, density, xy, yaw)


def _mass_inertia(shape: str, half: np.ndarray, density: float) -> tuple[float, np.ndarray]:
    """Solid-body mass and principal inertia about the centre (the geom is centred in its body)."""
    if shape == "box":
        mass = density * 8.0 * np.prod(half)
        hx2, hy2, hz2 = half**2
        return mass, mass / 3.0 * np.array([hy2 + hz2, hx2 + hz2, hx2 + hy2])
    if shape == "cylinder":
        r, hh = half[0], half[2]
        mass = density * np.pi * r**2 * 2.0 * hh
        side = mass * (3.0 * r**2 + 4.0 * hh**2) / 12.0
        return mass, np.array([side, side, mass * r**2 / 2.0])
    r = half[0]
    mass = density * 4.0 / 3.0 * np.pi * r**3
    return mass, np.full(3, 0.4 * mass * r**2)


def _geom_size(shape: str, half: np.ndarray) -> np.ndarray:
    if shape == "box":
        return half.copy()
    if shape == "cylinder":
        return np.array([half[0], half[2], 0.0])
    return np.array([half[0], 0.0, 0.0])


def _id(model: mujoco.MjModel, kind, name: str) -> int:
    i = mujoco.mj_name2id(model, kind, name)
    if i < 0:
        raise KeyError(f"the grasping MJCF has no {kind.name} named {name!r}")
    return i


def _yaw_quat(yaw: float) -> np.ndarray:
    return np.array([np.cos(yaw / 2.0), 0.0, 0.0, np.sin(yaw / 2.0)])


class GraspEnv(gym.Env):
    """Lift one random object with a gantry gripper. Action: [dx, dy, dz, grip] in [-1, 1]^4.

    dx, dy, dz move the gripper's position target by up to DMAX; grip sets the finger opening target
    (-1 closed, +1 fully open). The reward is a weighted sum of the terms that ``info`` also reports:
    ``reward_success`` (1 on the step success is reached), ``reward_reach`` (1 - tanh(10 * distance
    tcp-object)), ``reward_grasp`` (both pads touch the object) and ``reward_lift`` (lift / lift_height,
    clipped to [0, 1]). The env never truncates by itself: ``gym.make`` adds the time limit.
    """

    metadata: ClassVar[dict] = {"render_modes": ["rgb_array"], "render_fps": 20}
    DEFAULT_WEIGHTS: ClassVar[dict] = {"success": 1.0, "reach": 0.1, "grasp": 0.1, "lift": 0.1}

    def __init__(
        self,
        render_mode: str | None = None,
        width: int = 96,
        height: int = 96,
        substeps: int = 25,
        lift_height: float = 0.05,
        hold_steps: int = 5,
        reward_weights: dict | None = None,
        terminate_on_success: bool = True,
    ):
        self._check_args(render_mode, width, height, substeps, lift_height, hold_steps, reward_weights)
        self.render_mode, self.width, self.height = render_mode, int(width), int(height)
        self.substeps, self.lift_height, self.hold_steps = int(substeps), float(lift_height), int(hold_steps)
        self.reward_weights = {**self.DEFAULT_WEIGHTS, **(reward_weights or {})}
        self.terminate_on_success = bool(terminate_on_success)
        self.model = mujoco.MjModel.from_xml_string(MJCF)
        self.data = mujoco.MjData(self.model)
        self.metadata = {**self.metadata, "render_fps": round(1.0 / (self.model.opt.timestep * self.substeps))}
        self._ids()
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
        self.observation_space = gym.spaces.Box(-OBS_HIGH, OBS_HIGH, dtype=np.float32)
        self._renderer = None
        self.object_spec: ObjectSpec | None = None

    @staticmethod
    def _check_args(render_mode, width, height, substeps, lift_height, hold_steps, reward_weights):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        if not (0 < width <= MAX_RENDER and 0 < height <= MAX_RENDER):
            raise ValueError(f"width and height must be in 1..{MAX_RENDER}, got {width}x{height}")
        if substeps < 1 or hold_steps < 1 or not lift_height > 0:
            raise ValueError("substeps and hold_steps must be >= 1 and lift_height > 0")
        unknown = set(reward_weights or {}) - set(GraspEnv.DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown reward term(s) {sorted(unknown)}; known: {list(GraspEnv.DEFAULT_WEIGHTS)}")

    def _ids(self):
        m, J = self.model, mujoco.mjtObj.mjOBJ_JOINT
        self._tcp_site = _id(m, mujoco.mjtObj.mjOBJ_SITE, "tcp")
        self._hand_q = [m.jnt_qposadr[_id(m, J, j)] for j in ("x", "y", "z")]
        self._hand_v = [m.jnt_dofadr[_id(m, J, j)] for j in ("x", "y", "z")]
        self._finger_q = [m.jnt_qposadr[_id(m, J, j)] for j in ("finger_l", "finger_r")]
        self._pads = [_id(m, mujoco.mjtObj.mjOBJ_GEOM, g) for g in ("pad_l", "pad_r")]
        self._obj_body = [_id(m, mujoco.mjtObj.mjOBJ_BODY, s) for s in SHAPES]
        self._obj_geom = [_id(m, mujoco.mjtObj.mjOBJ_GEOM, s) for s in SHAPES]
        self._obj_q = [m.jnt_qposadr[_id(m, J, s)] for s in SHAPES]
        self._obj_v = [m.jnt_dofadr[_id(m, J, s)] for s in SHAPES]

    # ----- reset -------------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        ood = self._parse_options(options)
        self.object_spec = sample_object(self.np_random, ood)
        start = np.array([*self.np_random.uniform(-RANGES.start_xy, RANGES.start_xy, 2),
                          self.np_random.uniform(*RANGES.start_z)])
        self._configure_objects(self.object_spec)
        self._place(self.object_spec, start)
        self._z0 = float(self.data.xpos[self._obj_body[self.object_spec.shape]][2])
        self._held = 0
        obs = self._obs()
        return obs, self._info(obs, self._reward_terms(obs, success=False), success=False)

    @staticmethod
    def _parse_options(options) -> frozenset:
        if options is None:
            return frozenset()
        if not isinstance(options, dict) or set(options) - {"ood"}:
            raise ValueError(f"options must be a dict with the only key 'ood', got {options!r}")
        return ood_factors(options.get("ood"))

    def _configure_objects(self, spec: ObjectSpec):
        """Write every object's size, mass and friction into the model (parked ones get a fixed default)
        so a reset depends on its seed only, never on earlier episodes."""
        m = self.model
        for i, shape in enumerate(SHAPES):
            active = i == spec.shape
            half = spec.half_extents if active else np.full(3, PARK_HALF)
            friction = spec.friction if active else 1.0
            density = spec.density if active else 500.0
            g, b = self._obj_geom[i], self._obj_body[i]
            m.geom_size[g] = _geom_size(shape, half)
            m.geom_rbound[g] = np.linalg.norm(half) if shape != "sphere" else half[0]
            m.geom_aabb[g] = np.concatenate([np.zeros(3), half])
            m.geom_friction[g, 0] = friction
            m.body_mass[b], m.body_inertia[b] = _mass_inertia(shape, half, density)
        mujoco.mj_setConst(m, self.data)  # refresh the constants derived from masses (inverse weights)

    def _place(self, spec: ObjectSpec, start: np.ndarray):
        d = self.data
        mujoco.mj_resetData(self.model, d)
        d.qpos[self._hand_q] = start
        d.qpos[self._finger_q] = FINGER_MAX
        for i, shape in enumerate(SHAPES):
            q = self._obj_q[i]
            if i == spec.shape:
                d.qpos[q : q + 3] = [spec.xy[0], spec.xy[1], spec.half_extents[2]]
                d.qpos[q + 3 : q + 7] = _yaw_quat(spec.yaw)
            else:
                d.qpos[q : q + 3] = [*PARK_XY[shape], PARK_HALF]
                d.qpos[q + 3 : q + 7] = [1.0, 0.0, 0.0, 0.0]
        self._target = start.copy()
        d.ctrl[:3], d.ctrl[3] = start, FINGER_MAX
        mujoco.mj_step(self.model, d, nstep=10)  # let contacts settle before z0 is measured

    # ----- step --------------------------------------------------------------------------------

    def step(self, action):
        if self.object_spec is None:
            raise RuntimeError("GraspEnv.step() called before reset()")
        a = self._check_action(action)
        tcp = self.data.site_xpos[self._tcp_site]
        target = np.clip(self._target + DMAX * a[:3], WORKSPACE_LOW, WORKSPACE_HIGH)
        self._target = np.clip(target, tcp - WINDUP, tcp + WINDUP)
        self.data.ctrl[:3] = self._target
        self.data.ctrl[3] = (a[3] + 1.0) / 2.0 * FINGER_MAX
        mujoco.mj_step(self.model, self.data, nstep=self.substeps)
        obs = self._obs()
        lifted = self._lift(obs) >= self.lift_height and obs[OBS_LAYOUT["finger_contact"]].all()
        self._held = self._held + 1 if lifted else 0
        success = self._held >= self.hold_steps
        terms = self._reward_terms(obs, success)
        reward = float(sum(self.reward_weights[k] * v for k, v in terms.items()))
        terminated = bool(success and self.terminate_on_success)
        return obs, reward, terminated, False, self._info(obs, terms, success)

    def _check_action(self, action) -> np.ndarray:
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (4,) or not np.all(np.isfinite(a)):
            raise ValueError(f"action must be 4 finite numbers in [-1, 1], got shape {a.shape}: {a.ravel()[:8]}")
        return np.clip(a, -1.0, 1.0)

    def _lift(self, obs: np.ndarray) -> float:
        return float(obs[OBS_LAYOUT["object_pos"]][2] - self._z0)

    def _reward_terms(self, obs: np.ndarray, success: bool) -> dict[str, float]:
        distance = float(np.linalg.norm(obs[OBS_LAYOUT["gripper_to_object"]]))
        return {
            "success": float(success),
            "reach": float(1.0 - np.tanh(10.0 * distance)),
            "grasp": float(obs[OBS_LAYOUT["finger_contact"]].all()),
            "lift": float(np.clip(self._lift(obs) / self.lift_height, 0.0, 1.0)),
        }

    def _info(self, obs: np.ndarray, terms: dict, success: bool) -> dict:
        info = {f"reward_{k}": v for k, v in terms.items()}
        spec = self.object_spec
        info.update(is_success=bool(success), lift_height=self._lift(obs), shape=int(spec.shape),
                    friction=float(spec.friction), held_steps=int(self._held))
        return info

    # ----- observation -------------------------------------------------------------------------

    def _pad_contacts(self, obj_geom: int) -> np.ndarray:
        """[left, right]: 1 where that pad has a contact with the object geom."""
        c = self.data.contact
        n = self.data.ncon
        pairs = {(int(a), int(b)) for a, b in zip(c.geom1[:n], c.geom2[:n], strict=True)}
        return np.array([float((p, obj_geom) in pairs or (obj_geom, p) in pairs) for p in self._pads])

    def _obs(self) -> np.ndarray:
        d, spec = self.data, self.object_spec
        i = spec.shape
        tcp = d.site_xpos[self._tcp_site]
        obj = d.xpos[self._obj_body[i]]
        quat = d.xquat[self._obj_body[i]]
        quat = quat if quat[0] >= 0 else -quat  # q and -q are one rotation: keep w >= 0
        v = self._obj_v[i]
        obs = np.concatenate([
            tcp, d.qvel[self._hand_v], [d.qpos[self._finger_q].sum()], obj, quat, d.qvel[v : v + 3],
            spec.half_extents, np.eye(len(SHAPES))[i], obj - tcp, self._pad_contacts(self._obj_geom[i]),
        ])
        return np.clip(obs, -OBS_HIGH, OBS_HIGH).astype(np.float32)

    # ----- rendering ---------------------------------------------------------------------------

    def render(self):
        if self.render_mode is None:
            gym.logger.warn("render() called without render_mode='rgb_array'; returning None")
            return None
        if self._renderer is None:
            self._renderer = mujoco.Renderer(self.model, self.height, self.width)
        self._renderer.update_scene(self.data, camera="front")
        return self._renderer.render()

    def close(self):
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


def register_envs() -> None:
    """Register ``flowcoach/Grasp-v0`` with gymnasium; calling it again is harmless."""
    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point="flowcoach.domains.grasping.env:GraspEnv",
                     max_episode_steps=MAX_EPISODE_STEPS)
