"""Scripted experts for the robosuite tasks: observation -> OSC_POSE action, re-planned every step.

Each expert is a function of the current observation only (``robot0_eef_pos``, ``robot0_eef_quat``,
``robot0_gripper_qpos``, ``object``) plus the task's fixed scene geometry (table height, goal bin, peg
position: constants of the task, read once from the env). There is no hidden phase: at every step the
expert decides from the observation which stage it is in, so a perturbed or noisy episode (DART-style
collection) is recovered from wherever it is:

* holding: the object sits between the fingers and the gripper opening matches the object's width;
* closing: the object is between the open fingers (within a few mm across them, with room on both
  sides along them, at grasp height, yaw nearly aligned) -> close; once closing, go on while the
  object's centre stays between the fingers (closing fingers centre it); fingers closed past the
  object's width (a miss) reopen;
* otherwise: open the gripper and approach the grasp pose through a funnel (the hover height above the
  grasp pose shrinks with the horizontal and yaw errors, so the fingers only come down once aligned);
* placed (Stack, Can): the object is at its goal and not held -> open and rise.

Motion: a proportional pose controller on the grip site with the gripper pointing down: position
``clip(K_POS * error)`` (norm <= 1; one unit is a 5 cm OSC step; ``K_POS_FINE`` near the grasp, which
keeps the alignment under DART-style action noise), rotation ``clip(K_ROT * axis-angle error / 0.5 rad)``.
The fingers close along the hand's y axis, which at yaw 0 is the world y axis. Among symmetric grasp yaws
(a cube's four, a handle's two) the choice is referred to the hand's current yaw, so it never flips.

Lift: grasp the cube at its centre, lift it 15 cm. Stack: grasp cube A (fingers across the A->B
direction when the cubes are within 13 cm), carry it over B, lower it until it rests on B, let go within
1.2 cm of B's centre, rise. Can: grasp the can 1.5 cm above its centre (fingers along the axis with
more room to bin 1's walls), lift it over the walls, lower it 5 cm inside the near corner of its
compartment of bin 2 (the far corner is at the arm's reach), let go, rise.

Square (NutAssemblySquare): grasp the nut's handle 6 cm from the nut's centre (the open fingers must
clear the ring, which ends at 4.4 cm), fingers across its 3.2 cm width; the nut is turned to a yaw
that points the handle toward the robot or sideways (pointing away, the nut's centre over the peg is
beyond the arm's reach), and of the two grasp yaws the one is taken that keeps the wrist nearest yaw 0
at the grasp and after the turn; carry the nut so that its centre is 2 cm above the peg top, over the
square peg, while turning it (the peg's half width is 1.6 cm, the hole's 2.3 cm); descend once the
centre is within 4 mm of the peg's axis and the turn is done, down the peg to the table while holding
the nut (robosuite's success: centre within 3 cm of the peg, < 5 cm above the table, grip site > 4.2 cm
from the centre, which the handle grasp already gives). A nut too low to move sideways is lifted first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from rtpolicy.errors import UserError

K_POS = 10.0  # action units per metre of position error (moves: no overshoot with a held object)
K_POS_FINE = 20.0  # at the grasp (the OSC goal is then the target itself): holds its own under action noise
K_ROT = 1.5  # gain on the axis-angle error (rad) / 0.5 rad
OPEN, CLOSE = -1.0, 1.0
GRIP_OPEN = 0.075  # finger opening (m) of an open gripper (max ~0.079)
DOWN = np.diag([1.0, -1.0, -1.0])  # the hand's rotation at yaw 0: x along world x, pointing down


def wrap(angle: float) -> float:
    """angle (rad) -> [-pi, pi)."""
    return float((angle + np.pi) % (2 * np.pi) - np.pi)


def quat_to_mat(q: np.ndarray) -> np.ndarray:
    """Quaternion (x, y, z, w) -> (3, 3) rotation matrix."""
    x, y, z, w = np.asarray(q, dtype=np.float64) / max(1e-12, float(np.linalg.norm(q)))
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rotvec(m: np.ndarray) -> np.ndarray:
    """(3, 3) rotation -> axis-angle (3,)."""
    angle = np.arccos(np.clip((np.trace(m) - 1) / 2, -1.0, 1.0))
    if angle < 1e-6:
        return np.zeros(3)
    axis = np.array([m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]])
    if angle > np.pi - 1e-3:  # near pi the antisymmetric part vanishes: take the axis from the symmetric part
        axis = np.sqrt(np.clip((np.diag(m) + 1) / 2, 0, None)) * np.sign(axis + 1e-9)
        return axis / max(1e-9, np.linalg.norm(axis)) * angle
    return axis / (2 * np.sin(angle)) * angle


def yaw_of(q: np.ndarray) -> float:
    """Yaw (rad) of a body's x axis about world z from its quaternion (x, y, z, w)."""
    m = quat_to_mat(q)
    return float(np.arctan2(m[1, 0], m[0, 0]))


def nearest_yaw(yaw: float, period: float, reference: float = 0.0) -> float:
    """The angle ``yaw + k * period`` closest to ``reference``."""
    return reference + wrap((yaw - reference) * (2 * np.pi / period)) * period / (2 * np.pi)


class Expert:
    """obs dict -> action (7,) float32 in [-1, 1]; subclasses implement :meth:`plan`.

    Args:
        layout: name -> slice of ``obs["object"]`` (``RobosuiteEnv.object_layout``).
        geometry: the task's fixed scene geometry (``RobosuiteEnv.geometry``).
        noise: std of Gaussian noise added to the six motion dims (DART-style), in action units.
        seed: seed of that noise.
    """

    def __init__(self, layout: Mapping[str, slice], geometry: Mapping[str, Any], noise: float = 0.0, seed: int | None = None):
        self.layout, self.geometry = dict(layout), dict(geometry)
        self.noise = float(noise)
        if not np.isfinite(self.noise) or self.noise < 0:
            raise UserError(f"noise must be a finite float >= 0, got {noise!r}")
        self.rng = np.random.default_rng(seed)

    def __call__(self, obs: Mapping[str, Any]) -> np.ndarray:
        missing = [k for k in ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object") if k not in obs]
        if missing:
            raise UserError(f"the robosuite expert needs obs keys {missing} (got {sorted(obs)})")
        self.eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        self.hand = quat_to_mat(obs["robot0_eef_quat"])
        self.yaw = float(np.arctan2(self.hand[1, 0], self.hand[0, 0]))
        q = np.asarray(obs["robot0_gripper_qpos"], dtype=np.float64)
        self.opening = float(q[0] - q[1])
        self.obj = np.asarray(obs["object"], dtype=np.float64)
        action = self.plan()
        if self.noise > 0:
            action[:6] += self.rng.normal(0.0, self.noise, 6)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def plan(self) -> np.ndarray:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def get(self, name: str) -> np.ndarray:
        return self.obj[self.layout[name]]

    def move(self, target: np.ndarray, yaw: float, grip: float, gain: float = K_POS) -> np.ndarray:
        """The action toward grip-site position ``target`` with the hand down at ``yaw``."""
        pos = gain * (np.asarray(target, dtype=np.float64) - self.eef)
        norm = np.linalg.norm(pos)
        if norm > 1.0:
            pos /= norm
        err = rotvec(rot_z(yaw) @ DOWN @ self.hand.T)
        return np.concatenate([pos, np.clip(K_ROT * err / 0.5, -1.0, 1.0), [grip]])

    def yaw_error(self, yaw: float) -> float:
        return abs(wrap(yaw - self.yaw))

    def holds(self, point: np.ndarray, width: float, xy_tol: float = 0.02, z_tol: float = 0.02) -> bool:
        """The grip site is at ``point`` and the fingers are closed on something ``width`` wide."""
        d = np.asarray(point) - self.eef
        return bool(np.linalg.norm(d[:2]) < xy_tol and abs(d[2]) < z_tol and width - 0.015 < self.opening < width + 0.008)

    def grasp(self, point: np.ndarray, yaw: float, width: float, hover: float = 0.08, xy_tol: float = 0.008,
              z_tol: float = 0.012) -> np.ndarray:
        """Approach ``point`` (the grip site's grasp position) at ``yaw`` through a funnel, then close on
        an object ``width`` wide. Closing starts once the object is between the open fingers (within
        ``xy_tol`` across them, ``z_tol`` in height) and goes on while it stays there (closing fingers
        centre it); fingers closed past the width (a miss) reopen."""
        d = np.asarray(point, dtype=np.float64) - self.eef
        xy, dz, yaw_err = float(np.linalg.norm(d[:2])), float(d[2]), self.yaw_error(yaw)
        along = abs(float(np.dot(d[:2], self.hand[:2, 1])))  # along the finger axis (the hand's y)
        across = abs(float(np.dot(d[:2], self.hand[:2, 0])))
        room = max(0.0, (self.opening - width) / 2)  # free space between the object and a finger
        if self.opening >= GRIP_OPEN - 0.01:  # open: start closing when aligned
            if along < room - 0.004 and across < xy_tol and abs(dz) < z_tol and yaw_err < 0.2:
                return self.move(point, yaw, CLOSE, K_POS_FINE)
        elif self.opening > width - 0.015:  # closing: go on while the object's centre is between the fingers
            if along < self.opening / 2 - 0.005 and across < 0.015 and abs(dz) < 0.025 and yaw_err < 0.35:
                return self.move(point, yaw, CLOSE, K_POS_FINE)
        height = min(hover, 2.5 * max(0.0, xy - xy_tol / 2) + 0.3 * max(0.0, yaw_err - 0.1))
        if self.opening < GRIP_OPEN - 0.01 and xy > xy_tol:  # fingers not yet open: wait above the object
            height = max(height, 0.03)
        target = np.asarray(point, dtype=np.float64) + [0.0, 0.0, height]
        if self.eef[2] < target[2] - 0.01 and xy > 0.03:  # rise before moving sideways
            target[:2] = self.eef[:2]
        return self.move(target, yaw, OPEN, K_POS_FINE if xy < 0.03 else K_POS)


def _cube_yaw(quat: np.ndarray, reference: float = 0.0) -> float:
    """The grasp yaw for a cube: its yaw modulo 90 deg, nearest ``reference``."""
    return nearest_yaw(yaw_of(quat), np.pi / 2, reference)


def _stable_reference(yaw: float, limit: float = 0.5) -> float:
    """A reference yaw for choosing among symmetric grasp yaws: the hand's current yaw, clipped to
    +-``limit`` (no flip between two equivalent yaws, and the choice stays within the wrist's range)."""
    return float(np.clip(yaw, -limit, limit))


class LiftExpert(Expert):
    """Grasp the cube at its centre and lift it 15 cm."""

    WIDTH = 0.042  # the cube's side (robosuite draws 4.0-4.4 cm when the model is built)

    def plan(self) -> np.ndarray:
        cube = self.get("cube_pos")
        yaw = _cube_yaw(self.get("cube_quat"), _stable_reference(self.yaw, 0.3))
        if self.holds(cube, self.WIDTH):
            return self.move(np.array([cube[0], cube[1], self.geometry["table_z"] + 0.2]), yaw, CLOSE)
        return self.grasp(cube - [0.0, 0.0, 0.005], yaw, self.WIDTH, xy_tol=0.012)


class StackExpert(Expert):
    """Grasp cube A (fingers across the A->B direction when the cubes are close), put it on cube B, let go, rise."""

    WIDTH_A, HALF_A, HALF_B = 0.04, 0.02, 0.025

    def plan(self) -> np.ndarray:
        a, b = self.get("cubeA_pos"), self.get("cubeB_pos")
        stacked_z = b[2] + self.HALF_A + self.HALF_B
        xy_err = float(np.linalg.norm(a[:2] - b[:2]))
        if self.holds(a, self.WIDTH_A):
            if xy_err < 0.012 and a[2] - stacked_z < 0.008:  # A's centre over B's 5 cm top face
                return self.move(self.eef, self.yaw, OPEN)  # on B: let go
            hover = min(0.1, 2.5 * max(0.0, xy_err - 0.008))
            goal = np.array([b[0], b[1], stacked_z + hover])
            if a[2] < stacked_z + 0.015 and xy_err > 0.02:  # too low to slide over B: rise first
                goal[:2] = a[:2]
            return self.move(self.eef + goal - a, self.yaw, CLOSE)
        if xy_err < 0.02 and abs(a[2] - stacked_z) < 0.012:  # placed: open and rise
            return self.move(np.array([a[0], a[1], a[2] + 0.12]), self.yaw, OPEN)
        yaw = _cube_yaw(self.get("cubeA_quat"), _stable_reference(self.yaw, 0.3))
        d = b[:2] - a[:2]
        if np.linalg.norm(d) < 0.13:  # the fingers (4 cm either side) must not land on B: close them across A->B
            u = d / np.linalg.norm(d)
            options = [yaw, yaw + np.pi / 2]
            score = [abs(np.dot(u, [-np.sin(y), np.cos(y)])) for y in options]  # finger axis = hand y = Rz(yaw) (0, -1)
            yaw = nearest_yaw(options[int(np.argmin(score))], np.pi, _stable_reference(self.yaw))
        return self.grasp(a - [0.0, 0.0, 0.005], yaw, self.WIDTH_A, xy_tol=0.01)


class CanExpert(Expert):
    """Grasp the can from above, carry it into its compartment of bin 2 (at the corner of the compartment
    nearest the robot, 5 cm inside: the far corner is at the arm's reach), lower it, let go, rise."""

    WIDTH = 0.05  # the can's diameter
    GRASP_DZ = 0.015  # grip site above the can's centre (the can is 8 cm tall)
    INSET = 0.05  # the drop point's distance from the compartment's near edges

    def plan(self) -> np.ndarray:
        g = self.geometry
        can = self.get("Can_pos")
        low, high = np.asarray(g["goal_low"]), np.asarray(g["goal_high"])
        goal = low + self.INSET
        inside = bool(np.all(can[:2] > low + 0.01) and np.all(can[:2] < high - 0.01))
        grasp = can + [0.0, 0.0, self.GRASP_DZ]
        if self.holds(grasp, self.WIDTH, z_tol=0.025):
            xy_err = float(np.linalg.norm(can[:2] - goal))
            if inside and xy_err < 0.02 and can[2] < g["bin_z"] + 0.13:
                return self.move(self.eef, self.yaw, OPEN)  # over the goal: let go
            travel = g["bin_z"] + 0.25  # can centre high enough to clear the bin walls
            z = g["bin_z"] + 0.11 + min(travel - g["bin_z"] - 0.11, 3.0 * max(0.0, xy_err - 0.01))
            target = np.array([goal[0], goal[1], z])
            if can[2] < travel - 0.03 and xy_err > 0.05:  # lift out of bin 1 before moving sideways
                target[:2] = can[:2]
            return self.move(self.eef + target - can, self.yaw, CLOSE)
        if inside and can[2] < g["bin_z"] + 0.1:  # placed: open and rise
            return self.move(np.array([self.eef[0], self.eef[1], can[2] + 0.15]), self.yaw, OPEN)
        return self.grasp(grasp, self.grasp_yaw(can), self.WIDTH, hover=0.1, xy_tol=0.008)

    def grasp_yaw(self, can: np.ndarray) -> float:
        """Fingers along the axis with more room to the walls of bin 1 (yaw 0: fingers along world y)."""
        g = self.geometry
        room = np.asarray(g["bin_half"]) - np.abs(can[:2] - np.asarray(g["start_bin"]))
        return 0.0 if room[1] >= room[0] - 0.02 else np.pi / 2


class SquareExpert(Expert):
    """Grasp the square nut's handle, turn and carry it over the square peg, lower it to the table."""

    HANDLE = 0.06  # grasp point on the handle (nut frame x; the handle spans 2.9-7.9 cm, its site is at 5.4;
    # the open fingers, 1 cm either side of it, must clear the ring, which ends at 4.4 cm)
    WIDTH = 0.0318  # the handle's width
    CLEAR = 0.02  # nut bottom above the peg top while moving over it
    # nut yaws at the peg: handle toward the robot or sideways (handle away from the robot: out of reach)
    TARGET_YAWS = (np.pi / 2, np.pi, -np.pi / 2)

    def plan(self) -> np.ndarray:
        g = self.geometry
        nut, nut_yaw = self.get("SquareNut_pos"), yaw_of(self.get("SquareNut_quat"))
        handle = nut + rot_z(nut_yaw) @ [self.HANDLE, 0.0, 0.0]
        turn = min((wrap(t - nut_yaw) for t in self.TARGET_YAWS), key=abs)
        peg = np.asarray(g["peg"])
        if self.holds(handle, self.WIDTH, z_tol=0.025):
            xy_err = float(np.linalg.norm(nut[:2] - peg[:2]))
            above = g["peg_top"] + 0.01 + self.CLEAR  # nut centre (half height 1 cm) above the peg top
            around = nut[2] < g["peg_top"] + 0.005 and xy_err < 0.012  # the hole is around the peg
            aligned = xy_err < (0.007 if nut[2] < above - 0.008 else 0.004) and abs(turn) < 0.1
            if around or aligned:
                target = np.array([peg[0], peg[1], g["table_z"]])  # down the peg to the table
            elif nut[2] < above - 0.015:
                target = np.array([nut[0], nut[1], above])  # too low to move sideways: rise first
            else:
                target = np.array([peg[0], peg[1], above])
            # the nut moves and turns with the hand
            return self.move(self.eef + target - nut, self.yaw + turn, CLOSE)
        return self.grasp(handle, self.grasp_yaw(nut_yaw, turn), self.WIDTH, hover=0.08, xy_tol=0.008)

    def grasp_yaw(self, nut_yaw: float, turn: float) -> float:
        """Hand x along the handle (fingers across it): of the two such yaws the one that keeps the wrist
        nearer yaw 0 both at the grasp and after the turn (ties: nearer the current yaw)."""
        options = [wrap(nut_yaw), wrap(nut_yaw + np.pi)]
        cost = [max(abs(y), abs(wrap(y + turn))) + 0.1 * abs(wrap(y - self.yaw)) for y in options]
        return options[int(np.argmin(cost))]


EXPERTS: dict[str, type[Expert]] = {
    "Lift": LiftExpert,
    "Stack": StackExpert,
    "PickPlaceCan": CanExpert,
    "NutAssemblySquare": SquareExpert,
}


def make_expert(task: str, layout: Mapping[str, slice], geometry: Mapping[str, Any], noise: float = 0.0,
                seed: int | None = None) -> Expert:
    """The scripted expert of robosuite task ``task`` (a key of :data:`EXPERTS`)."""
    if task not in EXPERTS:
        raise UserError(f"no scripted robosuite expert for {task!r}; experts: {', '.join(EXPERTS)}")
    return EXPERTS[task](layout, geometry, noise=noise, seed=seed)
